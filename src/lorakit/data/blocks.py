"""Pre-training blocks as views into a flat token array (the memory-mapped token cache).

Block i is `tokens[index[i] * block_size : (index[i] + 1) * block_size]`: the stream cut into equal blocks,
the remainder dropped (as `make_blocks` in train/pretrain.py does with a Python list). Nothing is copied
until a block is fetched for a batch; the dataset itself holds only the block numbers.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from lorakit.data.holdout import held_out


class TokenBlocks(Dataset):
    """Causal-LM blocks over `tokens` (a 1-D numpy array or memmap of token ids)."""

    def __init__(self, tokens: np.ndarray, block_size: int, index: np.ndarray | None = None):
        self.tokens, self.block_size = tokens, block_size
        self.index = np.arange(len(tokens) // block_size, dtype=np.int64) if index is None else index

    def __len__(self) -> int:
        return len(self.index)

    def view(self, i: int) -> np.ndarray:
        """Block i as a view into the token array: [block_size], the cache's dtype."""
        start = int(self.index[i]) * self.block_size
        return self.tokens[start:start + self.block_size]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        """{"input_ids", "labels", "attention_mask"}: int64 [block_size] each; every token is a label."""
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        ids = torch.from_numpy(self.view(i % len(self)).astype(np.int64))
        return {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}

    def split(self, val_set_size: int, seed: int) -> tuple[TokenBlocks, TokenBlocks | None]:
        """Hold out `val_set_size` blocks: the same blocks, in the same order, as finetune's split_validation."""
        n = len(self)
        held = np.asarray(held_out(n, val_set_size, seed, "blocks"), dtype=np.int64)
        if not len(held):
            return self, None
        keep = np.ones(n, dtype=bool)
        keep[held] = False
        return (TokenBlocks(self.tokens, self.block_size, self.index[keep]),
                TokenBlocks(self.tokens, self.block_size, self.index[held]))
