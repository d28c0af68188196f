"""Logit round trips: does a written model compute what the in-memory reference computes?

Used by `merge --verify` (reference: base + adapters applied in memory by PEFT, in order) and
`export --verify` (reference: the exported HF model). The reference logits are computed first and the
reference model freed before the written model is loaded, so a check never holds two models at once.
The probes are fixed pseudo-random token ids covering the whole vocabulary (extended rows included).
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from lorakit.errors import LorakitError

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel

log = logging.getLogger("lorakit")

# Allowed max |logit difference| relative to max |reference logit|, by the stored weight type.
# Measured (GGUF of SmolLM2-135M read back by transformers, random probes): f16 1.5e-3, bf16 1.3e-2,
# q8_0 3.3e-2; f32 and fp32 merges differ by < 1e-6. A missing q/k permutation gives 0.56, so the
# limits (3-10x the measured error) leave head-room without hiding a wrong layout or a wrong tensor.
RELATIVE_TOLERANCE = {"float32": 1e-4, "f32": 1e-4, "float16": 2e-2, "f16": 2e-2,
                      "bfloat16": 8e-2, "bf16": 8e-2, "q8_0": 1e-1}


class VerificationError(LorakitError):
    """The written model's logits differ from the reference by more than the tolerance."""

    exit_code = 3


@dataclass
class VerifyResult:
    max_abs_diff: float
    max_abs_logit: float
    tolerance: float
    argmax_agreement: float

    def summary(self) -> str:
        return (f"max |logit diff| = {self.max_abs_diff:.3g} (tolerance {self.tolerance:.3g}, "
                f"max |logit| {self.max_abs_logit:.3g}); same top token at {self.argmax_agreement:.1%} of positions")


def probe_ids(vocab_size: int, n: int = 3, length: int = 24, seed: int = 1234) -> torch.Tensor:
    """[n, length] token ids drawn reproducibly from the whole vocabulary."""
    import torch

    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (n, length), generator=g)


def logits_of(model: PreTrainedModel, ids: torch.Tensor) -> torch.Tensor:
    """fp32 logits [n, length, vocab] of `model` on `ids` (no cache, eval mode)."""
    import torch

    model.eval()
    with torch.inference_mode():
        return model(input_ids=ids, use_cache=False).logits.float()


def reference_logits(build: Callable[[], PreTrainedModel], ids: torch.Tensor) -> torch.Tensor:
    """Build a model, take its logits, free it before returning."""
    model = build()
    out = logits_of(model, ids)
    del model
    gc.collect()
    return out


def compare(reference: torch.Tensor, candidate: torch.Tensor, weight_type: str, what: str) -> VerifyResult:
    """Check candidate logits against the reference; raise VerificationError above the tolerance."""
    if candidate.shape != reference.shape:
        raise VerificationError(f"{what}: logits shape {list(candidate.shape)} != reference {list(reference.shape)}")
    diff = float((candidate - reference).abs().max())
    scale = float(reference.abs().max())
    tol = RELATIVE_TOLERANCE[weight_type] * max(scale, 1.0)
    agree = float((candidate.argmax(-1) == reference.argmax(-1)).float().mean())
    result = VerifyResult(diff, scale, tol, agree)
    if not diff <= tol:  # also catches NaN
        raise VerificationError(f"{what}: verification FAILED: {result.summary()}")
    log.info("%s: verified: %s", what, result.summary())
    return result


def merged_in_memory(base_model: str, adapters: Sequence[str], dtype: str = "float32") -> PreTrainedModel:
    """The reference for a merge, computed by PEFT in memory: every adapter but the last merged in turn
    (merge_and_unload), the last one left unmerged, so its update is applied on the fly in the forward
    pass (x W^T + scale * x A^T B^T): independent of any merge arithmetic, and much faster than
    merging it. PEFT unties a tied lm_head itself when an embedding diverged (modules_to_save)."""
    from lorakit.models import attach_adapters, load_model

    model = load_model(base_model, dtype)
    for adapter in adapters[:-1]:
        model = attach_adapters(model, [adapter], merge=True)
    return attach_adapters(model, list(adapters[-1:]), merge=False)
