"""Choices made when the engine loads a model: prompt template, tokenizer source, weights dtype."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


def choose_template(name: str, tokenizer: Any, adapter_dirs: Sequence[Path]) -> str:
    """Resolve `--prompt-template auto`: the adapter's training template (its lorakit_config.yaml), else
    `chat` when the tokenizer has a chat template, else `alpaca`."""
    if name != "auto":
        return name
    import yaml

    for d in adapter_dirs:
        cfg_file = Path(d) / "lorakit_config.yaml"
        if cfg_file.is_file():
            with contextlib.suppress(yaml.YAMLError, OSError):
                template = (yaml.safe_load(cfg_file.read_text(encoding="utf-8")) or {}).get("prompt_template")
                if isinstance(template, str) and template:
                    return template
    return "chat" if getattr(tokenizer, "chat_template", None) else "alpaca"


def resolve_dtype(precision: str) -> torch.dtype:
    """--precision of an inference run -> the dtype the model is held (and computes) in. `auto`: bf16
    where the CPU/GPU computes in bf16, else fp32 (why bf16 weights: docs/performance.md#bf16-weights)."""
    from lorakit.precision import bf16_supported, torch_dtype

    if precision == "auto":
        return torch_dtype("bf16" if bf16_supported() else "fp32")
    return torch_dtype(precision)
