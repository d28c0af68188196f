"""Option groups shared by several verbs. A verb's config dataclass inherits the groups it needs, so a
flag such as `--base-model` or `--cutoff-len` is declared once and means the same everywhere."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from lorakit.config import opt
from lorakit.errors import ConfigError

Precision = Literal["auto", "fp32", "bf16", "fp16"]


def adapter_option(help: str, required: bool = False) -> list[str]:  # noqa: A002
    """The adapter flag, spelled the same on every verb: `--lora-weights` (alpaca-lora's name), with
    `--lora-model` (Chinese-LLaMA-Alpaca's) accepted as an alias."""
    return opt([], help, required=required, aliases=("lora_model",))


@dataclass
class ModelOptions:
    """The base model and tokenizer options shared by every verb that loads a model."""

    base_model: str = opt("smollm2-135m", "base model: a Hugging Face folder, a .gguf file, or the alias smollm2-135m")
    tokenizer: str | None = opt(None, "tokenizer folder, tokenizer.model or .gguf (default: the base model's)")


@dataclass
class PromptDataOptions:
    """Instruction-data options shared by finetune, eval and preview."""

    data_path: str = opt("", "instruction data: .json (array) / .jsonl / .parquet with alpaca, messages or "
                             "conversations records, or a folder of such files", required=True)
    prompt_template: str = opt("alpaca", "alpaca, alpaca_short, alpaca_legacy, vigogne, chinese_alpaca, chat "
                                         "(the tokenizer's chat template) or a path to a JSON template")
    cutoff_len: int = opt(256, "maximum tokens per example (longer ones are truncated)")
    train_on_inputs: bool = opt(True, "compute loss on the prompt too (--no-train-on-inputs masks it)")
    add_eos_token: bool = opt(True, "append EOS to each example when room remains")
    skip_invalid: bool = opt(False, "skip invalid records (and report how many) instead of stopping")

    def validate_data(self) -> None:
        if self.cutoff_len < 8:
            raise ConfigError("--cutoff-len must be at least 8")


@dataclass
class QuantizationOptions:
    """Load the base quantized with bitsandbytes (QLoRA: 4-bit NF4); see lorakit.models.quantize."""

    quantization: Literal["none", "8bit", "4bit"] = opt(
        "none", "load the base quantized with bitsandbytes: 8bit (LLM.int8) or 4bit (QLoRA); LoRA weights and "
                "the compute dtype follow --precision")
    bnb_4bit_quant_type: Literal["nf4", "fp4"] = opt("nf4", "4-bit data type: nf4 (QLoRA's NormalFloat) or fp4")
    bnb_4bit_double_quant: bool = opt(True, "also quantize the 4-bit blocks' scales (QLoRA's double "
                                            "quantization, ~0.4 bits/parameter less)")


@dataclass
class SamplingOptions:
    """Sampling flags shared by generate, infer, serve and webui (-> generate.params.sampling_params)."""

    max_new_tokens: int = opt(256, "most tokens to generate per response")
    temperature: float = opt(0.1, "sampling temperature (0: greedy)")
    top_p: float = opt(0.75, "nucleus sampling: smallest set of tokens with this probability mass")
    top_k: int = opt(40, "sample among the k most likely tokens (0: no limit)")
    num_beams: int = opt(1, "beam search width (> 1 disables token streaming)")
    repetition_penalty: float = opt(1.0, "penalty for repeating tokens already present (1: off)")
    presence_penalty: float = opt(0.0, "subtract this from tokens already generated (OpenAI's; 0: off)")
    frequency_penalty: float = opt(0.0, "subtract this per earlier occurrence in the response (OpenAI's; 0: off)")
    stop: list[str] = opt([], "extra stop strings (EOS and the template's end-of-turn always stop)")
    seed: int | None = opt(None, "random seed for reproducible sampling")
