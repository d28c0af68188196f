"""Batch collation: padded (alpaca-lora's DataCollatorForSeq2Seq) or padding-free (flattened)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from lorakit.data.tokenize import IGNORE_INDEX

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


def make_collator(tokenizer: PreTrainedTokenizerBase, padding_free: bool = True) -> Any:
    """A collator for HF Trainer.

    padding_free=True: the micro-batch becomes one row [1, sum(T_i)] with `position_ids` restarting at
    0 for each example and the first label of each example set to -100, so no pad token is computed
    and attention stays inside each example (the model must run with use_cache=False, which the
    trainer sets). padding_free=False: rows padded to the longest (multiple of 8), labels padded -100.
    """
    from transformers import DataCollatorForSeq2Seq, DataCollatorWithFlattening

    if padding_free:
        return DataCollatorWithFlattening(return_position_ids=True, separator_id=IGNORE_INDEX)
    return DataCollatorForSeq2Seq(tokenizer, padding=True, pad_to_multiple_of=8, label_pad_token_id=IGNORE_INDEX,
                                  return_tensors="pt")
