"""GGUF LoRA adapters: llama.cpp applying the adapter on a base GGUF computes what PEFT computes; the
Ollama Modelfile parses back and its TEMPLATE renders like the chat template."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from gguf import GGUFReader
from peft import LoraConfig, get_peft_model

from lorakit.checkpoint.verify import VerificationError, logits_of, merged_in_memory, probe_ids
from lorakit.export.gguf_lora import AdapterNotConvertibleError, write_gguf_lora
from lorakit.export.llamacpp_verify import llamacpp_logits
from lorakit.export.run import export_lora, export_model
from lorakit.models import load_model
from tiny_models import make_tiny_llama


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("lora")
    return {"untied": make_tiny_llama(root / "untied", hidden_size=128, intermediate_size=256, seed=3),
            "tied_chat": make_tiny_llama(root / "tied", hidden_size=128, intermediate_size=256, heads=4, kv_heads=4,
                                         tie_word_embeddings=True, chat=True, seed=4)}


def make_adapter(base: Path, out: Path, seed: int, qk_scale: float = 1.0, **lora) -> Path:
    torch.manual_seed(seed)
    model = load_model(base, "float32")
    config = LoraConfig(init_lora_weights=False, **{"r": 8, "lora_alpha": 16, "target_modules": "all-linear", **lora})
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name and ("q_proj" in name or "k_proj" in name):
                p.mul_(qk_scale)
    peft_model.save_pretrained(out)
    return out


def test_adapter_gguf_on_base_gguf_matches_peft(bases, tmp_path):
    base = bases["untied"]
    adapter = make_adapter(base, tmp_path / "a", seed=1, target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                                         "gate_proj", "up_proj", "down_proj",
                                                                         "lm_head"])
    out = tmp_path / "a.gguf"
    result = export_lora(str(adapter), str(base), out, "f32")
    assert result.verify.max_abs_diff <= result.verify.tolerance
    reader = GGUFReader(str(out))
    fields = {k: f.contents() for k, f in reader.fields.items()}
    assert fields["general.type"] == "adapter" and fields["adapter.type"] == "lora"
    assert fields["adapter.lora.alpha"] == 16.0 and fields["general.architecture"] == "llama"
    shapes = {t.name: [int(x) for x in t.shape] for t in reader.tensors}
    assert shapes["blk.0.attn_q.weight.lora_a"] == [128, 8]  # GGUF order: [in, r]
    assert shapes["blk.0.attn_k.weight.lora_b"] == [8, 64]   # [r, out]: GQA k has 2 heads x 32
    assert "output.weight.lora_a" in shapes
    # independently of --verify: llama.cpp (base f32 GGUF + adapter) vs PEFT's forward, and vs the base alone
    base_gguf = tmp_path / "base.gguf"
    export_model(str(base), "gguf", base_gguf, "f32", verify=False)
    ids = probe_ids(16000)
    ref = logits_of(merged_in_memory(str(base), [str(adapter)]), ids)
    got = llamacpp_logits(base_gguf, ids, {"a": out})
    without = llamacpp_logits(base_gguf, ids)
    diff = (got - ref).abs().max().item()
    assert diff <= 1e-4 * ref.abs().max().item(), diff
    assert (without - ref).abs().max().item() > 100 * diff  # the adapter really changed llama.cpp's output


@pytest.mark.parametrize("case", ["qwen2", "qwen3", "gemma3", "llama3"])
def test_family_adapter_gguf_on_base_gguf_matches_peft(tiny_family, tmp_path, case):
    """Qwen2 (q/k/v biases), Qwen3 (q/k norms), Gemma 3 (its norms, tied head) adapters are written unpermuted
    under their own architecture; Llama 3 with RoPE scaling permuted, its scaling left to the base GGUF's
    rope_freqs. llama.cpp (f32 base GGUF + adapter) computes PEFT's logits."""
    from lorakit.models.families import family_of_dir

    base = tiny_family(case)
    family = family_of_dir(base)
    adapter = make_adapter(base, tmp_path / "a", seed=6, target_modules=list(family.lora_targets))
    out = tmp_path / "a.gguf"
    result = export_lora(str(adapter), str(base), out, "f32")
    assert result.verify.max_abs_diff <= result.verify.tolerance
    reader = GGUFReader(str(out))
    fields = {k: f.contents() for k, f in reader.fields.items()}
    assert fields["general.architecture"] == family.gguf_arch and fields["general.type"] == "adapter"
    names = {t.name for t in reader.tensors}
    assert len(names) == 2 * 2 * len(family.lora_targets) and "rope_freqs.weight" not in names
    base_gguf = tmp_path / "base.gguf"
    export_model(str(base), "gguf", base_gguf, "f32", verify=False)
    assert ("rope_freqs.weight" in {t.name for t in GGUFReader(str(base_gguf)).tensors}) == (case == "llama3")
    ids = probe_ids(16000)
    ref = logits_of(merged_in_memory(str(base), [str(adapter)]), ids)
    got = llamacpp_logits(base_gguf, ids, {"a": out})[..., : ref.shape[-1]]
    without = llamacpp_logits(base_gguf, ids)[..., : ref.shape[-1]]
    # llama.cpp's own error on the base alone (Gemma 3: GELU through a 16-bit table), measured here
    floor = (without - logits_of(load_model(base, "float32"), ids)).abs().max().item()
    assert floor <= (5e-4 if case == "gemma3" else 1e-5) * ref.abs().max().item(), floor
    diff = (got - ref).abs().max().item()
    assert diff <= 1e-4 * ref.abs().max().item() + 2 * floor, (diff, floor)
    assert (without - ref).abs().max().item() > 30 * diff  # the adapter really changed llama.cpp's output


def test_qwen_adapter_with_llamas_qk_permutation_fails_verification(tiny_family, tmp_path, monkeypatch):
    """The converse of the LLaMA check below: permuting a Qwen adapter's q/k (as for LLaMA) is caught."""
    import dataclasses

    import lorakit.export.gguf_lora as gl
    from lorakit.models.families import QKV_BIASES, QWEN2
    from lorakit.models.layout import RULES

    base = tiny_family("qwen2")
    adapter = make_adapter(base, tmp_path / "a", seed=2, qk_scale=40.0, target_modules=["q_proj", "k_proj"])
    assert export_lora(str(adapter), str(base), tmp_path / "good.gguf", "f32").verify is not None
    monkeypatch.setattr(gl, "base_family", lambda config, where: dataclasses.replace(QWEN2, rules=RULES + QKV_BIASES,
                                                                                     permute_qk=True))
    with pytest.raises(VerificationError, match="FAILED"):
        export_lora(str(adapter), str(base), tmp_path / "bad.gguf", "f32")


def test_adapter_without_qk_permutation_fails_verification(bases, tmp_path, monkeypatch):
    import lorakit.export.gguf_lora as gl

    adapter = make_adapter(bases["untied"], tmp_path / "a", seed=2, qk_scale=40.0, target_modules=["q_proj", "k_proj"])
    assert export_lora(str(adapter), str(bases["untied"]), tmp_path / "good.gguf", "f32").verify is not None
    monkeypatch.setattr(gl, "hf_to_meta_rows", lambda w, heads: w)
    with pytest.raises(VerificationError, match="FAILED"):
        export_lora(str(adapter), str(bases["untied"]), tmp_path / "bad.gguf", "f32")
    assert not (tmp_path / "bad.gguf").exists()


def test_rslora_and_patterns_are_folded_into_b(bases, tmp_path):
    adapter = make_adapter(bases["untied"], tmp_path / "a", seed=3, use_rslora=True, rank_pattern={"v_proj": 2},
                           alpha_pattern={"down_proj": 3}, target_modules=["q_proj", "v_proj", "down_proj"])
    result = export_lora(str(adapter), str(bases["untied"]), tmp_path / "a.gguf", "f16")
    assert result.verify.max_abs_diff <= result.verify.tolerance


@pytest.mark.parametrize("kind", ["modules_to_save", "tied_lm_head"])
def test_adapters_that_train_embeddings_or_head_are_refused(bases, tmp_path, kind):
    if kind == "modules_to_save":
        adapter = make_adapter(bases["untied"], tmp_path / "a", seed=4, target_modules=["q_proj"],
                               modules_to_save=["embed_tokens"])
        base = bases["untied"]
    else:
        base = bases["tied_chat"]
        adapter = make_adapter(base, tmp_path / "a", seed=4, target_modules=["q_proj", "lm_head"])
    with pytest.raises(AdapterNotConvertibleError, match="merge it instead"):
        write_gguf_lora(adapter, base, tmp_path / "x.gguf")
    run = subprocess.run([sys.executable, "-m", "lorakit", "export", "--format", "gguf-lora", "--adapter", str(adapter),
                          "--base-model", str(base), "--output", str(tmp_path / "y.gguf")],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "merge it instead" in run.stderr and not (tmp_path / "y.gguf").exists()
    assert len(run.stderr.strip().splitlines()) == 1, run.stderr


def test_ollama_modelfile_for_an_adapter_parses_back(bases, tmp_path):
    from lorakit.export.ollama import parse_modelfile, render_go_template

    base = bases["tied_chat"]
    adapter = make_adapter(base, tmp_path / "a", seed=5)
    out = tmp_path / "out" / "adapter.gguf"
    run = subprocess.run([sys.executable, "-m", "lorakit", "export", "--format", "gguf-lora", "--adapter", str(adapter),
                          "--base-model", str(base), "--output", str(out), "--outtype", "f32", "--ollama"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    mf = parse_modelfile((out.parent / "Modelfile").read_text())
    assert mf["ADAPTER"] == "./adapter.gguf"
    assert mf["FROM"] == f"./{base.name}-f16.gguf" and (out.parent / f"{base.name}-f16.gguf").is_file()
    params = mf["PARAMETER"]
    assert params["stop"] == ["<|im_end|>"] and params["temperature"] == ["0.1"] and params["top_k"] == ["40"]
    assert params["num_predict"] == ["256"] and params["repeat_penalty"] == ["1.0"]
    # the TEMPLATE, rendered as Ollama would (Go template subset), gives the chat template's prompt
    assert "{{ range .Messages }}" in mf["TEMPLATE"]
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base)
    convo = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
             {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "2+2?"}]
    expected = tok.apply_chat_template(convo, tokenize=False, add_generation_prompt=True)
    assert render_go_template(mf["TEMPLATE"], convo) == expected
    assert expected.endswith("<|im_start|>assistant\n")


def test_ollama_modelfile_alpaca_template(bases, tmp_path):
    from lorakit.export.ollama import parse_modelfile
    from lorakit.prompts import Prompter

    out = tmp_path / "m.gguf"
    run = subprocess.run([sys.executable, "-m", "lorakit", "export", "--model", str(bases["untied"]), "--output",
                          str(out), "--ollama", "--no-verify"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    mf = parse_modelfile((tmp_path / "Modelfile").read_text())
    assert mf["FROM"] == "./m.gguf" and "ADAPTER" not in mf
    prompt = Prompter("alpaca").generate_prompt("Name a colour.")
    assert mf["TEMPLATE"].replace("{{ .Prompt }}", "Name a colour.") == prompt
    assert "### Instruction:" in mf["PARAMETER"]["stop"] and "</s>" in mf["PARAMETER"]["stop"]
