"""Options of `lorakit export` (no torch import here: keeps `lorakit --help` fast)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from lorakit.config import opt
from lorakit.errors import ConfigError
from lorakit.export.quantize import QUANT_TYPES
from lorakit.precision import FLOAT_TYPES, WEIGHT_TYPES, weight_type

GGUF_TYPES = (*WEIGHT_TYPES, *QUANT_TYPES)  # lorakit's own writer's types, then llama.cpp's quantizer's


@dataclass
class ExportConfig:
    """Options of `lorakit export`."""

    model: str = opt("", "model to export: a Hugging Face folder (e.g. a merged model), a .gguf or an alias "
                         "(required unless --format gguf-lora)")
    format: Literal["gguf", "pth", "gguf-lora"] = opt(
        "gguf", "gguf (llama.cpp), pth (Meta consolidated.NN.pth + params.json) or gguf-lora (a LoRA adapter "
                "llama.cpp/Ollama apply at run time: --adapter and --base-model)")
    output: str = opt("", "output .gguf file (gguf, gguf-lora) or folder (pth)", required=True)
    dtype: str = opt("f16", "weight type of the output: f32, f16, bf16, q8_0 (norms stay f32), or llama.cpp's "
                            f"quantized {'/'.join(QUANT_TYPES)} (gguf); f32/f16/bf16 for pth and gguf-lora; "
                            "float32/float16/bfloat16 are accepted too", aliases=("outtype",))
    adapter: str = opt("", "--format gguf-lora: the PEFT LoRA adapter folder")
    base_model: str = opt("", "--format gguf-lora: the base model the adapter was trained on (folder, .gguf or "
                              "alias)")
    imatrix: str | None = opt(None, "importance matrix for the quantized types (llama.cpp's GGUF imatrix file)")
    imatrix_data: str | None = opt(None, "compute the importance matrix for the quantized types from this text "
                                         "(.txt or .jsonl with `text`; not your evaluation text) and save it "
                                         "beside the output as <output>.imatrix.gguf")
    imatrix_chunks: int = opt(100, "--imatrix-data: most chunks of 512 tokens read")
    ollama: bool = opt(False, "also write an Ollama Modelfile next to the output (FROM, ADAPTER, TEMPLATE, stop "
                              "tokens, generation defaults)")
    verify: bool = opt(True, "read the output back and compare it with the source, one decoder layer at a "
                             "time (memory: about one layer); a GGUF LoRA adapter: llama.cpp's logits vs PEFT's")
    overwrite: bool = opt(False, "replace an existing output")

    def validate(self) -> None:
        if self.format != "gguf" and self.dtype.lower() in (*QUANT_TYPES, "q8_0"):
            raise ConfigError(f"--dtype {self.dtype} is only for --format gguf (use f32, f16 or bf16)")
        if self.format == "gguf" and self.dtype.lower() in QUANT_TYPES:
            self.dtype = self.dtype.lower()
        else:
            allowed = tuple(WEIGHT_TYPES) if self.format == "gguf" else FLOAT_TYPES
            self.dtype = weight_type(self.dtype, allowed, f"--dtype (--format {self.format})").name
        if self.format == "gguf-lora":
            if not self.adapter or not self.base_model:
                raise ConfigError("--format gguf-lora needs --adapter (the PEFT folder) and --base-model")
        elif not self.model:
            raise ConfigError("missing required option --model")
        elif self.adapter:
            raise ConfigError("--adapter is for --format gguf-lora; to export a model with an adapter merged in, "
                              "run `lorakit merge` first")
        for flag, value in (("--imatrix", self.imatrix), ("--imatrix-data", self.imatrix_data)):
            if value and self.dtype not in QUANT_TYPES:
                raise ConfigError(f"{flag} applies to the quantized types ({', '.join(QUANT_TYPES)}), not "
                                  f"{self.dtype}")
        if self.imatrix and self.imatrix_data:
            raise ConfigError("give --imatrix (a file) or --imatrix-data (text to compute one from), not both")
        if self.imatrix_chunks < 1:
            raise ConfigError("--imatrix-chunks must be >= 1")
        if self.ollama and self.format == "pth":
            raise ConfigError("--ollama writes a Modelfile for a GGUF export (--format gguf or gguf-lora)")
