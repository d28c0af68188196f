"""The engine's CPU module swaps (fused q/k/v and gate/up, prepacked bf16 weights, fused RMSNorm) against
the same model as transformers runs it: logits of a left-padded batch, prefill and cached decode steps."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache

from lorakit.generate.cpu_inference import (
    FusedAttention,
    FusedMLP,
    PackedLinear,
    optimize_for_cpu,
    packing_works,
)
from lorakit.models.rmsnorm import RMSNorm
from tiny_models import make_tiny_llama


def decode_logits(model, ids: torch.Tensor, mask: torch.Tensor, steps: int) -> list[torch.Tensor]:
    """Prefill a left-padded batch, then `steps` cached decode steps feeding fixed tokens: logits of each."""
    cache = DynamicCache(config=model.config)
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    with torch.inference_mode():
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache, use_cache=True)
        logits = [out.logits[:, -1].float()]
        for step in range(steps):
            token = torch.full((ids.shape[0], 1), 100 + 7 * step)
            mask = torch.cat([mask, torch.ones_like(token)], dim=1)
            out = model(input_ids=token, attention_mask=mask, position_ids=mask.sum(1, keepdim=True) - 1,
                        past_key_values=cache, use_cache=True)
            logits.append(out.logits[:, -1].float())
    return logits


@pytest.mark.parametrize("tied", [False, True])
def test_fused_packed_model_gives_transformers_logits(tmp_path, tied):
    folder = make_tiny_llama(tmp_path / "m", hidden_size=128, heads=4, kv_heads=2, intermediate_size=256,
                             tie_word_embeddings=tied)
    ref = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).eval()
    fast = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).eval()
    summary = optimize_for_cpu(fast)
    layers = len(fast.model.layers)
    # per layer: attention, MLP and two norms fused; qkv, o, gate_up and down packed; + final norm, lm_head
    from lorakit.precision import bf16_supported

    assert packing_works() or not bf16_supported()  # where bf16 is native (this CPU) packing must work
    packed = layers * 4 + 1 if packing_works() else 0
    assert summary == f"{layers * 4 + 1} modules fused, {packed} linears prepacked"
    kinds = {type(m) for m in fast.modules()}
    assert {FusedAttention, FusedMLP, RMSNorm} <= kinds
    assert (PackedLinear in kinds and torch.nn.Linear not in kinds) == bool(packed)

    ids = torch.tensor([[0, 0, 0, 5, 60, 700, 80], [1, 42, 43, 44, 45, 46, 47]])
    mask = (torch.arange(7) >= torch.tensor([[3], [0]])).long()  # row 0 left-padded
    for step, (want, got) in enumerate(zip(decode_logits(ref, ids, mask, 4), decode_logits(fast, ids, mask, 4),
                                           strict=True)):
        scale = want.abs().max()
        assert (got - want).abs().max() <= 0.02 * scale, f"step {step}"
        assert (got.argmax(-1) == want.argmax(-1)).all(), f"step {step}"


def test_models_whose_weights_still_change_are_left_alone(tiny_model_dir):
    from peft import LoraConfig, get_peft_model

    fp32 = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert optimize_for_cpu(fp32) is None and not any(isinstance(m, PackedLinear) for m in fp32.modules())
    bf16 = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16)
    switchable = get_peft_model(bf16, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    assert optimize_for_cpu(switchable) is None  # PEFT merges into / unmerges from these layers
