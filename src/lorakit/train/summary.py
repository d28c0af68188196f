"""`TrainSummary`: what a finished `finetune`/`pretrain` run reports, also written to its output folder
(train_summary.json) for scripts and benchmarks (`read_summary`)."""

from __future__ import annotations

import json
import os
import resource
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SUMMARY_FILE = "train_summary.json"


@dataclass
class TrainSummary:
    """What a finished training run reports: steps, losses, throughput, memory, precision."""

    output_dir: str
    global_step: int
    train_loss: float
    eval_loss: float | None
    train_seconds: float
    tokens_seen: int
    tokens_per_second: float
    peak_rss_mb: float
    precision: str
    trainable_params: int
    extra: dict[str, Any] = field(default_factory=dict)
    peak_gpu_mb: float | None = None  # torch.cuda.max_memory_allocated of this process, when on CUDA
    processes: int = 1
    peak_rss_mb_all: float = 0.0  # sum of the processes' peaks (what the machine had to hold)
    cpu_seconds: float = 0.0  # CPU time of all processes while training

    def describe(self) -> str:
        """The one-line result printed by `finetune` and `pretrain`."""
        eval_part = f", eval loss {self.eval_loss:.4f}" if self.eval_loss is not None else ""
        memory = (f"peak RSS {self.peak_rss_mb:.0f} MB" if self.processes == 1 else
                  f"{self.processes} processes, peak RSS {self.peak_rss_mb_all:.0f} MB in all")
        gpu = "" if self.peak_gpu_mb is None else f", peak GPU {self.peak_gpu_mb:.0f} MB"
        return (f"done: {self.global_step} steps, train loss {self.train_loss:.4f}{eval_part}, "
                f"{self.tokens_per_second:.0f} tokens/s, {memory}{gpu}, precision {self.precision}")


def peak_rss_mb() -> float:
    """Peak resident memory of this process (in DDP: of this rank) since it started, in MB."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KB on Linux, bytes on macOS
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


def read_summary(output_dir: str | os.PathLike[str]) -> TrainSummary:
    """The TrainSummary a finished run wrote to its output folder."""
    return TrainSummary(**json.loads((Path(output_dir) / SUMMARY_FILE).read_text(encoding="utf-8")))
