"""Quantized bases (`--quantization 8bit|4bit`): the one place that builds the bitsandbytes config,
checks that a quantized load makes sense, and loads.

8-bit is LLM.int8 (alpaca-lora's `load_in_8bit`), 4-bit is QLoRA's NF4 (or FP4) with double
quantization of the block scales; both through transformers' `BitsAndBytesConfig`, on the CPU as on
CUDA. The linear layers of the decoder are quantized; the embeddings, norms and lm_head keep the
weights dtype (transformers leaves the output layer unquantized), which the compute dtype follows.
Loading reads the checkpoint tensor by tensor (`load_streaming`), so that the peak is the quantized
model plus a few tensors, not the full-precision shards.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from lorakit.errors import ConfigError, LorakitError
from lorakit.machine import release_free_heap, unpool_large_blocks
from lorakit.models.resolve import cache_root

if TYPE_CHECKING:
    import torch
    from transformers import BitsAndBytesConfig, PreTrainedModel

log = logging.getLogger("lorakit")


class Quantization(Protocol):
    """What the loaders read of `lorakit.options.QuantizationOptions`."""

    quantization: str
    bnb_4bit_quant_type: str
    bnb_4bit_double_quant: bool


class QuantizedBaseError(LorakitError):
    """A quantized checkpoint was given where full-precision weights are needed (e.g. to merge into)."""


def is_quantized(opts: Any) -> bool:
    """Whether `opts` (any config with a `quantization` field, or None) asks for a quantized base."""
    return getattr(opts, "quantization", "none") not in (None, "none")


def require_bitsandbytes(quantization: str) -> None:
    """Refuse `--quantization` when bitsandbytes is not installed (one line, before any loading)."""
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError(f"--quantization {quantization} needs the bitsandbytes package, which is not "
                          "installed: pip install 'bitsandbytes>=0.50' (it runs on the CPU too)")


def validate_quantization(opts: Any, nproc: str | None = None) -> None:
    """Config-time checks of `--quantization`: the package is there, and one training process."""
    if not is_quantized(opts):
        return
    require_bitsandbytes(opts.quantization)
    if nproc not in (None, "auto", "1"):
        raise ConfigError(f"--quantization {opts.quantization} trains in one process: --nproc {nproc} would hold "
                          "a quantized copy per process, and bitsandbytes' weights are not shared by DDP here; "
                          "drop --nproc (or pass --nproc 1)")


def checkpoint_quantization(folder: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The `quantization_config` of a Hugging Face folder's config.json, or None."""
    path = Path(folder) / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    quant = config.get("quantization_config") if isinstance(config, dict) else None
    return quant if isinstance(quant, dict) else None


def describe_checkpoint_quantization(quant: dict[str, Any]) -> str:
    method = str(quant.get("quant_method", "unknown"))
    if quant.get("load_in_4bit"):
        return f"{method} 4-bit ({quant.get('bnb_4bit_quant_type', 'nf4')})"
    if quant.get("load_in_8bit"):
        return f"{method} 8-bit"
    return method


def refuse_quantized_merge_base(folder: str | os.PathLike[str]) -> None:
    """`lorakit merge` into a quantized checkpoint: refused, with the reason and what to do instead."""
    quant = checkpoint_quantization(folder)
    if quant is not None:
        raise QuantizedBaseError(
            f"{Path(folder) / 'config.json'}: the base is quantized ({describe_checkpoint_quantization(quant)}); "
            "merging a LoRA into quantized weights rounds the update away. Merge into the original "
            "full-precision base (the one the quantized model was made from) instead")


def is_gguf_base(folder: Path) -> bool:
    """A folder lorakit converted from a GGUF file (see resolve.gguf_to_hf_dir)."""
    return Path(folder).resolve().parent == (cache_root() / "gguf").resolve()


def check_quantized_base(folder: Path, opts: Quantization) -> None:
    """Refuse or announce what `--quantization` means for this base, in one line each."""
    quant = checkpoint_quantization(folder)
    if quant is not None:
        raise QuantizedBaseError(
            f"{folder / 'config.json'}: the base is already quantized ({describe_checkpoint_quantization(quant)}); "
            f"--quantization {opts.quantization} quantizes a full-precision base itself: give the original "
            "full-precision folder")
    if is_gguf_base(folder):
        log.info("note: the base is a GGUF file, dequantized to full precision by transformers; "
                 "--quantization %s quantizes it again with bitsandbytes (a second rounding)", opts.quantization)


def bnb_config(opts: Quantization, compute_dtype: torch.dtype) -> BitsAndBytesConfig:
    """transformers' BitsAndBytesConfig for `opts`; 4-bit computes in `compute_dtype` (the run's precision)."""
    from transformers import BitsAndBytesConfig

    if opts.quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    if opts.quantization == "4bit":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=opts.bnb_4bit_quant_type,
                                  bnb_4bit_use_double_quant=opts.bnb_4bit_double_quant,
                                  bnb_4bit_compute_dtype=compute_dtype)
    raise ConfigError(f"unknown --quantization {opts.quantization!r}")


def quiet_bitsandbytes() -> None:
    """bitsandbytes' CPU backend logs a hub-kernel fallback at import and warns on every int8 matmul
    about an fp16 cast it does by design; keep both out of the user's terminal."""
    import warnings

    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=r"MatMul8bitLt: inputs will be cast")


def load_quantized(folder: Path, opts: Quantization, dtype: torch.dtype,
                   attn_implementation: str = "sdpa") -> PreTrainedModel:
    """Load the causal LM in `folder` with its decoder linears quantized per `opts`; everything else in
    `dtype`, which the 4-bit matmuls also compute in."""
    import torch
    from transformers import AutoModelForCausalLM

    require_bitsandbytes(opts.quantization)
    check_quantized_base(folder, opts)
    quiet_bitsandbytes()
    unpool_large_blocks(1 << 20)  # a quantized base is chosen to save memory: freed tensors leave the process
    kwargs = {"dtype": dtype, "attn_implementation": attn_implementation,
              "quantization_config": bnb_config(opts, dtype),
              "device_map": {"": 0} if torch.cuda.is_available() else {"": "cpu"}}
    model = load_streaming(folder, kwargs)
    if model is None:  # not safetensors, or an architecture transformers does not export by name
        model = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    release_free_heap()  # what the heaps still hold of the full-precision tensors read for quantizing
    log.info("base loaded in %s (%s)", opts.quantization, describe_model(model))
    return model


def load_streaming(folder: Path, kwargs: dict[str, Any]) -> PreTrainedModel | None:
    """from_pretrained over the checkpoint's tensors read with pread, one at a time, instead of mmap.

    transformers reads safetensors through memory maps that stay open until the whole model is loaded:
    every page it touched counts in the process's resident memory, so a quantized load peaked at the
    full-precision size plus the quantized one (measured: 3.1 GB for a 2.0 GB bf16 checkpoint quantized to
    0.7 GB). Handed lazy slices of safetensors' pread backend instead, each tensor is read into its own
    buffer when transformers materialises it and freed once quantized. None when this does not apply."""
    import transformers
    from safetensors import safe_open
    from transformers import AutoConfig, GenerationConfig

    files = sorted(Path(folder).glob("*.safetensors"))
    config = AutoConfig.from_pretrained(folder)
    arch = (getattr(config, "architectures", None) or [None])[0]
    cls = getattr(transformers, arch, None) if arch else None
    if not files or cls is None or not hasattr(cls, "from_pretrained"):
        return None
    handles, state_dict = [], {}
    try:
        for f in files:
            try:
                handle = safe_open(str(f), framework="pt", device="cpu", backend="pread")
            except TypeError:  # a safetensors without the pread backend
                return None
            handles.append(handle)
            state_dict.update({k: handle.get_slice(k) for k in handle.keys()})  # noqa: SIM118 (not a dict)
        # the folder goes in as config + state_dict (transformers takes a state_dict only without a path)
        model = cls.from_pretrained(None, config=config, state_dict=state_dict, **kwargs)
    finally:
        for handle in handles:
            handle.__exit__(None, None, None)
    model.config.name_or_path = model.name_or_path = str(folder)  # as from_pretrained(folder) records it
    if (Path(folder) / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(folder)
    return model


def describe_model(model: Any) -> str:
    """e.g. '168 linears 4-bit nf4, 1.2 GB in memory'."""
    quantized = [m for m in model.modules() if type(m).__name__ in ("Linear4bit", "Linear8bitLt")]
    size = model.get_memory_footprint() if hasattr(model, "get_memory_footprint") else 0
    return f"{len(quantized)} linears quantized, {size / 2**30:.2f} GB of weights"


def merge_allowed(opts: Any, merge: bool, n_adapters: int) -> bool:
    """Whether adapters may be merged into the loaded weights: never into quantized ones (the update
    would be rounded into 4/8-bit weights), where they stay separate, with a notice."""
    if not (merge and n_adapters and is_quantized(opts)):
        return merge
    if n_adapters > 1:
        raise ConfigError(f"{n_adapters} adapters on a {opts.quantization} base cannot be merged in memory "
                          "(merging rounds them into quantized weights): pass --no-merge to select them by "
                          "name, or `lorakit merge` them into the full-precision base first")
    log.info("note: on a %s base the adapter stays separate (merging would round it into the quantized "
             "weights)", opts.quantization)
    return False


def prepare_for_kbit_training(model: PreTrainedModel, gradient_checkpointing: bool) -> PreTrainedModel:
    """PEFT's k-bit preparation (`prepare_model_for_kbit_training`) for a quantized base, with the same
    numbers in less memory; a no-op for a full-precision model.

    PEFT freezes every parameter and upcasts every non-quantized one to fp32. For the 1-D ones (norm
    weights, biases: a few MB) lorakit does the same. The 2-D ones, the embeddings and the lm_head
    ([vocab, hidden] each: 0.5 GB apiece in fp32 on a 7B, twice their bf16 size), are frozen and only
    read, so they stay in the dtype they were loaded in (the run's compute dtype): under the training
    autocast the lm_head's matmul (and lorakit's fused loss) casts an fp32 copy back to that dtype, which
    gives the loaded weight again; and the rows of the embedding table cast to fp32 equal those of PEFT's
    fp32 table, so a forward hook casts the embedding output to fp32 and the residual stream stays fp32
    as under PEFT. PEFT has no option to skip its upcast, hence these steps here rather than its function;
    tests/test_quantize_prepare.py checks the loss and LoRA gradients against it."""
    import torch

    if not (getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False)):
        return model
    if getattr(model, "is_loaded_in_8bit", False):
        from lorakit.models.int8_training import lean_int8_training

        lean_int8_training(model)
    for param in model.parameters():
        param.requires_grad = False
        if (param.dtype in (torch.float16, torch.bfloat16) and type(param).__name__ != "Params4bit"
                and param.ndim < 2):
            param.data = param.data.to(torch.float32)
    embeddings = model.get_input_embeddings()
    if embeddings.weight.dtype != torch.float32:
        embeddings.register_forward_hook(_fp32_output)
    if gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    return model


def _fp32_output(module: Any, inputs: Any, output: torch.Tensor) -> torch.Tensor:
    """Embedding output [B, T, H] in fp32, as PEFT's fp32 embedding table gives it."""
    import torch

    return output.to(torch.float32)
