"""FastDropout must be inverted dropout with independent per-element masks; speed_up_lora must swap
PEFT's LoRA dropouts without changing what the adapter computes or saves."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lorakit.train.lora_layers import FastDropout, dropped_positions, speed_up_lora


@pytest.mark.parametrize("p", [0.05, 0.5, 0.9])
def test_mask_rate_scale_and_independence(p):
    torch.manual_seed(0)
    drop = FastDropout(p).train()
    x = torch.ones(4096, 1000)
    y = drop(x)
    dropped = y == 0
    n = x.numel()
    sigma = (p * (1 - p) / n) ** 0.5
    assert abs(float(dropped.float().mean()) - p) < 5 * sigma
    torch.testing.assert_close(y[~dropped], torch.full_like(y[~dropped], 1 / (1 - p)))
    assert abs(float(y.mean()) - 1.0) < 5 * sigma / (1 - p)  # unbiased: E[y] = x
    # the same rate everywhere (start, middle, end of the tensor: the gaps never run short)...
    parts = dropped.flatten().view(8, -1).float().mean(1)
    assert (parts - p).abs().max() < 5 * (p * (1 - p) / (n / 8)) ** 0.5, parts
    # ...and neighbours independent: P(both dropped) = p^2, P(next dropped | dropped) = p
    pairs = dropped.flatten().view(-1, 2)
    both = float((pairs[:, 0] & pairs[:, 1]).float().mean())
    assert abs(both - p**2) < 5 * (p**2 * (1 - p**2) / (n / 2)) ** 0.5
    assert not torch.equal(drop(x) == 0, dropped)  # a fresh mask per call


def test_gaps_between_drops_are_geometric():
    """The run lengths of kept elements follow P(run = k) = (1 - p)^k p, checked on the first few k."""
    torch.manual_seed(1)
    p = 0.2
    positions = dropped_positions(2_000_000, p)
    runs = (positions[1:] - positions[:-1] - 1).float()
    for k in range(5):
        expected = (1 - p) ** k * p
        observed = float((runs == k).float().mean())
        assert abs(observed - expected) < 5 * (expected * (1 - expected) / len(runs)) ** 0.5, (k, observed)
    assert positions[0] >= 0 and positions[-1] < 2_000_000 and bool((positions[1:] > positions[:-1]).all())


def test_gradient_is_the_mask_times_the_scale_and_seeded_runs_repeat():
    drop = FastDropout(0.3).train()
    x = torch.randn(33, 17, dtype=torch.bfloat16, requires_grad=True)
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
