"""Layer-by-layer verification of a written model against a reference, in the memory of one layer.

`verify_layerwise` builds the model class of a config on the `meta` device (no weights), then walks
it: the embeddings (every row, in chunks, so resized or extended rows are checked), then each decoder
layer in turn, then the final norm and the head. A layer is materialized from the reference source,
run on the current hidden states [n, length, hidden] and freed; then the same layer from the written
source runs on the same hidden states, and their attention, MLP and whole-layer contributions
(output - input) are compared relative to the reference contribution's largest value. The reference
output feeds the next layer (teacher forcing), so an error is found in the layer that makes it and
does not pile up. Everything is computed in fp32 with transformers' own layer and rotary modules, and
each layer is called with the exact arguments the model's own forward pass gives it (captured once),
so sliding-window layers and per-layer-type rotary (Gemma 3) work as in the model.

Peak memory: one decoder layer in fp32 (~0.8 GB for a 7B LLaMA) plus the largest tensor being read,
plus the head read in row chunks; independent of the number of layers.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Protocol

from lorakit.checkpoint.skeleton import decoder_stack, layer_arguments, skeleton
from lorakit.checkpoint.verify import VerificationError, VerifyResult, probe_ids
from lorakit.precision import weight_type as stored_type

if TYPE_CHECKING:
    import torch
    from transformers import PretrainedConfig

log = logging.getLogger("lorakit")

EMBED, HEAD = "embed_tokens.weight", "lm_head.weight"
# Allowed max |difference| of a layer's attention/MLP/total contribution, relative to the largest
# |reference contribution| of that layer, by stored weight type (precision.WEIGHT_TYPES names).
# The same limits apply to the head's logits (relative to the largest |reference logit|): with teacher
# forcing they only see the head's and final norm's own rounding. Measured on tiny random LLaMA, Qwen2,
# Qwen3 and Gemma 3 models (f32 -> bf16: 5e-3..7.3e-3 of the scale, f16: 6e-4..1e-3; f32: < 1e-6); a
# dropped adapter delta 5% of its weight's size gives > 3e-2, a swapped or row-shuffled weight ~1.
LAYER_TOLERANCE = {"f32": 1e-4, "f16": 4e-3, "bf16": 2e-2, "q8_0": 6e-2}
# Positions run through each layer: one row of fixed random ids. The compute of a check is about
# 2 x params x tokens x 2 flops (a 7B model: 0.9 TFLOP at 16 tokens); every weight is exercised by
# 16 different inputs and the rotary angles of 16 positions (more than a tiny test's sliding window).
PROBE_LENGTH = 16
# Rows of the head (or embeddings) converted to fp32 at a time: 4096 rows x 4096 x 4 bytes = 64 MB.
CHUNK_ROWS = 4096


class WeightSource(Protocol):
    """Hugging Face-named tensors of one model, read one at a time."""

    def names(self) -> Iterable[str]:
        """The Hugging Face parameter names this source has."""
        ...

    def get(self, name: str) -> torch.Tensor:
        """The tensor `name` in Hugging Face layout (any float dtype; the caller casts)."""
        ...


class FolderSource:
    """A WeightSource over a Hugging Face safetensors folder (tensors read one at a time, unmapped)."""

    def __init__(self, folder: Any):
        from lorakit.formats.safetensors_io import SafetensorsFolder

        self.folder = SafetensorsFolder(folder)

    def names(self) -> list[str]:
        return self.folder.names

    def get(self, name: str) -> torch.Tensor:
        return self.folder.get(name)  # KeyError for a name the folder lacks

    def close(self) -> None:
        self.folder.close()


def _materialize(module, prefix: str, source: WeightSource, side: str, pool: dict | None = None):
    """A copy of meta `module` holding `source`'s tensors `prefix + key` in fp32, copied into the
    buffers of `pool` (by key; reused from layer to layer and by both sides, which run one after the
    other: one layer of fp32 buffers in all, and no fresh memory per layer, whose page faults took as
    long as the check itself)."""
    import torch

    copy_ = copy.deepcopy(module)
    state = {}
    pool = {} if pool is None else pool
    for key, meta in module.state_dict().items():
        try:
            w = source.get(prefix + key)
        except KeyError:
            raise VerificationError(f"the {side} model has no tensor {prefix + key}") from None
        if w.shape != meta.shape:
            raise VerificationError(f"the {side} model's {prefix + key} has shape {list(w.shape)}, the config "
                                    f"gives {list(meta.shape)}")
        buf = pool.get(key)
        if buf is None or buf.shape != w.shape:
            buf = pool[key] = torch.empty(w.shape, dtype=torch.float32)
        state[key] = buf.copy_(w)
        del w
    copy_.load_state_dict(state, assign=True, strict=True)
    return copy_


def _check(where: str, ref: torch.Tensor, got: torch.Tensor, relative: float, what: str) -> float:
    """Raise VerificationError naming `where` when got differs from ref by more than relative * scale."""
    if got.shape != ref.shape:
        raise VerificationError(f"{what}: {where}: shape {list(got.shape)} != reference {list(ref.shape)}")
    diff, scale = float((got - ref).abs().max()), float(ref.abs().max())
    tol = relative * max(scale, 1e-6)
    if not diff <= tol:  # NaN fails too
        raise VerificationError(f"{what}: verification FAILED: {where} differs: max |diff| {diff:.3g} "
                                f"(tolerance {tol:.3g}, max |reference| {scale:.3g})")
    return diff / max(scale, 1e-12)


def _run_layer(layer, hidden: torch.Tensor, args: tuple, kwargs: dict) -> dict[str, torch.Tensor]:
    """Run one decoder layer, then free its weights; return its output and its attention and MLP
    sub-module outputs."""
    import torch

    seen: dict[str, torch.Tensor] = {}
    hooks = []
    for part in ("self_attn", "mlp"):
        sub = getattr(layer, part, None)
        if sub is not None:
            def keep(_m, _i, out, part=part):
                seen[part] = (out[0] if isinstance(out, tuple) else out).detach().clone()
            hooks.append(sub.register_forward_hook(keep))
    try:
        with torch.inference_mode():
            out = layer(hidden, *args, **kwargs)
    finally:
        for h in hooks:
            h.remove()
        layer.to("meta")  # free its weights now (the module sits in reference cycles until a gc)
    seen["output"] = out[0] if isinstance(out, tuple) else out
    return seen


def _compare_embeddings(reference: WeightSource, written: WeightSource, name: str, relative: float,
                        what: str) -> torch.Tensor:
    """Compare every row of the embedding matrices (in chunks); return the reference matrix as read."""
    import torch

    ref, got = reference.get(name), written.get(name)
    if got.shape != ref.shape:
        raise VerificationError(f"{what}: {name} has shape {list(got.shape)}, the reference {list(ref.shape)}")
    scale = max(float(ref[r:r + CHUNK_ROWS].abs().max()) for r in range(0, ref.shape[0], CHUNK_ROWS))
    for r in range(0, ref.shape[0], CHUNK_ROWS):
        a, b = ref[r:r + CHUNK_ROWS].to(torch.float32), got[r:r + CHUNK_ROWS].to(torch.float32)
        bad = ((b - a).abs() > relative * scale) | b.isnan()
        if bool(bad.any()):
            row = r + int(bad.any(dim=1).nonzero()[0])
            diff = float((b[row - r] - a[row - r]).abs().max())
            raise VerificationError(f"{what}: verification FAILED: embeddings ({name}) row {row} differs: "
                                    f"max |diff| {diff:.3g} (tolerance {relative * scale:.3g})")
    return ref


def verify_layerwise(what: str, config: PretrainedConfig | dict[str, Any], reference: WeightSource,
                     written: WeightSource, weight_type: str, vocab_size: int | None = None, *,
                     relative: float | None = None, logit_relative: float | None = None) -> VerifyResult:
    """Compare `written` with `reference` embeddings, layer by layer, then the head (see the module doc).

    `weight_type` (the written model's stored type) sets the tolerances: `relative` for embeddings and
    layer contributions (default LAYER_TOLERANCE), `logit_relative` for the logits (default the same) on
    fixed probe ids drawn from `vocab_size` rows (default the config's). Runs on one compute thread: the
    check is memory-bound, and a 1B-shaped check took 24-35 s with one thread, 40-62 s with two."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _verify(what, config, reference, written, weight_type, vocab_size, relative, logit_relative)
    finally:
        torch.set_num_threads(threads)


def _verify(what: str, config: PretrainedConfig | dict[str, Any], reference: WeightSource,
             written: WeightSource, weight_type: str, vocab_size: int | None, relative: float | None,
             logit_relative: float | None) -> VerifyResult:
    import torch
    from tqdm import tqdm

    kind = stored_type(weight_type).name
    relative = LAYER_TOLERANCE.get(kind, 1e-1) if relative is None else relative
    logit_relative = relative if logit_relative is None else logit_relative
    model = skeleton(config)
    inner, prefix = decoder_stack(model)
    cfg = model.config
    ids = probe_ids(vocab_size or cfg.vocab_size, n=1, length=PROBE_LENGTH)

    embed_name = prefix + EMBED
    ref_embed = _compare_embeddings(reference, written, embed_name, relative, what)
    uniq, inverse = ids.unique(return_inverse=True)
    embed = copy.deepcopy(inner.embed_tokens)
    embed.weight = torch.nn.Parameter(ref_embed[uniq].to(torch.float32), requires_grad=False)
    del ref_embed
    with torch.inference_mode():
        hidden = embed(inverse)  # [n, length, hidden], scaled as the model scales it (Gemma)
    calls = layer_arguments(inner, hidden)

    worst, pool = 0.0, {}
    steps = tqdm(zip(inner.layers, calls, strict=True), total=len(calls), desc="verifying", unit="layer", leave=False)
    for i, (layer, (args, kwargs)) in enumerate(steps):
        layer_prefix = f"{prefix}layers.{i}."
        ref = _run_layer(_materialize(layer, layer_prefix, reference, "reference", pool), hidden, args, kwargs)
        got = _run_layer(_materialize(layer, layer_prefix, written, "written", pool), hidden, args, kwargs)
        for part, label in (("self_attn", "attention output"), ("mlp", "mlp output")):
            if part in ref:
                worst = max(worst, _check(f"layer {i} {label}", ref[part], got.get(part, ref[part] * 0),
                                          relative, what))
        worst = max(worst, _check(f"layer {i} output", ref["output"] - hidden, got["output"] - hidden,
                                  relative, what))
        hidden = ref["output"]
        del ref, got

    pool.clear()
    result = _compare_head(model, inner, prefix, hidden, reference, written, logit_relative, what)
    log.info("%s: verified layer by layer (worst layer difference %.3g of its scale): %s", what, worst,
             result.summary())
    return result


def _head_name(source: WeightSource, prefix: str) -> str:
    return HEAD if HEAD in set(source.names()) else prefix + EMBED


def _compare_head(model, inner, prefix: str, hidden: torch.Tensor, reference: WeightSource,
                  written: WeightSource, relative: float, what: str) -> VerifyResult:
    """Final norm + head logits of both sides on the reference's last hidden states, the head read in
    row chunks of CHUNK_ROWS (fp32 logits [n, length, rows] at a time)."""
    import torch

    cap = getattr(model.config, "final_logit_softcapping", None)
    sides = []
    for source, side in ((reference, "reference"), (written, "written")):
        with torch.inference_mode():
            normed = _materialize(inner.norm, prefix + "norm.", source, side)(hidden)
        sides.append((normed, source.get(_head_name(source, prefix))))
    (h_ref, w_ref), (h_got, w_got) = sides
    if w_got.shape != w_ref.shape:
        raise VerificationError(f"{what}: the head has shape {list(w_got.shape)}, the reference {list(w_ref.shape)}")
    diff, scale = 0.0, 0.0
    best = [torch.full(hidden.shape[:-1], -float("inf")), torch.zeros(hidden.shape[:-1], dtype=torch.long)]
    best_got = [best[0].clone(), best[1].clone()]
    for r in range(0, w_ref.shape[0], CHUNK_ROWS):
        a = h_ref @ w_ref[r:r + CHUNK_ROWS].to(torch.float32).T
        b = h_got @ w_got[r:r + CHUNK_ROWS].to(torch.float32).T
        if cap:
            a, b = torch.tanh(a / cap) * cap, torch.tanh(b / cap) * cap
        d = (b - a).abs().max()
        diff = float("nan") if bool(d.isnan()) else max(diff, float(d))
        scale = max(scale, float(a.abs().max()))
        for (val, idx), logits in ((best, a), (best_got, b)):
            m, j = logits.max(-1)
            better = m > val
            val[better], idx[better] = m[better], j[better] + r
    tol = relative * scale
    agree = float((best[1] == best_got[1]).float().mean())
    result = VerifyResult(diff, scale, tol, agree)
    if not diff <= tol:
        raise VerificationError(f"{what}: verification FAILED: final norm / lm_head logits differ: {result.summary()}")
    return result
