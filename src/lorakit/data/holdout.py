"""The validation split every training path shares: alpaca-lora's shuffled hold-out, by index.

In-memory examples (train/finetune.py), cached examples (data/example_cache.py) and pretraining blocks
(data/blocks.py) hold out the same positions for the same `--val-set-size` and `--seed`, so a run
keeps its validation set whichever path reads its data.
"""

from __future__ import annotations

import random

from lorakit.errors import ConfigError


def held_out(n: int, val_set_size: int, seed: int, unit: str = "examples") -> list[int]:
    """The positions (of `n` items) held out for validation, in validation order; [] when
    `val_set_size` <= 0. Refuses a split that leaves nothing to train on."""
    if val_set_size <= 0:
        return []
    if val_set_size >= n:
        raise ConfigError(f"--val-set-size {val_set_size} leaves no training data ({n} {unit}); "
                          f"use e.g. --val-set-size {max(1, n // 10)} or 0")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return order[:val_set_size]
