"""Logit checks shared by the verifiers: probes, tolerances, the comparison and its result.

`merge --verify` and `export --verify` run layer by layer (checkpoint/layerwise.py); `export --format
gguf-lora` compares llama.cpp's logits with PEFT's (export/llamacpp_verify.py), the reference model built
in fp32 when it fits in memory (`compute_dtype`), else in bf16 with a wider tolerance.
The probes are fixed pseudo-random token ids covering the whole vocabulary (extended rows included).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from lorakit.errors import LorakitError
from lorakit.machine import available_memory
from lorakit.precision import weight_type as stored_type

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel

log = logging.getLogger("lorakit")

# Allowed max |logit difference| relative to max |reference logit|, by the stored weight type.
# Measured (GGUF of SmolLM2-135M read back by transformers, random probes): f16 1.5e-3, bf16 1.3e-2,
# q8_0 3.3e-2; f32 and fp32 merges differ by < 1e-6. A missing q/k permutation gives 0.56, so the
# limits (3-10x the measured error) leave head-room without hiding a wrong layout or a wrong tensor.
RELATIVE_TOLERANCE = {"f32": 1e-4, "f16": 2e-2, "bf16": 8e-2, "q8_0": 1e-1}  # by precision.WEIGHT_TYPES name


# Both sides computed in bf16 (when an fp32 copy does not fit in memory) round like bf16 weights do: a f16
# GGUF of SmolLM2-135M read back measured 2.9e-2 (q8_0 4.8e-2, bf16 0); a missing q/k permutation
# still gives 0.56.
HALF_COMPUTE_TOLERANCE = RELATIVE_TOLERANCE["bf16"]
# Peak resident memory of a whole check per parameter, loading transients included: measured 6.8 (fp32)
# and 5.3 (bf16) bytes for `export` of a 0.99B-parameter f16 model to GGUF f16; 10% added.
PEAK_BYTES_PER_PARAM = {"float32": 7.5, "bfloat16": 5.8}


def compute_dtype(n_params: int, available: int | None = None) -> str | None:
    """"float32" when a check in fp32 fits in memory, else "bfloat16" when one in bf16 does (a 3B model on a
    24 GB machine), else None: too large to verify here (a 7B model there)."""
    available = available_memory() if available is None else available
    for dtype, peak in PEAK_BYTES_PER_PARAM.items():
        if n_params * peak <= available:
            return dtype
    return None


class VerificationError(LorakitError):
    """The written model's logits differ from the reference by more than the tolerance."""

    exit_code = 3


@dataclass
class VerifyResult:
    """Max |logit difference| of a written model vs its reference, the largest |reference logit|, the
    tolerance, the argmax agreement, the dtype both were computed in and, for a quantized file, the worst
    weight error."""

    max_abs_diff: float
    max_abs_logit: float
    tolerance: float
    argmax_agreement: float
    computed_in: str = "float32"
    weight_error: float | None = None  # worst per-weight error of a quantized file vs its tolerance (GGUF types)

    def summary(self) -> str:
        where = "" if self.computed_in == "float32" else f", both computed in {self.computed_in} to fit in memory"
        return (f"max |logit diff| = {self.max_abs_diff:.3g} (tolerance {self.tolerance:.3g}, "
                f"max |logit| {self.max_abs_logit:.3g}{where}); same top token at {self.argmax_agreement:.1%} "
                "of positions")


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


def compare(reference: torch.Tensor, candidate: torch.Tensor, weight_type: str, what: str,
            computed_in: str = "float32", relative: float | None = None) -> VerifyResult:
    """Check candidate logits against the reference (both computed in `computed_in`); raise
    VerificationError above the tolerance (`relative`, else the weight type's)."""
    if candidate.shape != reference.shape:
        raise VerificationError(f"{what}: logits shape {list(candidate.shape)} != reference {list(reference.shape)}")
    diff = float((candidate - reference).abs().max())
    scale = float(reference.abs().max())
    relative = RELATIVE_TOLERANCE[stored_type(weight_type).name] if relative is None else relative
    if computed_in != "float32":
        relative = max(relative, HALF_COMPUTE_TOLERANCE)
    tol = relative * max(scale, 1.0)
    agree = float((candidate.argmax(-1) == reference.argmax(-1)).float().mean())
    result = VerifyResult(diff, scale, tol, agree, computed_in)
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


def report_verification(result: VerifyResult | None, asked: bool) -> None:
    """Print a verb's `verify:` line: the result, or that the check was skipped (nothing when not asked)."""
    if result is not None:
        print(f"verify: {result.summary()}")
    elif asked:
        print("verify: skipped, the model does not fit in memory (see the warning above)")
