"""Layer-by-layer verification (checkpoint/layerwise.py): a correct model passes for each family, the
pass computes what the model computes, and planted faults are caught, naming the layer."""

from __future__ import annotations

import pytest
import torch

from lorakit.checkpoint import layerwise
from lorakit.checkpoint.layerwise import verify_layerwise
from lorakit.checkpoint.verify import VerificationError, probe_ids
from tiny_models import _family_config

VOCAB = 1000


class DictSource:
    """A WeightSource over an in-memory state dict."""

    def __init__(self, state: dict[str, torch.Tensor]):
        self.state = state

    def names(self):
        return list(self.state)

    def get(self, name: str) -> torch.Tensor:
        return self.state[name]


def _model(case: str, layers: int = 3, seed: int = 0):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = _family_config(case, VOCAB, 1, 2).to_dict()
    config.update(num_hidden_layers=layers, layer_types=None)
    if case == "gemma3":  # short windows so that sliding layers differ from global ones on the probes
        config.update(sliding_window=8, layer_types=["sliding_attention", "full_attention"] * (layers // 2)
                      + ["sliding_attention"] * (layers % 2))
    config = AutoConfig.for_model(**config)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.2)
    return model


def _state(model) -> dict[str, torch.Tensor]:
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    return state


@pytest.fixture(scope="module")
def models():
    return {case: _model(case) for case in ("llama2", "qwen2", "gemma3", "qwen3")}


@pytest.mark.parametrize("case", ["llama2", "qwen2", "gemma3", "qwen3"])
def test_correct_model_passes_and_the_pass_computes_the_models_logits(models, case, monkeypatch):
    model = models[case]
    seen = {}
    real = layerwise._compare_head

    def spy(model_, inner, prefix, hidden, *args):
        seen["hidden"] = hidden
        return real(model_, inner, prefix, hidden, *args)

    monkeypatch.setattr(layerwise, "_compare_head", spy)
    state = _state(model)
    bf16 = {k: v.to(torch.bfloat16) for k, v in state.items()}
    result = verify_layerwise("tiny", model.config, DictSource(state), DictSource(bf16), "bf16")
    assert result.max_abs_diff <= result.tolerance and result.argmax_agreement > 0.9
    # the layer walk reproduced the model's own forward pass (masks, rotary, embedding scale)
    ids = probe_ids(VOCAB, n=1, length=layerwise.PROBE_LENGTH)
    with torch.inference_mode():
        want = model(input_ids=ids).logits
        inner = model.get_decoder()
        got = model.lm_head(inner.norm(seen["hidden"]))
        cap = getattr(model.config, "final_logit_softcapping", None)
        if cap:
            got = torch.tanh(got / cap) * cap
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    exact = verify_layerwise("tiny", model.config, DictSource(state), DictSource(dict(state)), "f32")
    assert exact.max_abs_diff == 0.0 and exact.argmax_agreement == 1.0


def _fails(model, state, weight_type="f32", **kw) -> str:
    ref = _state(model)
    with pytest.raises(VerificationError) as e:
        verify_layerwise("tiny", model.config, DictSource(ref), DictSource(state), weight_type, **kw)
    return str(e.value)


def test_wrong_tensor_swapped_or_scaled_names_the_layer(models):
    model = models["llama2"]
    state = _state(model)
    state["model.layers.1.mlp.down_proj.weight"] = state["model.layers.0.mlp.down_proj.weight"]
    assert "layer 1 mlp output differs" in _fails(model, state)
    state = _state(model)
    state["model.layers.2.self_attn.o_proj.weight"] = state["model.layers.2.self_attn.o_proj.weight"] * 1.1
    assert "layer 2 attention output differs" in _fails(model, state, "bf16")


def test_missing_qk_permutation_in_one_layer_is_caught(models):
    from lorakit.models.layout import hf_to_meta_rows

    model = models["llama2"]
    state = _state(model)
    name = "model.layers.1.self_attn.q_proj.weight"
    state[name] = hf_to_meta_rows(state[name], model.config.num_attention_heads)
    assert "layer 1 attention output differs" in _fails(model, state, "bf16")


def test_small_changes_are_caught_at_bf16_tolerance(models):
    """A rank-8 update of the size training makes (a dropped adapter delta) in one layer."""
    model = models["qwen2"]
    state = _state(model)
    name = "model.layers.2.mlp.up_proj.weight"
    w = state[name]
    g = torch.Generator().manual_seed(0)
    b, a = torch.randn(w.shape[0], 8, generator=g), torch.randn(8, w.shape[1], generator=g)
    delta = b @ a
    state[name] = w + delta * (0.05 * w.abs().mean() / delta.abs().mean())  # ~5% of the weight's size
    assert "layer 2 mlp output differs" in _fails(model, state, "bf16")


def test_wrong_embedding_row_and_wrong_head_are_caught(models):
    model = models["llama2"]
    state = _state(model)
    state["model.embed_tokens.weight"] = state["model.embed_tokens.weight"].clone()
    state["model.embed_tokens.weight"][VOCAB - 3] = 0.5  # a row no probe reads
    assert f"row {VOCAB - 3} differs" in _fails(model, state, "bf16")
    state = _state(model)
    state["lm_head.weight"] = state["lm_head.weight"][torch.randperm(VOCAB)]
    assert "lm_head logits differ" in _fails(model, state, "bf16")
    state = _state(model)
    state["model.norm.weight"] = state["model.norm.weight"] * 1.5
    assert "lm_head logits differ" in _fails(model, state, "bf16")


def test_missing_tensor_or_wrong_shape_is_one_clear_error(models):
    model = models["llama2"]
    state = _state(model)
    del state["model.layers.0.mlp.gate_proj.weight"]
    assert "written model has no tensor model.layers.0.mlp.gate_proj.weight" in _fails(model, state)
    state = _state(model)
    state["model.embed_tokens.weight"] = state["model.embed_tokens.weight"][:-1]
    assert "has shape" in _fails(model, state)
    state = _state(model)  # a decoder layer's tensor: named, not a size-mismatch traceback
    state["model.layers.1.mlp.up_proj.weight"] = state["model.layers.1.mlp.up_proj.weight"][:-1]
    assert "model.layers.1.mlp.up_proj.weight has shape" in _fails(model, state)


@pytest.mark.parametrize("case", ["llama2", "qwen2", "gemma3"])
@pytest.mark.parametrize("dtype", ["bf16", "f32"])
def test_verified_merge_passes_per_family(models, tmp_path, case, dtype):
    """`merge` with its default check: base + an all-linear adapter (and a second one) pass in bf16/f32."""
    from peft import LoraConfig, get_peft_model

    from lorakit.merge.run import merge_model

    model = models[case]
    model.save_pretrained(tmp_path / "base")
    adapters = []
    for seed, targets in ((1, "all-linear"), (2, ["q_proj", "down_proj"])):
        torch.manual_seed(seed)
        peft_model = get_peft_model(_model(case), LoraConfig(r=8, lora_alpha=16, target_modules=targets,
                                                             init_lora_weights=False))
        peft_model.save_pretrained(tmp_path / f"a{seed}")
        adapters.append(str(tmp_path / f"a{seed}"))
    result = merge_model(str(tmp_path / "base"), adapters, tmp_path / "out", dtype=dtype)
    assert result.verify.max_abs_diff <= result.verify.tolerance and result.verify.argmax_agreement > 0.9


_PEAK_SCRIPT = """
import json, sys
from lorakit.checkpoint.layerwise import FolderSource, verify_layerwise
def rss(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024
small = json.load(open(sys.argv[2] + "/config.json"))  # a 1-layer model: code paths, not memory
verify_layerwise("warm-up", small, FolderSource(sys.argv[2]), FolderSource(sys.argv[2]), "f32")
config = json.load(open(sys.argv[1] + "/config.json"))
before = rss("VmRSS:")
open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to the current RSS
verify_layerwise("model", config, FolderSource(sys.argv[1]), FolderSource(sys.argv[1]), "f32")
print(json.dumps({"before": before, "peak": rss("VmHWM:")}))
"""


def test_memory_is_a_few_layers_not_the_model(tmp_path):
    """An 8-layer model (~16 MB per layer in fp32): the check's peak above its baseline is about two
    layers, not the model's 8 layers (peak RSS of a subprocess, reset before the measured check).
    glibc serves the tensors of a large model (>= 32 MB each) with their own mappings, returned when
    freed; MALLOC_MMAP_THRESHOLD_ gives this small model's 1-4 MB tensors the same regime (on glibc's
    heap, their peak varied from 1.6 to 2.8 layers from run to run)."""
    import json
    import os
    import subprocess
    import sys

    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=2000, hidden_size=512, intermediate_size=2048, num_hidden_layers=8,
                         num_attention_heads=8, num_key_value_heads=8, tie_word_embeddings=False)
    LlamaForCausalLM(LlamaConfig(vocab_size=2000, hidden_size=64, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=2)).save_pretrained(tmp_path / "s")
    model = LlamaForCausalLM(config)
    model.save_pretrained(tmp_path / "m")
    layer = sum(p.numel() for p in model.model.layers[0].parameters()) * 4
    total = sum(p.numel() for p in model.parameters()) * 4
    del model
    run = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT, str(tmp_path / "m"), str(tmp_path / "s")],
                         capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1",
                                                                    "MALLOC_MMAP_THRESHOLD_": "65536"})
    assert run.returncode == 0, run.stderr[-2000:]
    got = json.loads(run.stdout.strip().splitlines()[-1])
    above = got["peak"] - got["before"]
    assert 0.5 * layer <= above <= 2 * layer, (f"{above / 2**20:.1f} MB above the baseline; one layer "
                                               f"{layer / 2**20:.1f} MB, the model {total / 2**20:.1f} MB")


def test_verified_merge_of_a_mixed_precision_base(models, tmp_path):
    """bf16 weights with fp32 norms (as many checkpoints ship): the tolerance is the bf16 one, whatever
    tensor comes first."""
    from safetensors.torch import save_file

    from lorakit.merge.run import merge_model

    model = models["llama2"]
    model.save_pretrained(tmp_path / "base")
    state = {k: v if "norm" in k else v.to(torch.bfloat16) for k, v in _state(model).items()}
    state["lm_head.weight"] = state["lm_head.weight"].float()  # the first tensor in name order
    save_file(state, tmp_path / "base" / "model.safetensors", metadata={"format": "pt"})
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    get_peft_model(_model("llama2"), LoraConfig(r=8, lora_alpha=16, target_modules="all-linear",
                                                init_lora_weights=False)).save_pretrained(tmp_path / "a")
    result = merge_model(str(tmp_path / "base"), [str(tmp_path / "a")], tmp_path / "out")
    assert result.verify.max_abs_diff <= result.verify.tolerance


def test_verified_pth_merge_of_a_tied_model(tmp_path):
    """Meta's pth format always has its own output matrix: the tied reference head (the embeddings) and
    the written `output.weight` are compared as the same head."""
    from lorakit.merge.run import merge_model
    from tiny_models import make_tiny_adapter, make_tiny_llama

    base = make_tiny_llama(tmp_path / "base", tie_word_embeddings=True)
    adapter = make_tiny_adapter(base, tmp_path / "a", targets=("q_proj", "k_proj", "down_proj"))
    result = merge_model(str(base), [str(adapter)], tmp_path / "out", output_type="pth")
    assert result.verify.max_abs_diff <= result.verify.tolerance and result.verify.argmax_agreement == 1.0
