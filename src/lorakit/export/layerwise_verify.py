"""`export --verify` for GGUF and Meta pth: the written file against the source HF folder, layer by layer.

The written file is read back one tensor at a time (export/gguf_weights.py, checkpoint/weight_sources.py),
the source folder likewise (checkpoint/layerwise.FolderSource), and `checkpoint.layerwise.verify_layerwise`
runs the same hidden states through one decoder layer of each at a time, then the head: the check's
memory is about one layer, whatever the size of the model. For a GGUF, cheap checks of the header come
first: every tensor is one the family has, `rope_freqs` matches the config's RoPE scaling, the
hyper-parameters llama.cpp reads equal the config's, and llama.cpp itself accepts the file's metadata
and vocabulary (a `vocab_only` load: no weights are read, so it costs no memory).

Quantized types (export/quantize.py) round each weight by up to several percent, so their layer
tolerances are wider (`QUANT_LAYER_TOLERANCE`); each weight's relative error ||read - source|| /
||source|| is checked too, against the type's `QuantType.tolerance` (a wrong layout or tensor gives > 1).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lorakit.checkpoint.layerwise import FolderSource, verify_layerwise
from lorakit.checkpoint.verify import VerificationError, VerifyResult
from lorakit.export.gguf_metadata import rope_factors
from lorakit.export.gguf_weights import GGUFWeights
from lorakit.models.families import rope_parameters

if TYPE_CHECKING:
    import torch

log = logging.getLogger("lorakit")

# Allowed max |difference| of a layer's attention / MLP / whole contribution relative to its largest
# |reference| value (checkpoint/layerwise.py), for llama.cpp's quantized types: ~2x the largest measured
# over tiny random LLaMA-2/LLaMA-3/Qwen2/Qwen3/Gemma 3 models (64-wide rows: k-quants fall back to
# legacy types there) and a LLaMA with 256-wide rows (k-quants applied):
#   q4_0 0.30, q4_1 0.26, q5_0 0.13, q5_1 0.14, q4_k_m 0.17, q5_k_m 0.14, q6_k 0.05.
# The logits' tolerance is quantize.LOGIT_TOLERANCE. A missing q/k permutation gives a weight error of ~1.4
# (checked per tensor as well, against QuantType.tolerance).
QUANT_LAYER_TOLERANCE = {"q4_0": 0.6, "q4_1": 0.5, "q5_0": 0.3, "q5_1": 0.3, "q4_k_m": 0.35, "q5_k_m": 0.3,
                         "q6_k": 0.12}
ROWS_PER_STEP = 4096  # rows compared at a time by the per-weight error (fp32 temporaries of that size)


def _config(src: Path) -> dict[str, Any]:
    return json.loads((src / "config.json").read_text())


def _vocab_rows(reference: FolderSource) -> int:
    return int(reference.folder.shape("model.embed_tokens.weight")[0])


def verify_gguf_layerwise(src: Path, gguf: Path, dtype: str) -> VerifyResult:
    """Verify the GGUF `gguf` (any type lorakit writes, `dtype`) written from the HF folder `src`; raises
    VerificationError naming the layer or tensor that differs."""
    from lorakit.export.quantize import LOGIT_TOLERANCE, QUANT_TYPES

    config = _config(src)
    what = f"GGUF {dtype}"
    written = GGUFWeights(gguf, config)
    check_gguf_header(written, config, what)
    reference = FolderSource(src)
    try:
        if dtype in QUANT_TYPES:
            last = LastRead(reference)
            errors = WeightErrors(written, last, QUANT_TYPES[dtype].tolerance, what)
            # stored type "q8_0" names the family of block types; both tolerances are given explicitly
            result = verify_layerwise(what, config, last, errors, "q8_0", _vocab_rows(reference),
                                      relative=QUANT_LAYER_TOLERANCE[dtype], logit_relative=LOGIT_TOLERANCE)
            result = dataclasses.replace(result, weight_error=errors.worst())
        else:
            result = verify_layerwise(what, config, reference, written, dtype, _vocab_rows(reference))
    finally:
        reference.close()
    llamacpp_accepts(gguf, what)
    return result


def verify_pth_layerwise(src: Path, folder: Path, dtype: str) -> VerifyResult:
    """Verify the Meta pth folder `folder` written from the HF folder `src` as `dtype` (f32/f16/bf16)."""
    from lorakit.checkpoint.weight_sources import PthWeights

    config = _config(src)
    written = PthWeights(folder, config)
    reference = FolderSource(src)
    try:
        return verify_layerwise("pth", config, reference, written, dtype, _vocab_rows(reference))
    finally:
        reference.close()
        written.close()


def check_gguf_header(written: GGUFWeights, config: dict[str, Any], what: str) -> None:
    """Tensors no HF parameter maps to, `rope_freqs` against the config's RoPE scaling, and the
    hyper-parameters llama.cpp reads against the config's (read back here, not from the writer's code)."""
    if written.unknown:
        raise VerificationError(f"{what}: verification FAILED: tensors a {written.family.name} model does not "
                                f"have: {', '.join(written.unknown[:5])}")
    problem = written.check_rope_freqs(rope_factors(config))
    if problem:
        raise VerificationError(f"{what}: verification FAILED: {problem}")
    arch = written.arch
    config = {**dict(written.family.gguf_config_defaults), **{k: v for k, v in config.items() if v is not None}}
    heads = int(config["num_attention_heads"])
    expected: dict[str, Any] = {
        "block_count": config["num_hidden_layers"], "embedding_length": config["hidden_size"],
        "feed_forward_length": config["intermediate_size"], "attention.head_count": heads,
        "attention.head_count_kv": config.get("num_key_value_heads") or heads,
        "attention.layer_norm_rms_epsilon": config.get("rms_norm_eps"),
        "rope.freq_base": rope_parameters(config).get("rope_theta"),
    }
    if config.get("head_dim") and int(config["head_dim"]) * heads != int(config["hidden_size"]):
        expected["attention.key_length"] = config["head_dim"]
    for key, want in expected.items():
        got = written.fields.get(f"{arch}.{key}")
        if want is None:
            continue
        same = got is not None and (math.isclose(float(got), float(want), rel_tol=1e-6) if isinstance(want, float)
                                    else int(got) == int(want))
        if not same:
            raise VerificationError(f"{what}: verification FAILED: GGUF key {arch}.{key} is {got!r}, the model's "
                                    f"config says {want!r}")


def llamacpp_accepts(gguf: Path, what: str) -> None:
    """llama.cpp loads the file's metadata, hyper-parameters and vocabulary (`vocab_only`: no weights are
    read); skipped when llama-cpp-python is not installed."""
    import importlib.util
    import os

    if importlib.util.find_spec("llama_cpp") is None:
        log.info("%s: llama-cpp-python not installed: llama.cpp's own load of the file not checked", what)
        return
    from lorakit.models.llamacpp import llama_cpp_module

    lc = llama_cpp_module()
    params = lc.llama_model_default_params()
    params.vocab_only = True
    model = lc.llama_model_load_from_file(os.fsencode(gguf), params)
    if not model:
        raise VerificationError(f"{what}: verification FAILED: llama.cpp cannot load {gguf.name}'s metadata and "
                                "vocabulary")
    lc.llama_model_free(model)


class LastRead:
    """The reference source, keeping the tensor it handed out last: the layer walk reads each reference
    tensor just before the written one, so the per-weight check finds the embeddings and the head there
    instead of holding a second copy of them."""

    def __init__(self, reference: FolderSource):
        self.reference, self.folder = reference, reference.folder
        self.last: tuple[str, torch.Tensor] | None = None

    def names(self):
        return self.reference.names()

    def get(self, name: str) -> torch.Tensor:
        self.last = None  # dropped before the next one is read
        self.last = (name, self.reference.get(name))
        return self.last[1]

    def peek(self, name: str) -> torch.Tensor:
        """Tensor `name`: the one read last if it is that one, else read now (and not kept)."""
        return self.last[1] if self.last is not None and self.last[0] == name else self.reference.get(name)


class WeightErrors:
    """A WeightSource passing `written` through that checks each tensor's relative error against the same
    tensor of `reference` (read again, compared ROWS_PER_STEP rows at a time in fp32) as it is read:
    VerificationError naming the weight above `tolerance`."""

    def __init__(self, written: GGUFWeights, reference: LastRead, tolerance: float, what: str):
        self.written, self.reference, self.tolerance, self.what = written, reference, tolerance, what
        self.errors: dict[str, float] = {}

    def names(self):
        return self.written.names()

    def get(self, name: str) -> torch.Tensor:
        w = self.written.get(name)
        ref_name = name if name in self.reference.folder else "model.embed_tokens.weight"
        if name not in self.errors and ref_name in self.reference.folder:
            error = self.errors[name] = relative_error(w, self.reference.peek(ref_name))
            if not error <= self.tolerance:
                raise VerificationError(f"{self.what}: verification FAILED: weight {name} differs from the source "
                                        f"by {error:.3f} (relative; tolerance {self.tolerance})")
        return w

    def worst(self) -> float:
        """The largest error seen (logged)."""
        worst = max(self.errors, key=self.errors.__getitem__)
        log.info("%s: largest relative weight rounding %.4f (%s)", self.what, self.errors[worst], worst)
        return self.errors[worst]


def relative_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    """||got - ref|| / ||ref|| (Frobenius), in fp32 row chunks; inf for a shape mismatch."""
    if got.shape != ref.shape:
        return math.inf
    num = den = 0.0
    for r in range(0, ref.shape[0], ROWS_PER_STEP):
        a, b = ref[r:r + ROWS_PER_STEP].float(), got[r:r + ROWS_PER_STEP].float()
        num += float((b - a).pow(2).sum())
        den += float(a.pow(2).sum())
    return math.sqrt(num) / max(math.sqrt(den), 1e-12)
