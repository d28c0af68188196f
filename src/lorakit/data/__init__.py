"""Read and validate data files, tokenize with label masks, and collate batches."""

from lorakit.data.collators import make_collator
from lorakit.data.readers import Example, parse_record, read_examples, read_text_documents
from lorakit.data.tokenize import IGNORE_INDEX, tokenize_example, tokenize_examples

__all__ = [
    "IGNORE_INDEX",
    "Example",
    "make_collator",
    "parse_record",
    "read_examples",
    "read_text_documents",
    "tokenize_example",
    "tokenize_examples",
]
