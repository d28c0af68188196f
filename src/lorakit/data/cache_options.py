"""Options of how training data is prepared, shared by finetune and pretrain: the token cache and streaming."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lorakit.config import opt
from lorakit.errors import ConfigError


@dataclass
class DataPrepOptions:
    """Where tokenized data is cached, how many processes tokenize it, or streaming instead."""

    data_cache_dir: str = opt("", "where the tokenized data is cached, keyed by data files, tokenizer and options "
                                  "(default: $LORAKIT_CACHE/tokens, else ~/.cache/lorakit/tokens)")
    preprocessing_num_workers: int = opt(0, "processes tokenizing the data (default: 0, one per core)")
    streaming: bool = opt(False, "read and tokenize the data while training, in file order, with no cache "
                                 "(needs --max-steps; --val-set-size 0)")

    def validate_data_prep(self) -> None:
        if self.preprocessing_num_workers < 0:
            raise ConfigError("--preprocessing-num-workers must be >= 0 (0: one per core)")
        if self.streaming and getattr(self, "max_steps", 0) <= 0:
            raise ConfigError("--streaming needs --max-steps (the length of streamed data is not known)")
        if self.streaming and getattr(self, "val_set_size", 0) > 0:
            raise ConfigError("--streaming holds out no validation set: pass --val-set-size 0")

    def cache_dir(self) -> Path:
        from lorakit.models.resolve import cache_root

        return Path(self.data_cache_dir).expanduser() if self.data_cache_dir else cache_root() / "tokens"

    def workers(self) -> int:
        from lorakit.machine import usable_cores

        return self.preprocessing_num_workers or usable_cores()
