"""The swapped-in RMSNorm must be transformers' LlamaRMSNorm: same forward bits, same gradients (input and weight)."""

from __future__ import annotations

import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from lorakit.models.rmsnorm import RMSNorm, swap_rmsnorms


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.bfloat16, 1e-2)])
def test_forward_and_gradients_equal_transformers(dtype, tol):
    torch.manual_seed(0)
    reference = LlamaRMSNorm(48, eps=1e-5).to(dtype)
    reference.weight.data = (torch.rand(48) + 0.5).to(dtype)
    ours = RMSNorm(reference)
    x = torch.randn(2, 7, 48, dtype=dtype) * 3
    upstream = torch.randn(2, 7, 48, dtype=dtype)

    def run(module):
        leaf = x.clone().requires_grad_()
        module.weight.grad = None
        out = module(leaf)
        out.backward(upstream)
        return out, leaf.grad.float(), module.weight.grad.float()

    out_ref, dx_ref, dw_ref = run(reference)
    out, dx, dw = run(ours)
    assert torch.equal(out, out_ref)  # bit-identical forward
    for got, want in ((dx, dx_ref), (dw, dw_ref)):
        assert float((got - want).norm() / want.norm()) < tol
    with torch.no_grad():  # inference takes the fused F.rms_norm path: equal within one rounding
        got, want = ours(x).float(), reference(x).float()
    assert float((got - want).norm() / want.norm()) < tol / 10


def test_swap_keeps_weights_and_state_dict(tiny_model_dir):
    from lorakit.models import load_model

    model = load_model(tiny_model_dir, torch.float32)
    keys, ids = set(model.state_dict()), torch.tensor([[5, 9, 200, 31, 7]])
    expected = model(input_ids=ids, labels=ids)
    n_norms = sum(type(m) is LlamaRMSNorm for m in model.modules())
    assert swap_rmsnorms(model) == n_norms > 0
    assert not any(type(m) is LlamaRMSNorm for m in model.modules()) and set(model.state_dict()) == keys
    got = model(input_ids=ids, labels=ids)
    torch.testing.assert_close(got.logits, expected.logits)
    torch.testing.assert_close(got.loss, expected.loss)
