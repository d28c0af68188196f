"""Verify a GGUF by what llama.cpp itself computes: its logits on the written file (with LoRA adapter
GGUFs applied, if any) against the Hugging Face reference (the source model, or base + adapters by PEFT).

Used for GGUF LoRA adapters (only llama.cpp applies them).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from lorakit.checkpoint.verify import VerifyResult, compare, compute_dtype, probe_ids

if TYPE_CHECKING:
    from transformers import PreTrainedModel

log = logging.getLogger("lorakit")


def llamacpp_logits(gguf: Path, ids, adapters: dict[str, Path] | None = None):
    """llama.cpp's fp32 logits [n, length, vocab] for the rows of `ids` [n, length] (each row its own
    sequence, from position 0), with every adapter in `adapters` applied at scale 1."""
    import torch

    from lorakit.models.llamacpp import LlamaCppModel

    rows = ids.tolist()
    with LlamaCppModel(gguf, adapters, n_ctx=max(64, max(len(r) for r in rows)), n_batch=max(len(r) for r in rows)
                       ) as model:
        model.use_adapters(list(adapters or {}))
        return torch.stack([torch.from_numpy(model.sequence_logits(r)) for r in rows])


def verify_adapter_with_llamacpp(what: str, n_params: int, vocab_size: int, base_gguf: Path, adapter_type: str,
                                 reference: Callable[[str], PreTrainedModel], adapter_gguf: Path
                                 ) -> VerifyResult | None:
    """llama.cpp's logits on `base_gguf` + `adapter_gguf` vs `reference(dtype)` (a PeftModel: base + the
    adapter, unmerged). The tolerance is the adapter type's plus twice llama.cpp's own error on the base
    alone (the PeftModel with its adapter disabled vs the base GGUF, same probes): the file is checked for
    what it adds, not for llama.cpp's arithmetic. That floor is ~1e-6 of the largest logit for LLaMA/Qwen;
    for Gemma 3, llama.cpp computes GELU through a 16-bit table: ~4e-4 measured on a tiny model."""
    import gc

    from lorakit.checkpoint.verify import RELATIVE_TOLERANCE, logits_of
    from lorakit.precision import weight_type

    dtype = compute_dtype(n_params)
    if dtype is None:
        log.warning("%s: NOT verified: the reference model does not fit in memory here", what)
        return None
    ids = probe_ids(vocab_size)
    model = reference(dtype)
    ref = logits_of(model, ids)
    with model.disable_adapter():
        ref_base = logits_of(model, ids)
    del model
    gc.collect()
    vocab = ref.shape[-1]
    base_error = float((llamacpp_logits(base_gguf, ids)[..., :vocab] - ref_base).abs().max())
    floor = base_error / max(float(ref_base.abs().max()), 1.0)
    log.info("%s: llama.cpp's own error on the base alone: %.3g (relative %.2g)", what, base_error, floor)
    got = llamacpp_logits(base_gguf, ids, {"adapter": adapter_gguf})[..., :vocab]
    relative = RELATIVE_TOLERANCE[weight_type(adapter_type).name] + 2 * floor
    return compare(ref, got, adapter_type, what, computed_in=dtype, relative=relative)
