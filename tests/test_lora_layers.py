"""FastDropout must be inverted dropout with independent per-element masks; speed_up_lora must swap
PEFT's LoRA dropouts without changing what the adapter computes or saves."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lorakit.train.lora_layers import FastDropout, speed_up_lora


def test_mask_rate_scale_and_independence():
    torch.manual_seed(0)
    drop = FastDropout(0.05).train()
    x = torch.ones(4096, 1000)
    y = drop(x)
    dropped = y == 0
    n = x.numel()
    sigma = (0.05 * 0.95 / n) ** 0.5
    assert abs(float(dropped.float().mean()) - 0.05) < 5 * sigma
    torch.testing.assert_close(y[~dropped], torch.full_like(y[~dropped], 1 / (1 - drop.p)))
    assert abs(float(y.mean()) - 1.0) < 5 * sigma / 0.95  # unbiased: E[y] = x
    # Each element position inside a 64-bit random draw (4 lanes) drops at the same rate...
    lanes = dropped.flatten().view(-1, 4).float().mean(0)
    assert (lanes - 0.05).abs().max() < 5 * (0.05 * 0.95 / (n / 4)) ** 0.5, lanes
    # ...and neighbours are independent: P(both dropped) = p^2
    pairs = dropped.flatten().view(-1, 2)
    both = float((pairs[:, 0] & pairs[:, 1]).float().mean())
    assert abs(both - 0.05**2) < 5 * (0.05**2 / (n / 2)) ** 0.5
    assert not torch.equal(drop(x) == 0, dropped)  # a fresh mask per call


def test_gradient_is_the_mask_times_the_scale_and_seeded_runs_repeat():
    drop = FastDropout(0.3).train()
    x = torch.randn(33, 17, dtype=torch.bfloat16, requires_grad=True)  # odd size: a partial last draw
    torch.manual_seed(5)
    y = drop(x)
    y.float().sum().backward()
    kept = y != 0
    expected = kept.to(torch.bfloat16) * (1 / (1 - drop.p))
    torch.testing.assert_close(x.grad, expected)
    torch.manual_seed(5)
    assert torch.equal(drop(x.detach()), y.detach())


def test_eval_and_zero_rate_pass_through():
    x = torch.randn(8, 8)
    assert FastDropout(0.5).eval()(x) is x
    assert FastDropout(0.0).train()(x) is x
    with pytest.raises(ValueError):
        FastDropout(1.0)
    with pytest.raises(ValueError):
        FastDropout(0.999995)  # would round to 1: every element dropped, scale infinite


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_speed_up_lora_swaps_dropouts_and_keeps_the_adapter(tiny_model_dir, precision, tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model

    from lorakit.models import load_model

    torch.manual_seed(0)
    model = get_peft_model(load_model(tiny_model_dir, torch.float32),
                           LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=["q_proj", "v_proj"],
                                      init_lora_weights=False, task_type="CAUSAL_LM"))
    model.eval()
    ids = torch.tensor([[5, 9, 200, 31, 7]])
    before = model(input_ids=ids).logits
    n_lora = sum(1 for m in model.modules() if hasattr(m, "lora_dropout"))
    assert speed_up_lora(model, precision) == n_lora > 0
    assert not any(type(m) is nn.Dropout for m in model.modules())
    flags = {m.cast_input_dtype_enabled for m in model.modules() if hasattr(m, "cast_input_dtype_enabled")}
    assert flags == {precision == "fp32"}
    torch.testing.assert_close(model(input_ids=ids).logits, before)  # eval: dropout off, same numbers
    model.train()
    assert not torch.equal(model(input_ids=ids).logits, before)  # train: the new dropout is active
    model.save_pretrained(tmp_path / "adapter")  # the saved adapter is PEFT's, loadable as usual
    reloaded = PeftModel.from_pretrained(load_model(tiny_model_dir, torch.float32), tmp_path / "adapter").eval()
    torch.testing.assert_close(reloaded(input_ids=ids).logits, before)
