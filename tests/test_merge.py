"""Streaming merge vs PEFT's own merge_and_unload on tiny random LLaMA models of several shapes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from lorakit.errors import MismatchError, ModelNotFoundError, OutputExistsError
from lorakit.merge.run import merge_model
from tiny_models import make_tiny_llama

IDS = torch.tensor([[1, 5, 99, 1234, 15000, 7, 42, 3000], [1, 300, 301, 302, 8000, 9, 10, 11]])

SHAPES = {
    "gqa_untied": dict(heads=4, kv_heads=2, tie_word_embeddings=False),
    "mha_tied": dict(heads=4, kv_heads=4, tie_word_embeddings=True),
    "gqa_sharded": dict(heads=8, kv_heads=2, hidden_size=64, tie_word_embeddings=False, shard="300KB"),
}


def _make_base(root: Path, name: str) -> Path:
    spec = dict(SHAPES[name])
    shard = spec.pop("shard", None)
    path = make_tiny_llama(root / name, seed=len(name), **spec)
    if shard:  # re-save as several shards
        model = AutoModelForCausalLM.from_pretrained(path)
        for f in path.glob("model*.safetensors"):
            f.unlink()
        model.save_pretrained(path, max_shard_size=shard)
        assert len(list(path.glob("model-*.safetensors"))) >= 3
    return path


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bases")
    return {name: _make_base(root, name) for name in SHAPES}


def _load(path: Path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _logits(model) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_ids=IDS).logits


def make_adapter(base: Path, out: Path, seed: int, **lora) -> Path:
    """A PEFT adapter with random (non-zero) A and B, saved the way training saves it."""
    torch.manual_seed(seed)
    model = _load(base)
    config = LoraConfig(init_lora_weights=False, **{"r": 4, "lora_alpha": 8, "target_modules": "all-linear", **lora})
    peft_model = get_peft_model(model, config)
    peft_model.save_pretrained(out)
    return out


def peft_sequential_merge(base: Path, adapters: list[Path], save_to: Path) -> torch.nn.Module:
    """Reference: PEFT merges each adapter in turn; saved and reloaded as a user would get it."""
    model = _load(base)
    for a in adapters:
        model = PeftModel.from_pretrained(model, a).merge_and_unload()
    model.save_pretrained(save_to)
    return _load(save_to)


@pytest.mark.parametrize("shape", list(SHAPES))
def test_merge_equals_peft_merge_and_unload(bases, tmp_path, shape):
    base = bases[shape]
    adapter = make_adapter(base, tmp_path / "a", seed=1, r=8, lora_alpha=16)
    result = merge_model(str(base), [str(adapter)], tmp_path / "out", max_shard_size="200KB", verify=False)
    ref = peft_sequential_merge(base, [adapter], tmp_path / "ref")
    got = _load(tmp_path / "out")
    diff = (_logits(got) - _logits(ref)).abs().max().item()
    change = (_logits(_load(base)) - _logits(ref)).abs().max().item()
    assert diff <= 1e-4, diff
    assert change > 100 * max(diff, 1e-4), "the adapter must visibly change the model for the test to mean anything"
    assert len(result.files) > 1 and (tmp_path / "out" / "model.safetensors.index.json").is_file()
    assert (tmp_path / "out" / "tokenizer.json").is_file()
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["tie_word_embeddings"] == SHAPES[shape].get("tie_word_embeddings", False)


def test_rslora_fan_in_rank_pattern_and_two_adapters_in_order(bases, tmp_path):
    base = bases["gqa_untied"]
    a1 = make_adapter(base, tmp_path / "a1", seed=2, target_modules=["q_proj", "v_proj", "down_proj"],
                      use_rslora=True, r=8, rank_pattern={"v_proj": 2}, alpha_pattern={"down_proj": 3})
    a2 = make_adapter(base, tmp_path / "a2", seed=3, target_modules=["q_proj", "k_proj", "up_proj", "lm_head"])
    result = merge_model(str(base), [str(a1), str(a2)], tmp_path / "out")  # --verify on: PEFT in memory
    assert result.verify.max_abs_diff <= 1e-4
    ref = peft_sequential_merge(base, [a1, a2], tmp_path / "ref")
    assert (_logits(_load(tmp_path / "out")) - _logits(ref)).abs().max().item() <= 1e-4
    only_first = peft_sequential_merge(base, [a1], tmp_path / "ref1")
    assert (_logits(only_first) - _logits(ref)).abs().max().item() > 1e-2  # the second adapter counted


def _extend_vocab_adapter(base: Path, out: Path, seed: int, extra: int, tied: bool) -> tuple[Path, int]:
    """Vocabulary extension as Chinese-LLaMA does it: resize, LoRA + full embed_tokens/lm_head."""
    from lorakit.models import load_tokenizer

    tok = load_tokenizer(base, add_pad_token=False)
    tok.add_tokens([f"新词{i}" for i in range(extra)])
    torch.manual_seed(seed)
    model = _load(base)
    model.resize_token_embeddings(len(tok), mean_resizing=False)
    modules = ["embed_tokens"] if tied else ["embed_tokens", "lm_head"]
    config = LoraConfig(init_lora_weights=False, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                        modules_to_save=modules)
    peft_model = get_peft_model(model, config)
    with torch.no_grad():  # trained full modules: different from the base
        for name, p in peft_model.named_parameters():
            if "modules_to_save" in name:
                p.add_(torch.randn_like(p) * 0.05)
    peft_model.save_pretrained(out)
    tok.save_pretrained(out)  # the extended tokenizer travels with the adapter
    return out, len(tok)


@pytest.mark.parametrize("shape", ["gqa_untied", "mha_tied"])
def test_extended_vocab_merges_to_bigger_vocab(bases, tmp_path, shape):
    base = bases[shape]
    tied = SHAPES[shape]["tie_word_embeddings"]
    assert json.loads((base / "config.json").read_text())["tie_word_embeddings"] == tied
    pt, n_tok = _extend_vocab_adapter(base, tmp_path / "pt", seed=4, extra=40, tied=tied)
    sft = make_adapter(base, tmp_path / "sft", seed=5, target_modules=["q_proj", "o_proj"])  # Plus: 2nd adapter
    result = merge_model(str(base), [str(pt), str(sft)], tmp_path / "out")
    assert result.vocab_size == n_tok == 16000 + 40
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    # A tied model whose embedding was trained as its own copy (modules_to_save) ends untied, as in PEFT:
    # lm_head stays the (resized) matrix the adapter was trained against.
    assert cfg["vocab_size"] == n_tok and cfg["tie_word_embeddings"] is False
    with safe_open(str(tmp_path / "out" / "model.safetensors"), "pt") as f:
        assert f.get_slice("model.embed_tokens.weight").get_shape()[0] == n_tok
        assert f.get_slice("lm_head.weight").get_shape()[0] == n_tok
    from lorakit.models import load_tokenizer

    assert len(load_tokenizer(tmp_path / "out", add_pad_token=False)) == n_tok
    # independent reference: resize, then PEFT merges pt then sft
    model = _load(base)
    model.resize_token_embeddings(n_tok, mean_resizing=False)
    model = PeftModel.from_pretrained(model, pt).merge_and_unload()
    model = PeftModel.from_pretrained(model, sft).merge_and_unload()
    model.save_pretrained(tmp_path / "ref")
    ids = torch.cat([IDS, torch.tensor([[16000, 16039, 16010, 5, 16020, 1, 2, 3]])])
    with torch.inference_mode():
        ref = _load(tmp_path / "ref")(input_ids=ids).logits
        got = _load(tmp_path / "out")(input_ids=ids).logits
    assert (ref - got).abs().max().item() <= 1e-4


def test_extended_vocab_with_base_tokenizer_is_refused(bases, tmp_path):
    base = bases["gqa_untied"]
    pt, _ = _extend_vocab_adapter(base, tmp_path / "pt", seed=6, extra=200, tied=False)
    with pytest.raises(MismatchError, match="extended"):
        merge_model(str(base), [str(pt)], tmp_path / "out", tokenizer=str(base), verify=False)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


def test_refusals_write_nothing(bases, tmp_path):
    small, other = bases["gqa_untied"], bases["gqa_sharded"]
    adapter = make_adapter(other, tmp_path / "other", seed=7, target_modules=["k_proj"])
    with pytest.raises(MismatchError, match="k_proj"):  # made for another shape (8 heads, 2 kv heads)
        merge_model(str(small), [str(adapter)], tmp_path / "out")
    with pytest.raises(ModelNotFoundError):
        merge_model(str(small), [str(tmp_path / "missing")], tmp_path / "out")
    bad = tmp_path / "binbase"
    bad.mkdir()
    (bad / "config.json").write_text((small / "config.json").read_text())
    torch.save({}, bad / "pytorch_model.bin")  # a readable .bin (a damaged one is refused as such, earlier)
    with pytest.raises(ModelNotFoundError, match="safetensors"):
        merge_model(str(bad), [str(adapter)], tmp_path / "out")
    renamed = tmp_path / "renamed"
    renamed.mkdir()
    (renamed / "config.json").write_text((small / "config.json").read_text())
    from safetensors.torch import save_file

    save_file({"transformer.h.0.attn.c_attn.weight": torch.zeros(2, 2)}, renamed / "model.safetensors")
    with pytest.raises(MismatchError, match="unknown tensor names"):
        merge_model(str(renamed), [str(adapter)], tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["binbase", "other", "renamed"]
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep")
    ok = make_adapter(small, tmp_path / "ok", seed=8, target_modules=["q_proj"])
    with pytest.raises(OutputExistsError):
        merge_model(str(small), [str(ok)], tmp_path / "full")
    assert (tmp_path / "full" / "x").read_text() == "keep"


def _cli(args: list[str], capsys) -> tuple[int, str, str]:
    from lorakit.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(args)
    out = capsys.readouterr()
    return int(exit_info.value.code or 0), out.out, out.err


def test_cli_merge_pth_and_dtype(bases, tmp_path, capsys):
    """The verb as a user runs it: bf16 output, and pth output read back by the pth reader (verify)."""
    base = bases["gqa_untied"]
    adapter = make_adapter(base, tmp_path / "a", seed=9, target_modules=["q_proj", "k_proj", "gate_proj"])
    cmd = ["merge", "--base-model", str(base), "--lora-model", str(adapter)]
    code, out, err = _cli(cmd + ["--output-dir", str(tmp_path / "bf16"), "--dtype", "bfloat16"], capsys)
    assert code == 0, err
    assert "verify: max |logit diff|" in out
    with safe_open(str(tmp_path / "bf16" / "model.safetensors"), "pt") as f:
        assert f.get_tensor("model.layers.0.self_attn.q_proj.weight").dtype == torch.bfloat16
    code, out, err = _cli(cmd + ["--output-dir", str(tmp_path / "pth"), "--output-type", "pth"], capsys)
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "pth").iterdir())[:2] == ["consolidated.00.pth", "params.json"]
    code, out, err = _cli(cmd + ["--output-dir", str(tmp_path / "pth")], capsys)
    assert code == 2 and "not empty" in err and "Traceback" not in err


def test_cli_help_lists_verbs():
    run = subprocess.run([sys.executable, "-m", "lorakit", "merge", "--help"], capture_output=True, text=True,
                         timeout=60)
    assert run.returncode == 0 and "--lora-model" in run.stdout and "--output-type" in run.stdout


@pytest.mark.parametrize("target", ["embed_tokens", "lm_head"])
def test_lora_on_tied_embeddings_unties_like_the_trained_forward(bases, tmp_path, target):
    """LoRA on embed_tokens (or lm_head) of a tied model changed only that matrix in PEFT's forward pass
    (what training optimised), so the merge unties them. (PEFT's own merge_and_unload adds the update to
    the shared matrix instead, changing the other one too; the unmerged forward is the reference here.)"""
    base = bases["mha_tied"]
    adapter = make_adapter(base, tmp_path / "a", seed=10, target_modules=["q_proj", target])
    result = merge_model(str(base), [str(adapter)], tmp_path / "out")  # the default check agrees too
    assert result.verify is not None and result.verify.max_abs_diff <= result.verify.tolerance
    reference = PeftModel.from_pretrained(_load(base), adapter).eval()
    assert (_logits(_load(tmp_path / "out")) - _logits(reference)).abs().max().item() <= 1e-4
    assert json.loads((tmp_path / "out" / "config.json").read_text())["tie_word_embeddings"] is False


def test_merge_verify_catches_a_dropped_delta_in_one_layer(bases, tmp_path, monkeypatch):
    """The default check (layer by layer against base + adapters computed apart from the merge) names the
    layer whose update the merge lost, and leaves no output behind."""
    import lorakit.merge.streaming as streaming
    from lorakit.checkpoint.verify import VerificationError

    base = bases["gqa_untied"]
    adapter = make_adapter(base, tmp_path / "a", seed=4, target_modules=["q_proj", "v_proj", "down_proj"])
    real = streaming.merged_tensor

    def lose_layer_1_down(plan, t, out=None):
        if t.name == "model.layers.1.mlp.down_proj.weight":
            plan.ops[t.name] = plan.ops[t.name][:1]
        return real(plan, t, out)

    monkeypatch.setattr(streaming, "merged_tensor", lose_layer_1_down)
    with pytest.raises(VerificationError, match="layer 1 mlp output differs"):
        merge_model(str(base), [str(adapter)], tmp_path / "out", dtype="bf16")
    assert not (tmp_path / "out").exists()
