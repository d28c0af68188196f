"""Which independent reader checks a written GGUF: transformers' GGUF loader or llama.cpp itself.

transformers' loader rebuilds an HF model from the file, but not every family faithfully: it ignores
Llama 3's `rope_freqs`, Qwen3's `attention.key_length` (head_dim != hidden / heads) and Gemma 3's
sliding-window RoPE base and query scaling, so a correct file would fail the check. For those the
check runs llama.cpp (llama-cpp-python) on the file, the program the file is written for.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from lorakit.export.gguf_metadata import rope_factors
from lorakit.models.families import family_of_config

log = logging.getLogger("lorakit")


def transformers_reads_faithfully(config: dict[str, Any]) -> bool:
    """Whether transformers' GGUF loader rebuilds this model exactly (see the module doc)."""
    if not family_of_config(config).transformers_gguf_loader:
        return False
    head_dim = config.get("head_dim")
    plain_head = not head_dim or head_dim * config["num_attention_heads"] == config["hidden_size"]
    return rope_factors(config) is None and plain_head


def llama_cpp_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("llama_cpp") is not None


class LlamaCppLogits:
    """A GGUF run by llama.cpp, called like an HF causal LM for logits: model(input_ids=[n, T]).logits
    is [n, T, vocab] (fp32), each row evaluated from an empty context."""

    def __init__(self, gguf_file: Path, n_ctx: int = 256, n_threads: int = 2):
        from llama_cpp import Llama

        self.llm = Llama(model_path=str(gguf_file), n_ctx=n_ctx, n_threads=n_threads, logits_all=True,
                         verbose=False)

    def eval(self) -> LlamaCppLogits:
        return self

    def __call__(self, input_ids: Any, **_: Any) -> SimpleNamespace:
        import numpy as np
        import torch

        rows = []
        for row in input_ids.tolist():
            self.llm.reset()
            self.llm.eval(row)
            rows.append(torch.from_numpy(np.array(self.llm.scores[: len(row)], dtype=np.float32)))
        return SimpleNamespace(logits=torch.stack(rows))


def gguf_reader(src: Path, gguf_file: Path) -> tuple[str, Any] | None:
    """(reader name, dtype -> model) for the verification of `gguf_file` written from `src`; None (with a
    notice) when no faithful reader is installed."""
    import torch

    config = json.loads((src / "config.json").read_text())
    if transformers_reads_faithfully(config):
        from transformers import AutoModelForCausalLM

        return "transformers", lambda dtype: AutoModelForCausalLM.from_pretrained(
            gguf_file.parent, gguf_file=gguf_file.name, dtype=getattr(torch, dtype))
    if llama_cpp_available():
        return "llama.cpp", lambda dtype: LlamaCppLogits(gguf_file)
    log.warning("GGUF not verified: transformers' GGUF loader does not rebuild %s models exactly and "
                "llama-cpp-python is not installed", family_of_config(config).name)
    return None
