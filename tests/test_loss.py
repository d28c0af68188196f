"""The chunked causal-LM loss must be transformers' ForCausalLMLoss, value and gradient, in bf16 and fp32."""

from __future__ import annotations

import pytest
import torch
from transformers.loss.loss_utils import ForCausalLMLoss

from lorakit.train import loss as L


def _loss_and_grad(fn, logits: torch.Tensor, labels: torch.Tensor, **kwargs):
    x = logits.clone().requires_grad_()
    value = fn(x, labels, logits.shape[-1], **kwargs)
    (value * 3.0).backward()  # a non-unit upstream gradient must be applied too
    return value.detach(), x.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_items", [None, 37])
def test_equals_transformers_loss(dtype, num_items, monkeypatch):
    monkeypatch.setattr(L, "_rows_per_block", lambda vocab, device: 5)  # several blocks and a ragged last one
    torch.manual_seed(0)
    logits = (4 * torch.randn(2, 13, 301)).to(dtype)
    labels = torch.randint(0, 301, (2, 13))
    labels[0, :4] = L.IGNORE_INDEX  # a masked prompt
    labels[1, -3:] = L.IGNORE_INDEX
    kwargs = {} if num_items is None else {"num_items_in_batch": torch.tensor(num_items)}
    ref_value, ref_grad = _loss_and_grad(ForCausalLMLoss, logits, labels, **kwargs)
    value, grad = _loss_and_grad(L.causal_lm_loss, logits, labels, **kwargs)
    assert grad.dtype == dtype
    torch.testing.assert_close(value.float(), ref_value.float(), rtol=1e-6, atol=1e-6)
    # fp32: the same numbers; bf16: both round the same fp32 gradient once (one bf16 step at most)
    tol = dict(rtol=0, atol=1e-7) if dtype == torch.float32 else dict(rtol=2**-7, atol=1e-8)
    torch.testing.assert_close(grad.float(), ref_grad.float(), **tol)
    assert grad.float().abs().sum() > 0
    assert grad[0, 2].abs().sum() == 0  # the logits at position 2 predict label 3: masked, no gradient


def test_shift_labels_are_used_as_given():
    torch.manual_seed(1)
    logits = torch.randn(1, 6, 50)
    shift = torch.tensor([[3, 4, L.IGNORE_INDEX, 7, 8, 9]])
    labels = torch.zeros(1, 6, dtype=torch.long)  # ignored when shift_labels is given
    ref, _ = _loss_and_grad(ForCausalLMLoss, logits, labels, shift_labels=shift)
    value, _ = _loss_and_grad(L.causal_lm_loss, logits, labels, shift_labels=shift)
    torch.testing.assert_close(value, ref)
    independent = torch.nn.functional.cross_entropy(logits[0], shift[0], ignore_index=L.IGNORE_INDEX)
    torch.testing.assert_close(value, independent)


def test_training_uses_it(tiny_model_dir, tiny_alpaca_json, tmp_path, monkeypatch):
    """`train` installs the chunked loss on the model (the loss curve tests of test_packing then run on it)."""
    from lorakit.config import build_config
    from lorakit.train.config import FinetuneConfig
    from lorakit.train.finetune import finetune

    calls = []
    real = L.ChunkedCrossEntropy.forward
    monkeypatch.setattr(L.ChunkedCrossEntropy, "forward", staticmethod(lambda *a: calls.append(1) or real(*a)))
    cfg = build_config(FinetuneConfig, dict(
        base_model=str(tiny_model_dir), data_path=str(tiny_alpaca_json), output_dir=str(tmp_path / "out"),
        batch_size=4, micro_batch_size=4, max_steps=1, val_set_size=0, cutoff_len=64, logging_steps=1))
    summary = finetune(cfg)
    assert calls and summary.global_step == 1


def test_training_forward_returns_the_loss_without_logits(tiny_model_dir):
    from lorakit.models import load_model

    model = load_model(tiny_model_dir, torch.float32)
    ids = torch.tensor([[5, 9, 200, 31, 7]])
    expected = model(input_ids=ids, labels=ids).loss  # transformers' own loss, before installing
    assert L.install_training_loss(model)
    model.train()
    out = model(input_ids=ids, labels=ids)
    assert out.logits is None and "logits" not in out
    torch.testing.assert_close(out.loss, expected)
    assert model(input_ids=ids).logits is not None  # no loss computed: the logits are the output
    model.eval()
    assert model(input_ids=ids, labels=ids).logits is not None  # evaluation keeps them
