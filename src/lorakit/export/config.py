"""Options of `lorakit export` (no torch import here: keeps `lorakit --help` fast)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from lorakit.config import opt
from lorakit.errors import ConfigError


@dataclass
class ExportConfig:
    model: str = opt("", "model to export: a Hugging Face folder (e.g. a merged model), a .gguf or an alias",
                     required=True)
    format: Literal["gguf", "pth"] = opt("gguf", "gguf (llama.cpp) or pth (Meta consolidated.NN.pth + params.json)")
    output: str = opt("", "output .gguf file (gguf) or folder (pth)", required=True)
    outtype: Literal["f32", "f16", "bf16", "q8_0"] = opt("f16", "weight type: GGUF f32/f16/bf16/q8_0 (norms stay "
                                                                "f32); pth f32/f16/bf16")
    verify: bool = opt(True, "reload the output (transformers' GGUF loader / lorakit's pth reader) and compare "
                             "logits with the source model")
    overwrite: bool = opt(False, "replace an existing output")

    def validate(self) -> None:
        if self.format == "pth" and self.outtype == "q8_0":
            raise ConfigError("--outtype q8_0 is only for --format gguf")
