"""Options of `lorakit export` (no torch import here: keeps `lorakit --help` fast)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from lorakit.config import opt
from lorakit.precision import FLOAT_TYPES, WEIGHT_TYPES, weight_type


@dataclass
class ExportConfig:
    """Options of `lorakit export`."""

    model: str = opt("", "model to export: a Hugging Face folder (e.g. a merged model), a .gguf or an alias",
                     required=True)
    format: Literal["gguf", "pth"] = opt("gguf", "gguf (llama.cpp) or pth (Meta consolidated.NN.pth + params.json)")
    output: str = opt("", "output .gguf file (gguf) or folder (pth)", required=True)
    dtype: str = opt("f16", "weight type of the output: f32, f16, bf16, or q8_0 (gguf only; norms stay f32); "
                            "float32/float16/bfloat16 are accepted too", aliases=("outtype",))
    verify: bool = opt(True, "reload the output (transformers' GGUF loader / lorakit's pth reader) and compare "
                             "logits with the source model")
    overwrite: bool = opt(False, "replace an existing output")

    def validate(self) -> None:
        allowed = tuple(WEIGHT_TYPES) if self.format == "gguf" else FLOAT_TYPES
        self.dtype = weight_type(self.dtype, allowed, f"--dtype (--format {self.format})").name
