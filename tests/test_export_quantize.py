"""Quantized GGUF types made by llama.cpp's quantizer, verified by llama.cpp's logits against the HF model."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFReader

from lorakit.checkpoint.verify import VerificationError
from lorakit.export.quantize import LOGIT_TOLERANCE, QUANT_TYPES
from lorakit.export.run import export_model
from tiny_models import make_tiny_llama

# llama.cpp's name of the type most 2-D weights get (k-quant mixes keep a few at a higher type)
MAIN_TYPE = {"q4_0": "Q4_0", "q4_1": "Q4_1", "q5_0": "Q5_0", "q5_1": "Q5_1", "q4_k_m": "Q4_K", "q5_k_m": "Q5_K",
             "q6_k": "Q6_K"}


@pytest.fixture(scope="module")
def model256(tmp_path_factory) -> Path:
    """Rows of 256 (k-quant blocks are 256 wide, so every type is really applied, no fallback)."""
    return make_tiny_llama(tmp_path_factory.mktemp("q") / "m", hidden_size=256, intermediate_size=512, heads=4,
                           kv_heads=2, seed=5)


def _types(path: Path) -> dict[str, str]:
    return {t.name: t.tensor_type.name for t in GGUFReader(str(path)).tensors}


@pytest.mark.parametrize("qtype", list(QUANT_TYPES))
def test_each_quantized_type_is_written_loads_in_llama_cpp_and_verifies(model256, tmp_path, qtype):
    out = tmp_path / f"m-{qtype}.gguf"
    result = export_model(str(model256), "gguf", out, qtype)
    v = result.verify
    assert v is not None and 0 < v.max_abs_diff <= v.tolerance  # llama.cpp loaded it and computed logits
    assert v.tolerance == pytest.approx(LOGIT_TOLERANCE * max(v.max_abs_logit, 1.0))
    assert 0 < v.weight_error <= QUANT_TYPES[qtype].tolerance  # the file's weights, dequantized by gguf-py
    types = _types(out)
    assert types["blk.0.attn_q.weight"] == MAIN_TYPE[qtype]
    assert types["blk.0.attn_norm.weight"] == "F32"
    assert [p.name for p in tmp_path.iterdir()] == [out.name]  # the float intermediate is gone


def test_quantized_verification_is_not_vacuous(model256, tmp_path, monkeypatch):
    """A GGUF with q/k left in HF order (a layout bug) is caught: its weights, read back, are not the source's
    (relative error 1.39 measured, vs 0.09 for q4_0's rounding), and nothing is left behind."""
    import lorakit.export.gguf_writer as writer

    monkeypatch.setattr(writer, "hf_to_meta_rows", lambda w, heads: w)
    with pytest.raises(VerificationError, match="FAILED: weight model.layers.0.self_attn.q_proj.weight"):
        export_model(str(model256), "gguf", tmp_path / "bad.gguf", "q4_0")
    assert not list(tmp_path.iterdir())


def _write_imatrix(path: Path, model_gguf: Path, seed: int = 0) -> None:
    """A GGUF imatrix in llama.cpp's format: per weight, `.in_sum2` (columns) and `.counts` (1 expert)."""
    from gguf import GGUFWriter

    rng = np.random.default_rng(seed)
    w = GGUFWriter(str(path), arch="")
    w.add_type("imatrix")
    w.add_uint32("imatrix.chunk_count", 4)
    w.add_uint32("imatrix.chunk_size", 512)
    w.add_array("imatrix.datasets", ["synthetic"])
    for t in GGUFReader(str(model_gguf)).tensors:
        if len(t.shape) == 2 and t.name.startswith("blk."):
            cols = int(t.shape[0])  # GGUF lists the row length first
            w.add_tensor(t.name + ".in_sum2", (rng.random(cols, dtype=np.float32) ** 4 * 2048).astype(np.float32))
            w.add_tensor(t.name + ".counts", np.array([2048.0], dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_importance_matrix_is_used(model256, tmp_path):
    plain = tmp_path / "plain.gguf"
    export_model(str(model256), "gguf", plain, "q4_k_m")
    imatrix = tmp_path / "imatrix.gguf"
    _write_imatrix(imatrix, plain)
    weighted = tmp_path / "weighted.gguf"
    result = export_model(str(model256), "gguf", weighted, "q4_k_m", imatrix=imatrix)
    assert result.verify.max_abs_diff <= result.verify.tolerance
    a = {t.name: bytes(t.data) for t in GGUFReader(str(plain)).tensors}
    b = {t.name: bytes(t.data) for t in GGUFReader(str(weighted)).tensors}
    assert a["blk.0.attn_q.weight"] != b["blk.0.attn_q.weight"]  # a different rounding was chosen
    assert a["blk.0.attn_norm.weight"] == b["blk.0.attn_norm.weight"]


def test_cli_quantized_export_and_refusals(model256, tmp_path):
    import subprocess

    out = tmp_path / "cli.gguf"
    run = subprocess.run([sys.executable, "-m", "lorakit", "export", "--model", str(model256), "--output", str(out),
                          "--outtype", "q5_k_m"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "verify: max |logit diff|" in run.stdout and _types(out)["blk.1.ffn_down.weight"] in ("Q5_K", "Q6_K")
    for args, message in [(["--format", "pth", "--outtype", "q4_0"], "only for --format gguf"),
                          (["--outtype", "f16", "--imatrix", str(out)], "--imatrix applies to")]:
        run = subprocess.run([sys.executable, "-m", "lorakit", "export", "--model", str(model256), "--output",
                              str(tmp_path / "x"), *args], capture_output=True, text=True, timeout=120)
        assert run.returncode == 2 and message in run.stderr, run.stderr
        assert not (tmp_path / "x").exists()
    bad = tmp_path / "not-imatrix.gguf"
    bad.write_bytes(b"nonsense")
    run = subprocess.run([sys.executable, "-m", "lorakit", "export", "--model", str(model256), "--output",
                          str(tmp_path / "y.gguf"), "--outtype", "q4_0", "--imatrix", str(bad)],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "not a GGUF imatrix file" in run.stderr and not (tmp_path / "y.gguf").exists()
