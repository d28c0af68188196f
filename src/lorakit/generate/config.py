"""Options of `lorakit generate` and `lorakit infer` (and the engine/sampling groups serve and webui reuse).

No torch import here: these dataclasses build the CLI flags.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from lorakit.config import opt
from lorakit.errors import ConfigError
from lorakit.export.config import GGUF_TYPES
from lorakit.generate.params import sampling_params
from lorakit.options import ModelOptions, Precision, QuantizationOptions, SamplingOptions, adapter_option

ENGINE_GGUF_TYPES = ("auto", *GGUF_TYPES)


@dataclass
class EngineOptions(QuantizationOptions, ModelOptions):
    """Options for loading a generation engine: base model, adapters, template, precision."""

    lora_weights: list[str] = adapter_option("LoRA adapter folder(s), applied in order; NAME=PATH names one (the "
                                             "server selects adapters by name)")
    prompt_template: str = opt("auto", "auto (the template the adapter was trained with, else the tokenizer's "
                                       "chat template if it has one, else alpaca), chat, alpaca, "
                                       "alpaca_short, alpaca_legacy, vigogne, chinese_alpaca or a .json path")
    precision: Precision = opt("auto", "compute precision (the model is held in it; a file's weight type "
                                       "is --dtype of merge/export): auto = bf16 where the hardware computes in bf16 "
                                       "(GPU, or a CPU with AVX512-BF16/AMX: ~1.8x faster decoding), else "
                                       "fp32; fp32 gives the exact full-precision logits")
    merge: bool = opt(True, "merge the adapters into the weights in memory (faster); --no-merge keeps "
                            "them separate")
    backend: Literal["auto", "torch", "llamacpp"] = opt(
        "auto", "torch (transformers + PEFT) or llamacpp (GGUF files made and cached by lorakit, adapters applied "
                "by llama.cpp); auto: torch for adapters that train embeddings or on a GPU, else llamacpp")
    gguf_type: Literal[ENGINE_GGUF_TYPES] = opt("auto", "--backend llamacpp: GGUF weight type of the base (auto: "
                                                        "from --precision; e.g. q8_0 or q4_k_m for speed)")

    def adapter_specs(self) -> list[tuple[str, str]]:
        """[(name, path)] from `--lora-weights` (NAME=PATH or PATH, named after the folder)."""
        specs: list[tuple[str, str]] = []
        for item in self.lora_weights:
            name, sep, path = item.partition("=")
            if not sep:
                path = item
                name = path.rstrip("/").replace("\\", "/").rsplit("/", 1)[-1] or "adapter"
            if not name or not path:
                raise ConfigError(f"--lora-weights {item!r}: expected PATH or NAME=PATH")
            base = name
            k = 2
            while name in (n for n, _ in specs):
                name, k = f"{base}-{k}", k + 1
            specs.append((name, path))
        return specs


@dataclass
class GenerateConfig(EngineOptions, SamplingOptions):
    """`lorakit generate`: one response, or an interactive chat without --instruction."""

    instruction: str | None = opt(None, "the instruction; without it an interactive session starts")
    input: str | None = opt(None, "optional input/context for the instruction")
    stream: bool = opt(True, "print tokens as they come when writing to a terminal")

    def validate(self) -> None:
        sampling_params(self)
        self.adapter_specs()


@dataclass
class InferConfig(EngineOptions, SamplingOptions):
    """`lorakit infer`: a response for every record of a data file, written in order, resumable."""

    data_file: str = opt("", "input .jsonl/.json: alpaca records (instruction/input) or chat records "
                              "(messages/conversations)", required=True)
    output: str = opt("", "output .jsonl: each input record plus a \"response\" field", required=True)
    batch_size: int = opt(8, "prompts generated together (left-padded)")
    limit: int = opt(0, "only the first N records (0: all)")

    def validate(self) -> None:
        sampling_params(self)
        self.adapter_specs()
        if self.batch_size < 1:
            raise ConfigError("--batch-size must be >= 1")
