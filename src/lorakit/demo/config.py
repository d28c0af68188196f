"""Options of `lorakit demo`."""

from __future__ import annotations

from dataclasses import dataclass

from lorakit.config import opt
from lorakit.options import Precision


@dataclass
class DemoConfig:
    """Options of `lorakit demo`."""

    base_model: str = opt("smollm2-135m", "the model to teach")
    output_dir: str = opt("outputs/demo", "where the data, adapter and report go")
    num_train: int = opt(512, "generated training examples")
    num_test: int = opt(60, "held-out examples for accuracy (never trained on)")
    max_steps: int = opt(48, "optimizer steps")
    batch_size: int = opt(16, "examples per optimizer step")
    micro_batch_size: int = opt(8, "examples per forward pass")
    learning_rate: float = opt(1e-3, "peak learning rate")
    lora_r: int = opt(16, "LoRA rank")
    precision: Precision = opt("auto", "compute precision of training and evaluation: auto, fp32 or bf16 "
                                            "(not a file's weight type: that is --dtype)")
    seed: int = opt(0, "seed for the generated data and training")
