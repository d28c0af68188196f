"""`export --imatrix-data`: the importance matrix computed with torch is llama.cpp's GGUF imatrix format (read
back by read_imatrix, accepted by llama_model_quantize) and holds the squared input activations of each
weight, equal to an independent computation from the model's hidden states."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGUFReader

from lorakit.export.imatrix import calibration_chunks, compute_imatrix
from lorakit.export.quantize import read_imatrix
from lorakit.export.run import export_model
from lorakit.models import load_model, load_tokenizer
from tiny_models import make_tiny_llama

DATA = Path(__file__).resolve().parents[1] / "data" / "c4_demo.jsonl"


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("im") / "m", hidden_size=256, intermediate_size=512, heads=4,
                           kv_heads=2, seed=8)


def test_imatrix_file_format_and_values(model, tmp_path):
    out = tmp_path / "im.gguf"
    summary = compute_imatrix(model, DATA, out, chunk_size=32, max_chunks=3)
    assert (summary.chunks, summary.tokens, summary.tensors) == (3, 96, 2 * 7)
    reader = GGUFReader(str(out))
    fields = {k: f.contents() for k, f in reader.fields.items()}
    assert fields["general.type"] == "imatrix" and "general.architecture" not in fields
    assert fields["imatrix.chunk_count"] == 3 and fields["imatrix.chunk_size"] == 32
    assert fields["imatrix.datasets"] == ["c4_demo.jsonl"]
    raw = {t.name: np.asarray(t.data, dtype=np.float32).reshape(-1) for t in reader.tensors}
    assert all(raw[n].tolist() == [96.0] for n in raw if n.endswith(".counts"))
    values = read_imatrix(out)  # as the quantizer gets them: in_sum2 / counts
    assert set(values) == {f"blk.{i}.{w}.weight" for i in range(2) for w in
                           ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")}
    assert values["blk.0.ffn_down.weight"].shape == (512,) and values["blk.1.attn_q.weight"].shape == (256,)

    # independently: the q/k/v input of layer i is input_layernorm(hidden state entering layer i), the
    # gate/up input is the same for both; mean of squares over the 96 tokens
    tok = load_tokenizer(model, add_pad_token=False)
    chunks = calibration_chunks(tok, DATA, 32, 3)
    hf = load_model(model, "float32").eval()
    sq = [torch.zeros(256, dtype=torch.float64) for _ in range(2)]
    with torch.no_grad():
        for chunk in chunks:
            hidden = hf(input_ids=torch.tensor([chunk]), output_hidden_states=True).hidden_states
            for i, layer in enumerate(hf.model.layers):
                sq[i] += layer.input_layernorm(hidden[i])[0].double().pow(2).sum(0)
    for i in range(2):
        want = (sq[i] / 96).float().numpy()
        for w in ("attn_q", "attn_k", "attn_v"):
            np.testing.assert_allclose(values[f"blk.{i}.{w}.weight"], want, rtol=1e-5)
        np.testing.assert_array_equal(values[f"blk.{i}.ffn_gate.weight"], values[f"blk.{i}.ffn_up.weight"])
        assert not np.allclose(values[f"blk.{i}.attn_output.weight"], values[f"blk.{i}.attn_q.weight"][:256])


def test_imatrix_is_accepted_by_llama_cpps_quantizer_and_changes_the_rounding(model, tmp_path):
    imatrix = tmp_path / "im.gguf"
    compute_imatrix(model, DATA, imatrix, chunk_size=64, max_chunks=2)
    plain, weighted = tmp_path / "plain.gguf", tmp_path / "weighted.gguf"
    export_model(str(model), "gguf", plain, "q4_k_m", verify=False)
    result = export_model(str(model), "gguf", weighted, "q4_k_m", imatrix=imatrix)
    assert result.verify.max_abs_diff <= result.verify.tolerance
    a = {t.name: bytes(t.data) for t in GGUFReader(str(plain)).tensors}
    b = {t.name: bytes(t.data) for t in GGUFReader(str(weighted)).tensors}
    assert a["blk.0.attn_q.weight"] != b["blk.0.attn_q.weight"] and a["blk.1.ffn_down.weight"] != b[
        "blk.1.ffn_down.weight"]


def test_cli_imatrix_data(model, tmp_path):
    out = tmp_path / "m.gguf"
    cmd = [sys.executable, "-m", "lorakit", "export", "--model", str(model), "--output", str(out), "--outtype",
           "q4_k_m", "--imatrix-data", str(DATA), "--imatrix-chunks", "2"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    saved = tmp_path / "m.gguf.imatrix.gguf"
    assert out.is_file() and saved.is_file() and "importance matrix: 14 weights, 2 chunks" in run.stdout
    assert len(read_imatrix(saved)) == 14
    for extra, message in [(["--imatrix", str(saved)], "not both"), (["--outtype", "f16"], "--imatrix-data applies")]:
        run = subprocess.run([*cmd, *extra, "--overwrite"], capture_output=True, text=True, timeout=120)
        assert run.returncode == 2 and message in run.stderr, run.stderr
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=120)  # output exists: refused before work
    assert run.returncode == 2 and "exists" in run.stderr and "importance matrix" not in run.stdout
