"""Batch collation: padded (alpaca-lora's DataCollatorForSeq2Seq) or padding-free (flattened)."""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any

from lorakit.data.tokenize import IGNORE_INDEX

PACKED_LENGTH_MULTIPLE = 32  # padding-free rows are rounded up to this length (see PaddingFreeCollator)

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


class PaddingFreeCollator:
    """transformers' flattening collator plus `use_cache=False` in every batch, and a row length
    rounded up to a multiple of `pad_to_multiple_of` by one extra segment of pad tokens.

    With a cache, transformers 5 skips the per-example mask of a packed row and later examples attend
    to earlier ones (silently wrong losses). Putting `use_cache=False` into the batch makes every
    forward that consumes it (train, eval, a custom loop) safe, whatever `model.config.use_cache` says.

    Why round the length: oneDNN keeps compiled kernels per matmul shape, and a packed row has a new
    length almost every micro-batch: memory grows without bound otherwise
    (docs/performance.md#row-lengths-rounded-to-a-multiple-of-32). The pad segment is its own example
    (positions restart at 0, so attention never crosses into it), has no targets (labels -100) and is not
    counted as seen tokens (HF counts input ids != pad id), so the loss and its average are unchanged,
    for ~16 extra tokens computed.
    """

    def __init__(self, flatten: Any, pad_token_id: int | None = None, pad_to_multiple_of: int = 0):
        self.flatten = flatten
        self.pad_token_id = pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of if pad_token_id is not None else 0

    def __call__(self, features: list[dict[str, Any]], return_tensors: str | None = None) -> dict[str, Any]:
        batch = self.flatten(features, return_tensors)
        extra = -batch["input_ids"].shape[1] % self.pad_to_multiple_of if self.pad_to_multiple_of else 0
        if extra:
            import torch

            pad = {"input_ids": torch.full((1, extra), self.pad_token_id),
                   "labels": torch.full((1, extra), IGNORE_INDEX),
                   "position_ids": torch.arange(extra)[None]}
            for key, tail in pad.items():
                if key in batch:
                    batch[key] = torch.cat([batch[key], tail.to(batch[key].dtype)], dim=1)
        batch["use_cache"] = False
        return batch


def make_collator(tokenizer: PreTrainedTokenizerBase, padding_free: bool = True) -> Any:
    """A collator for HF Trainer.

    padding_free=True: the micro-batch becomes one row [1, sum(T_i)] with `position_ids` restarting at
    0 for each example and the first label of each example set to -100, so attention stays inside
    each example and at most 31 pad tokens are computed (the row is rounded up to a multiple of 32;
    the model must run with use_cache=False, which the trainer sets).
    padding_free=False: rows right-padded to the longest (multiple of 8), labels -100.
    """
    from transformers import DataCollatorForSeq2Seq, DataCollatorWithFlattening

    if padding_free:
        flatten = DataCollatorWithFlattening(return_position_ids=True, separator_id=IGNORE_INDEX)
        return PaddingFreeCollator(flatten, getattr(tokenizer, "pad_token_id", None), PACKED_LENGTH_MULTIPLE)
    # Pad on the right whatever the tokenizer says (many default to left, for generation): with left
    # padding the first token of a row becomes a target predicted from a pad, an extra wrong token.
    right_padding = copy.copy(tokenizer)
    right_padding.padding_side = "right"
    return DataCollatorForSeq2Seq(right_padding, padding=True, pad_to_multiple_of=8, label_pad_token_id=IGNORE_INDEX,
                                  return_tensors="pt")
