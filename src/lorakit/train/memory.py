"""Memory savers of a training run, applied to the base before LoRA wraps it: a quantized base
(`--quantization`, through PEFT's k-bit preparation) and `--gradient-checkpointing`.

Gradient checkpointing keeps only each decoder layer's input and recomputes the layer in the backward
pass. It uses torch's non-reentrant checkpoint, which replays the layer with the same RNG state (the
LoRA dropout draws the same positions) and needs no input that requires grad; lorakit's own pieces
inside a layer (packed attention, the RMSNorm backward, FastDropout) recompute exactly, and the
fused lm_head loss sits outside the layers. tests/test_quantize.py checks the loss and gradients
against the run without it.
"""

from __future__ import annotations

import logging
from typing import Any

from lorakit.errors import ConfigError
from lorakit.models.quantize import is_quantized, prepare_for_kbit_training

log = logging.getLogger("lorakit")


def quantized_model(model: Any) -> bool:
    return bool(getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False))


def prepare_base(model: Any, cfg: Any, processes: int = 1) -> Any:
    """Freeze/cast a quantized base for k-bit training and switch on gradient checkpointing as asked."""
    checkpointing = bool(getattr(cfg, "gradient_checkpointing", False))
    if quantized_model(model) or is_quantized(cfg):
        if processes > 1:
            raise ConfigError(f"a quantized base trains in one process, not {processes}: start it without "
                              "torchrun/accelerate launch (or drop --quantization)")
        model = prepare_for_kbit_training(model, checkpointing)
    elif checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    if checkpointing:
        log.info("gradient checkpointing: each decoder layer is recomputed in the backward pass")
    return model
