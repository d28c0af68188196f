"""GGUF and Meta pth exports of tiny random LLaMA models, checked by independent readers."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lorakit.checkpoint.verify import VerificationError
from lorakit.export.run import export_model
from tiny_models import DATA_DIR, make_tiny_llama

IDS = torch.tensor([[1, 5, 99, 1234, 15000, 7, 42, 3000, 2, 17]])


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("export")
    gqa = make_tiny_llama(root / "gqa", heads=4, kv_heads=2, seed=1)
    shutil.copy(DATA_DIR / "llama_style_bpe_16k.model", gqa / "tokenizer.model")  # SentencePiece scores
    return {
        "gqa_untied": gqa,
        "mha_tied_chat": make_tiny_llama(root / "mha", heads=4, kv_heads=4, tie_word_embeddings=True, chat=True,
                                         seed=2),
    }


def _logits(model, ids=IDS) -> torch.Tensor:
    with torch.inference_mode():
        return model.eval()(input_ids=ids).logits.float()


def _hf(path: Path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def _from_gguf(path: Path):
    """transformers' own GGUF loader (independent of lorakit's writer)."""
    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name)


@pytest.mark.parametrize("shape", ["gqa_untied", "mha_tied_chat"])
def test_gguf_f32_round_trip_through_transformers_loader(models, tmp_path, shape):
    src = models[shape]
    out = tmp_path / "model.gguf"
    export_model(str(src), "gguf", out, "f32", verify=False)  # compared here, independently of --verify
    ref, got = _logits(_hf(src)), _logits(_from_gguf(out))
    assert (ref - got).abs().max().item() <= 1e-4
    # metadata llama.cpp needs
    from gguf import GGUFReader

    reader = GGUFReader(str(out))
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("tokenizer.ggml.")}
    cfg = json.loads((src / "config.json").read_text())
    assert fields["general.architecture"] == "llama"
    assert fields["llama.attention.head_count_kv"] == cfg["num_key_value_heads"]
    assert fields["llama.embedding_length"] == cfg["hidden_size"]
    assert fields["llama.vocab_size"] == cfg["vocab_size"]
    names = {t.name for t in reader.tensors}
    assert ("output.weight" in names) == (not cfg["tie_word_embeddings"])
    # the tokenizer transformers rebuilds from the GGUF encodes like the original one
    tok_ref = AutoTokenizer.from_pretrained(src)
    tok_gguf = AutoTokenizer.from_pretrained(out.parent, gguf_file=out.name)
    text = "Hello world, this is a tokenizer check: 12345 éàü."
    expected = tok_ref(text)["input_ids"]
    assert tok_gguf(text)["input_ids"] == expected
    # ... and so does llama.cpp's own tokenizer reading the same file
    from llama_cpp import Llama

    vocab = Llama(model_path=str(out), vocab_only=True, verbose=False)
    assert vocab.tokenize(text.encode(), add_bos=True, special=True) == expected
    if shape == "mha_tied_chat":
        msgs = [{"role": "user", "content": "hi"}]
        assert tok_gguf.apply_chat_template(msgs, tokenize=False) == tok_ref.apply_chat_template(msgs, tokenize=False)
        assert tok_gguf.eos_token == "<|im_end|>"
        # (not compared with llama.cpp: for SentencePiece vocabularies it puts a "▁" after every special
        # token, as HF's legacy LLaMA tokenizer did; no GGUF key changes that.)


@pytest.mark.parametrize("outtype", ["f16", "bf16", "q8_0"])
def test_gguf_reduced_precision_verifies(models, tmp_path, outtype):
    out = tmp_path / f"m-{outtype}.gguf"
    result = export_model(str(models["gqa_untied"]), "gguf", out, outtype)
    assert 0 < result.verify.max_abs_diff <= result.verify.tolerance
    from gguf import GGUFReader

    types = {t.name: t.tensor_type.name for t in GGUFReader(str(out)).tensors}
    assert types["blk.0.attn_q.weight"] == outtype.upper() and types["blk.0.attn_norm.weight"] == "F32"


def test_gguf_without_rotary_permutation_fails_verification(models, tmp_path, monkeypatch):
    """The verification is not vacuous: a GGUF with q/k left in HF order is caught and not kept."""
    import lorakit.export.gguf_writer as writer

    monkeypatch.setattr(writer, "hf_to_meta_rows", lambda w, heads: w)
    out = tmp_path / "bad.gguf"
    with pytest.raises(VerificationError, match="FAILED"):
        export_model(str(models["gqa_untied"]), "gguf", out, "f32")
    assert not out.exists() and not list(tmp_path.iterdir())


def test_verify_uses_the_widest_dtype_that_fits_in_memory():
    from lorakit.checkpoint.verify import PEAK_BYTES_PER_PARAM as PEAK
    from lorakit.checkpoint.verify import compute_dtype

    params = 3_000_000_000
    assert compute_dtype(params, available=int(params * PEAK["float32"])) == "float32"
    assert compute_dtype(params, available=20 * 10**9) == "bfloat16"  # a 3B model on a 24 GB machine
    assert compute_dtype(params, available=int(params * PEAK["bfloat16"]) - 1) is None
    assert compute_dtype(7_000_000_000, available=22 * 10**9) is None  # 7B: skipped, not killed


def _little_memory(monkeypatch) -> None:
    """A machine on which no whole-model check would fit (the case of a 7B model on 24 GB)."""
    import lorakit.checkpoint.verify as verify

    monkeypatch.setattr(verify, "available_memory", lambda: 1000)


@pytest.mark.parametrize("fmt", ["gguf", "pth"])
def test_export_verifies_layer_by_layer_whatever_the_memory(models, tmp_path, monkeypatch, fmt):
    """The check holds about one layer, never a model: it runs in fp32 even where a whole model would not fit."""
    src = models["gqa_untied"]
    _little_memory(monkeypatch)
    result = export_model(str(src), fmt, tmp_path / "out", "f16")
    assert result.verify.computed_in == "float32" and 0 < result.verify.max_abs_diff <= result.verify.tolerance


def test_layerwise_verification_catches_a_wrong_layout_of_a_sharp_model(models, tmp_path, monkeypatch):
    """Given a model whose attention matters (a random one attends almost uniformly, whatever the q/k
    layout): q/k and lm_head scaled up to trained-model magnitudes; a GGUF without the q/k permutation is
    caught, naming the first layer, and nothing is left behind."""
    from safetensors.torch import load_file, save_file

    import lorakit.export.gguf_writer as writer

    sharp = tmp_path / "sharp"
    shutil.copytree(models["gqa_untied"], sharp)
    weights = load_file(sharp / "model.safetensors")
    for name in weights:
        if name.endswith(("q_proj.weight", "k_proj.weight")):
            weights[name] *= 8
        elif name == "lm_head.weight":
            weights[name] *= 30
    save_file(weights, sharp / "model.safetensors", metadata={"format": "pt"})
    _little_memory(monkeypatch)
    good = export_model(str(sharp), "gguf", tmp_path / "good.gguf", "f16")
    assert good.verify.max_abs_logit > 5
    monkeypatch.setattr(writer, "hf_to_meta_rows", lambda w, heads: w)
    with pytest.raises(VerificationError, match="FAILED: layer 0 attention output differs"):
        export_model(str(sharp), "gguf", tmp_path / "bad.gguf", "f16")
    assert not (tmp_path / "bad.gguf").exists()


def test_export_on_a_machine_too_small_for_a_whole_model_check_is_verified(models, tmp_path, monkeypatch, capsys,
                                                                           caplog):
    from lorakit.cli import main

    _little_memory(monkeypatch)
    out = tmp_path / "m.gguf"
    with caplog.at_level("WARNING", logger="lorakit"), pytest.raises(SystemExit) as exit_info:
        main(["export", "--model", str(models["gqa_untied"]), "--output", str(out), "--outtype", "f16"])
    assert exit_info.value.code == 0
    assert out.is_file() and "verify: max |logit diff|" in capsys.readouterr().out
    assert "NOT verified" not in caplog.text


def _official_meta_to_hf(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """transformers' convert_llama_weights_to_hf.permute, written out independently of lorakit."""
    dim1, dim2 = w.shape
    return w.view(n_heads, dim1 // n_heads // 2, 2, dim2).transpose(1, 2).reshape(dim1, dim2)


@pytest.mark.parametrize("shape", ["gqa_untied", "mha_tied_chat"])
def test_pth_weights_equal_hf_after_official_permutation(models, tmp_path, shape):
    src = models[shape]
    result = export_model(str(src), "pth", tmp_path / "pth", "f32")
    assert result.verify.max_abs_diff <= 1e-4  # read back by lorakit's pth reader
    cfg = json.loads((src / "config.json").read_text())
    meta = torch.load(tmp_path / "pth" / "consolidated.00.pth", weights_only=True)
    hf = dict(_hf(src).state_dict())
    heads, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        wq, wk = meta[f"layers.{i}.attention.wq.weight"], meta[f"layers.{i}.attention.wk.weight"]
        assert torch.equal(_official_meta_to_hf(wq, heads), hf[p + "self_attn.q_proj.weight"])
        assert torch.equal(_official_meta_to_hf(wk, kv), hf[p + "self_attn.k_proj.weight"])
        assert not torch.equal(wq, hf[p + "self_attn.q_proj.weight"])  # the permutation is not a no-op
        assert torch.equal(meta[f"layers.{i}.attention.wv.weight"], hf[p + "self_attn.v_proj.weight"])
        assert torch.equal(meta[f"layers.{i}.feed_forward.w1.weight"], hf[p + "mlp.gate_proj.weight"])
        assert torch.equal(meta[f"layers.{i}.feed_forward.w2.weight"], hf[p + "mlp.down_proj.weight"])
        assert torch.equal(meta[f"layers.{i}.ffn_norm.weight"], hf[p + "post_attention_layernorm.weight"])
    assert torch.equal(meta["tok_embeddings.weight"], hf["model.embed_tokens.weight"])
    assert torch.equal(meta["output.weight"], hf["lm_head.weight"])  # tied models get their own copy
    params = json.loads((tmp_path / "pth" / "params.json").read_text())
    assert params["dim"] == cfg["hidden_size"] and params["n_kv_heads"] == kv and params["n_layers"] == 2
    # Meta's FFN formula applied to params.json gives back the FFN size
    hidden = int(2 * 4 * params["dim"] / 3)
    hidden = int(params.get("ffn_dim_multiplier", 1.0) * hidden) if "ffn_dim_multiplier" in params else hidden
    m = params["multiple_of"]
    assert m * ((hidden + m - 1) // m) == cfg["intermediate_size"]


def test_pth_model_parallel_shards_concatenate_back(models, tmp_path):
    """Split into 2 shards as for 13B: each tensor along the dim Meta's loader concatenates."""
    from lorakit.checkpoint.pth import load_pth_model, write_pth
    from lorakit.formats.safetensors_io import SafetensorsFolder, iter_tensors

    src = models["gqa_untied"]
    cfg = json.loads((src / "config.json").read_text())
    (tmp_path / "p").mkdir()
    files = write_pth(iter_tensors(SafetensorsFolder(src)), cfg, tmp_path / "p", num_shards=2)
    assert files == ["consolidated.00.pth", "consolidated.01.pth"]
    s0 = torch.load(tmp_path / "p" / files[0], weights_only=True)
    assert s0["layers.0.attention.wq.weight"].shape[0] == cfg["hidden_size"] // 2  # column-parallel
    assert s0["layers.0.attention.wo.weight"].shape[1] == cfg["hidden_size"] // 2  # row-parallel
    assert s0["tok_embeddings.weight"].shape[1] == cfg["hidden_size"] // 2  # ParallelEmbedding
    assert s0["norm.weight"].shape[0] == cfg["hidden_size"]  # replicated
    assert (_logits(load_pth_model(tmp_path / "p")) - _logits(_hf(src))).abs().max().item() <= 1e-5


def test_export_refuses_existing_output(models, tmp_path, capsys):
    from lorakit.cli import main

    out = tmp_path / "x.gguf"
    out.write_bytes(b"keep")
    with pytest.raises(SystemExit) as e:
        main(["export", "--model", str(models["gqa_untied"]), "--output", str(out)])
    assert e.value.code == 2 and "exists" in capsys.readouterr().err and out.read_bytes() == b"keep"
