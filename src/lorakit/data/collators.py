"""Batch collation: padded (alpaca-lora's DataCollatorForSeq2Seq) or padding-free (flattened)."""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any

from lorakit.data.tokenize import IGNORE_INDEX

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


class PaddingFreeCollator:
    """transformers' flattening collator plus `use_cache=False` in every batch.

    With a cache, transformers 5 skips the per-example mask of a packed row and later examples attend
    to earlier ones (silently wrong losses). Putting `use_cache=False` into the batch makes every
    forward that consumes it (train, eval, a custom loop) safe, whatever `model.config.use_cache` says.
    """

    def __init__(self, flatten: Any):
        self.flatten = flatten

    def __call__(self, features: list[dict[str, Any]], return_tensors: str | None = None) -> dict[str, Any]:
        batch = self.flatten(features, return_tensors)
        batch["use_cache"] = False
        return batch


def make_collator(tokenizer: PreTrainedTokenizerBase, padding_free: bool = True) -> Any:
    """A collator for HF Trainer.

    padding_free=True: the micro-batch becomes one row [1, sum(T_i)] with `position_ids` restarting at
    0 for each example and the first label of each example set to -100, so no pad token is computed
    and attention stays inside each example (the model must run with use_cache=False, which the
    trainer sets). padding_free=False: rows right-padded to the longest (multiple of 8), labels -100.
    """
    from transformers import DataCollatorForSeq2Seq, DataCollatorWithFlattening

    if padding_free:
        return PaddingFreeCollator(DataCollatorWithFlattening(return_position_ids=True, separator_id=IGNORE_INDEX))
    # Pad on the right whatever the tokenizer says (many default to left, for generation): with left
    # padding the first token of a row becomes a target predicted from a pad, an extra wrong token.
    right_padding = copy.copy(tokenizer)
    right_padding.padding_side = "right"
    return DataCollatorForSeq2Seq(right_padding, padding=True, pad_to_multiple_of=8, label_pad_token_id=IGNORE_INDEX,
                                  return_tensors="pt")
