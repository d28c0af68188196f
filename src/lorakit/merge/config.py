"""Options of `lorakit merge` (no torch import here: keeps `lorakit --help` fast)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from lorakit.config import opt
from lorakit.options import adapter_option


@dataclass
class MergeConfig:
    """Options of `lorakit merge`."""

    base_model: str = opt("smollm2-135m", "base model: a Hugging Face safetensors folder, a .gguf file or an alias")
    lora_weights: list[str] = adapter_option("LoRA adapter folder(s), merged in the given order (comma list)",
                                             required=True)
    output_dir: str = opt("", "folder for the merged model (written to a temporary folder, renamed at the end)",
                          required=True)
    output_type: Literal["huggingface", "pth"] = opt("huggingface", "huggingface (sharded safetensors) or pth "
                                                                    "(Meta consolidated.NN.pth + params.json)")
    tokenizer: str | None = opt(None, "tokenizer for the merged model (default: the last adapter's, else the base's)")
    max_shard_size: str = opt("2GB", "largest safetensors shard of the output (huggingface type)")
    dtype: str = opt("auto", "weight type of the output: auto (the base's), f32, f16 or bf16 "
                             "(float32/float16/bfloat16 are accepted too)")
    verify: bool = opt(True, "read the output back and compare it, one decoder layer at a time, with base + "
                             "adapters computed apart from the merge (memory: about one layer)")
    overwrite: bool = opt(False, "replace a non-empty --output-dir")

    def validate(self) -> None:
        from lorakit.formats.shard_writer import parse_size
        from lorakit.precision import FLOAT_TYPES, weight_type

        parse_size(self.max_shard_size)
        if self.dtype != "auto":
            self.dtype = weight_type(self.dtype, FLOAT_TYPES).name
