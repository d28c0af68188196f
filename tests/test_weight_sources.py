"""Meta pth folders read back tensor by tensor (checkpoint/weight_sources.PthWeights) and `export --format
pth --verify` layer by layer: every HF tensor comes back equal to the source, planted faults are caught."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lorakit.checkpoint.pth import write_pth
from lorakit.checkpoint.verify import VerificationError
from lorakit.checkpoint.weight_sources import PthWeights
from lorakit.export.run import verify_pth
from lorakit.formats.safetensors_io import SafetensorsFolder, iter_tensors
from tiny_models import make_tiny_llama


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("pth_sources")
    return {"untied": make_tiny_llama(root / "untied", heads=4, kv_heads=2, seed=3),
            "tied": make_tiny_llama(root / "tied", heads=4, kv_heads=4, tie_word_embeddings=True, seed=4)}


def _write(src: Path, out: Path, shards: int = 1) -> dict:
    config = json.loads((src / "config.json").read_text())
    out.mkdir()
    write_pth(iter_tensors(SafetensorsFolder(src)), config, out, num_shards=shards)
    return config


@pytest.mark.parametrize(("shape", "shards"), [("untied", 1), ("untied", 2), ("tied", 1)])
def test_every_tensor_reads_back_as_the_source(models, tmp_path, shape, shards):
    src = models[shape]
    config = _write(src, tmp_path / "p", shards)
    st = SafetensorsFolder(src)
    got = PthWeights(tmp_path / "p", config)
    names = set(got.names())
    assert names == set(st.names) | {"lm_head.weight"}  # Meta's format always has its own output matrix
    for name in st.names:
        assert torch.equal(got.get(name), st.get(name)), name
    if config.get("tie_word_embeddings"):
        assert torch.equal(got.get("lm_head.weight"), st.get("model.embed_tokens.weight"))
    assert verify_pth(src, tmp_path / "p", "f32").max_abs_diff == 0
    got.close()
    assert str(tmp_path / "p") not in Path("/proc/self/maps").read_text()  # nothing left mapped


def _replace(folder: Path, change) -> None:
    path = folder / "consolidated.00.pth"
    state = torch.load(path, weights_only=True)
    change(state)
    torch.save(state, path)


def test_missing_permutation_in_one_layer_is_caught(models, tmp_path):
    from lorakit.checkpoint.weight_sources import interleaved_to_half_rows

    src = models["untied"]
    config = _write(src, tmp_path / "p")
    heads = config["num_key_value_heads"]

    def unpermute(state):
        state["layers.1.attention.wk.weight"] = interleaved_to_half_rows(state["layers.1.attention.wk.weight"], heads)

    _replace(tmp_path / "p", unpermute)
    with pytest.raises(VerificationError, match="pth: verification FAILED: layer 1 attention output differs"):
        verify_pth(src, tmp_path / "p", "f32")


def test_swapped_and_scaled_tensors_are_caught(models, tmp_path):
    src = models["untied"]
    _write(src, tmp_path / "p")

    def swap(state):
        a, b = "layers.0.feed_forward.w2.weight", "layers.1.feed_forward.w2.weight"
        state[a], state[b] = state[b], state[a]

    _replace(tmp_path / "p", swap)
    with pytest.raises(VerificationError, match="layer 0 mlp output differs"):
        verify_pth(src, tmp_path / "p", "f32")
    _replace(tmp_path / "p", swap)  # back
    verify_pth(src, tmp_path / "p", "f32")

    def scale(state):
        state["layers.1.attention.wo.weight"] = state["layers.1.attention.wo.weight"] * 1.05

    _replace(tmp_path / "p", scale)
    with pytest.raises(VerificationError, match="layer 1 attention output differs"):
        verify_pth(src, tmp_path / "p", "bf16")
