"""Which prompt template a model + adapters run with when the user says `--prompt-template auto`."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any


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
