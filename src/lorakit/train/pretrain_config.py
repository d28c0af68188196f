"""Options of `lorakit pretrain` (continued causal-LM pre-training on raw text, Chinese-LLaMA style)."""

from __future__ import annotations

from dataclasses import dataclass

from lorakit.config import opt
from lorakit.data.cache_options import DataPrepOptions
from lorakit.errors import ConfigError
from lorakit.models.quantize import validate_quantization
from lorakit.options import ModelOptions, QuantizationOptions
from lorakit.train.config import LoraOptions, TrainOptions


@dataclass
class PretrainConfig(DataPrepOptions, ModelOptions, QuantizationOptions, LoraOptions, TrainOptions):
    """Everything `lorakit pretrain` needs; every field is a flag and a YAML key."""

    data_path: str = opt("", "raw text: .txt (one document per non-empty line), .jsonl with `text`, or a folder "
                             "of such files", required=True)
    block_size: int = opt(512, "tokens per training block (documents are concatenated with EOS, then cut)")
    # Chinese-LLaMA trains the (resized) embeddings and output layer fully alongside the LoRA.
    modules_to_save: list[str] = opt(["embed_tokens", "lm_head"], "modules trained fully and saved with the "
                                     "adapter (needed for new tokens' rows); empty: LoRA only")
    output_dir: str = opt("./lora-pretrain", "where the adapter, logs, plot and checkpoints go")
    val_set_size: int = opt(0, "blocks held out for evaluation (0: none)")

    def validate(self) -> None:
        if self.block_size < 8:
            raise ConfigError("--block-size must be at least 8")
        self.validate_lora()
        if self.val_set_size < 0:
            raise ConfigError("--val-set-size must be >= 0")
        self.validate_data_prep()
        self.validate_train()
        validate_quantization(self, self.nproc)
