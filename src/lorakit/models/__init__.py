"""The one place where models, tokenizers and adapters are located and loaded. Every verb uses it."""

from lorakit.models.load import (
    adapter_tokenizer_dir,
    adapter_vocab_size,
    attach_adapters,
    check_vocab,
    check_vocab_rows,
    ensure_pad_token,
    load_model,
    load_model_and_tokenizer,
    load_tokenizer,
    resize_embeddings,
    tokenizer_source,
)
from lorakit.models.resolve import ALIASES, resolve_adapter_dir, resolve_model_dir

__all__ = [
    "ALIASES",
    "adapter_tokenizer_dir",
    "adapter_vocab_size",
    "attach_adapters",
    "check_vocab",
    "check_vocab_rows",
    "ensure_pad_token",
    "load_model",
    "load_model_and_tokenizer",
    "load_tokenizer",
    "resize_embeddings",
    "resolve_adapter_dir",
    "resolve_model_dir",
    "tokenizer_source",
]
