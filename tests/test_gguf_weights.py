"""GGUF files read back tensor by tensor (export/gguf_weights.py) and `export --verify` layer by layer
(export/layerwise_verify.py): every HF tensor comes back equal to the source, and faults planted in a
written GGUF are caught, naming the layer or tensor."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from lorakit.checkpoint.verify import VerificationError
from lorakit.checkpoint.weight_sources import interleaved_to_half_rows
from lorakit.export.gguf_weights import GGUFWeights
from lorakit.export.gguf_writer import write_gguf
from lorakit.export.run import verify_gguf
from lorakit.formats.safetensors_io import SafetensorsFolder
from lorakit.models.layout import hf_to_meta_rows, meta_to_hf_rows
from tiny_models import make_tiny_family

CASES = ("llama2", "llama3", "qwen2", "qwen3", "gemma3")


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf_weights")
    built: dict[str, Path] = {}

    def get(case: str) -> Path:
        if case not in built:
            built[case] = make_tiny_family(root / case, case, root / "tokenizer", seed=CASES.index(case) + 10)
        return built[case]

    return get


def _config(src: Path) -> dict:
    return json.loads((src / "config.json").read_text())


def test_inverse_permutation_is_llama_cpps_row_order_undone():
    """Row 2i + j of a stored head is HF's row j * head_dim/2 + i (llama.cpp's converter), written out."""
    heads, head_dim, cols = 3, 8, 5
    w = torch.randn(heads * head_dim, cols)
    stored = hf_to_meta_rows(w, heads)
    for h in range(heads):
        for i in range(head_dim // 2):
            for j in range(2):
                assert torch.equal(stored[h * head_dim + 2 * i + j], w[h * head_dim + j * head_dim // 2 + i])
    assert torch.equal(interleaved_to_half_rows(stored, heads), w)
    assert torch.equal(interleaved_to_half_rows(stored, heads), meta_to_hf_rows(stored, heads))
    bias = torch.randn(heads * head_dim)
    assert torch.equal(interleaved_to_half_rows(hf_to_meta_rows(bias, heads), heads), bias)


# every family exactly (f32); each stored type on two families (the read path is per type, not per family)
READ_BACK = [(c, "f32") for c in CASES] + [("llama2", "f16"), ("gemma3", "f16"), ("qwen2", "bf16"),
                                           ("llama3", "bf16"), ("llama2", "q8_0"), ("qwen3", "q8_0")]


@pytest.mark.parametrize(("case", "dtype"), READ_BACK)
def test_every_tensor_reads_back_as_the_source(family, tmp_path, case, dtype):
    src = family(case)
    out = tmp_path / "m.gguf"
    write_gguf(src, out, dtype)
    st = SafetensorsFolder(src)
    got = GGUFWeights(out, _config(src))
    assert set(got.names()) == set(st.names) and not got.unknown
    shift = got.family.gguf_norm_shift
    for name in st.names:
        ref, back = st.get(name), got.get(name)
        assert back.shape == ref.shape, name
        if ref.dim() == 1 or dtype == "f32":  # norms and biases stay F32: exact (Gemma's 1 + w - 1: rounding)
            torch.testing.assert_close(back.float(), ref.float(), rtol=0, atol=1e-6 if shift else 0)
        elif dtype in ("f16", "bf16"):  # exactly the source rounded to the stored type
            assert back.dtype == getattr(torch, {"f16": "float16", "bf16": "bfloat16"}[dtype])
            assert torch.equal(back, ref.to(back.dtype)), name
        else:  # q8_0: half an 8-bit step of each 32-block's scale, plus the f16 rounding of that scale
            step = ref.reshape(-1, 32).abs().amax(-1, keepdim=True) / 127
            assert ((back - ref).reshape(-1, 32).abs() <= step * 0.6 + 1e-7).all(), name
    config = _config(src)
    if config.get("tie_word_embeddings"):
        assert torch.equal(got.get("lm_head.weight"), got.get("model.embed_tokens.weight"))
    from lorakit.export.gguf_metadata import rope_factors

    assert got.check_rope_freqs(rope_factors(config)) is None
    assert (got.check_rope_freqs(None) is None) == (case != "llama3")


def test_quantized_tensors_read_in_chunks_equal_gguf_py_whole(family, tmp_path, monkeypatch):
    """The chunked os.preadv reads give what gguf-py's own reader dequantizes from its memory map."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    import lorakit.export.gguf_weights as gw
    from lorakit.export.quantize import quantize_gguf

    src = family("llama2")
    f16, out = tmp_path / "m-f16.gguf", tmp_path / "m.gguf"
    write_gguf(src, f16, "f16")
    quantize_gguf(f16, out, "q4_0")
    monkeypatch.setattr(gw, "CHUNK_ELEMENTS", 3 * 64)  # a few rows per step, a last partial step
    got = GGUFWeights(out, _config(src))
    for t in GGUFReader(str(out)).tensors:
        whole = torch.from_numpy(np.array(dequantize(t.data, t.tensor_type))).float()
        assert torch.equal(got.read_stored(got.tensors[t.name]).float().reshape(whole.shape), whole), t.name
    assert "Q4_0" in {t.tensor_type.name for t in GGUFReader(str(out)).tensors}


def test_header_reader_agrees_with_gguf_py(family, tmp_path):
    """The header read by models/headers.py gives gguf-py's GGUFReader's keys, values,
    tensor types, shapes and offsets; a truncated file is refused in one line."""
    from gguf import GGUFReader

    from lorakit.errors import DamagedFileError
    from lorakit.export.gguf_weights import read_layout

    src = family("gemma3")
    out = tmp_path / "m.gguf"
    write_gguf(src, out, "q8_0")
    fields, tensors = read_layout(out)
    reader = GGUFReader(str(out))
    skip = ("tokenizer.ggml.", "GGUF.")
    assert fields == {k: f.contents() for k, f in reader.fields.items() if not k.startswith(skip)}
    assert "tokenizer.chat_template" in fields or "general.architecture" in fields
    assert len(tensors) == len(reader.tensors)
    for t in reader.tensors:
        s = tensors[t.name]
        assert (s.qtype, s.shape, s.offset, s.nbytes) == (t.tensor_type, tuple(reversed(t.shape.tolist())),
                                                           t.data_offset, t.n_bytes)
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(out.read_bytes()[: out.stat().st_size - 100])
    with pytest.raises(DamagedFileError, match="truncated"):
        read_layout(cut)


def test_the_file_is_not_left_mapped(family, tmp_path):
    """Bounded memory: a mapped file's touched pages would count as resident; nothing keeps it mapped."""
    src = family("qwen2")
    out = tmp_path / "m.gguf"
    write_gguf(src, out, "f16")
    got = GGUFWeights(out, _config(src))
    for name in got.names():
        got.get(name)
    assert str(out) not in Path("/proc/self/maps").read_text()


# --------------------------------------------------------------------------------- planted faults


def _plant(path: Path, weights: GGUFWeights, gguf_name: str, stored: torch.Tensor) -> None:
    """Overwrite one F32/F16 tensor of the file in place with `stored` (GGUF layout)."""
    from gguf import GGMLQuantizationType as Q

    info = weights.tensors[gguf_name]
    np_type = {Q.F32: np.float32, Q.F16: np.float16}[info.qtype]
    data = stored.detach().float().numpy().astype(np_type).tobytes()
    assert len(data) == info.nbytes
    with open(path, "r+b") as f:
        f.seek(info.offset)
        f.write(data)


def _written(family, tmp_path, case: str, dtype: str = "f16") -> tuple[Path, Path, GGUFWeights]:
    src = family(case)
    out = tmp_path / f"{case}.gguf"
    write_gguf(src, out, dtype)
    assert verify_gguf(src, out, dtype).max_abs_diff >= 0  # the file as written passes
    return src, out, GGUFWeights(out, _config(src))


def _stored(w: GGUFWeights, name: str) -> torch.Tensor:
    return w.read_stored(w.tensors[name]).float()


def test_missing_qk_permutation_in_one_layer_is_caught(family, tmp_path):
    src, out, w = _written(family, tmp_path, "llama2")
    heads = _config(src)["num_attention_heads"]
    _plant(out, w, "blk.1.attn_q.weight", interleaved_to_half_rows(_stored(w, "blk.1.attn_q.weight"), heads))
    with pytest.raises(VerificationError, match="layer 1 attention output differs"):
        verify_gguf(src, out, "f16")


def test_two_swapped_tensors_are_caught(family, tmp_path):
    src, out, w = _written(family, tmp_path, "qwen3")
    a, b = _stored(w, "blk.0.ffn_down.weight"), _stored(w, "blk.1.ffn_down.weight")
    _plant(out, w, "blk.0.ffn_down.weight", b)
    _plant(out, w, "blk.1.ffn_down.weight", a)
    with pytest.raises(VerificationError, match="layer 0 mlp output differs"):
        verify_gguf(src, out, "f16")


def test_a_scaled_tensor_is_caught(family, tmp_path):
    src, out, w = _written(family, tmp_path, "qwen2")
    _plant(out, w, "blk.1.attn_output.weight", _stored(w, "blk.1.attn_output.weight") * 1.1)
    with pytest.raises(VerificationError, match="layer 1 attention output differs"):
        verify_gguf(src, out, "f16")


def test_a_wrong_norm_shift_is_caught(family, tmp_path):
    src, out, w = _written(family, tmp_path, "gemma3")
    _plant(out, w, "blk.1.attn_norm.weight", _stored(w, "blk.1.attn_norm.weight") - 1)  # w stored, not 1 + w
    with pytest.raises(VerificationError, match="layer 1 attention output differs"):
        verify_gguf(src, out, "f16")


def test_wrong_rope_freqs_and_hyper_parameters_are_caught(family, tmp_path):
    from lorakit.export.layerwise_verify import check_gguf_header

    src, out, w = _written(family, tmp_path, "llama3", "f32")
    config = _config(src)
    w.fields["llama.attention.head_count_kv"] = 4
    with pytest.raises(VerificationError, match="llama.attention.head_count_kv is 4"):
        check_gguf_header(w, config, "GGUF")
    _plant(out, w, "rope_freqs.weight", _stored(w, "rope_freqs.weight") * 2)
    with pytest.raises(VerificationError, match="rope_freqs.weight differs"):
        verify_gguf(src, out, "f32")


def test_quantized_file_with_a_wrong_tensor_names_the_weight(family, tmp_path):
    """q4_0: the per-weight error (rounding ~0.09) catches a tensor from the wrong layer (~1.4)."""
    from lorakit.export.quantize import quantize_gguf

    src = family("llama2")
    f16, out = tmp_path / "m-f16.gguf", tmp_path / "m.gguf"
    write_gguf(src, f16, "f16")
    w = GGUFWeights(f16, _config(src))
    _plant(f16, w, "blk.1.ffn_up.weight", _stored(w, "blk.0.ffn_up.weight"))
    quantize_gguf(f16, out, "q4_0")
    with pytest.raises(VerificationError, match="weight model.layers.1.mlp.up_proj.weight differs"):
        verify_gguf(src, out, "q4_0")
