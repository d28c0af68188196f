"""The causal-LM losses must be transformers' ForCausalLMLoss, value and gradient, in bf16 and fp32: the
chunked one on given logits, the fused one on hidden states and the lm_head weight."""

from __future__ import annotations

import pytest
import torch
from transformers.loss.loss_utils import ForCausalLMLoss

from lorakit.train import loss as L


def _loss_and_grad(fn, logits: torch.Tensor, labels: torch.Tensor, vocab: int | None = None, **kwargs):
    x = logits.clone().requires_grad_()
    value = fn(x, labels, vocab or logits.shape[-1], **kwargs)
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


def _fused_loss_and_grad(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, **kwargs):
    head = L.FusedLMHead(torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False))
    head.weight = torch.nn.Parameter(weight, requires_grad=False)
    head.defer = True  # as the pre-hook sets it for a training forward with labels
    return _loss_and_grad(lambda h, *a, **k: L.causal_lm_loss(h, *a, head=head, **k), hidden, labels,
                          vocab=weight.shape[0], **kwargs)


def _assert_as_close_as(grad: torch.Tensor, ref_grad: torch.Tensor, exact: torch.Tensor) -> None:
    """`grad` is no further from the exact fp32 gradient than transformers' `ref_grad` (up to 2x)."""
    ref_error, error = (ref_grad.float() - exact).norm(), (grad.float() - exact).norm()
    assert error <= 2 * ref_error and error < 0.01 * exact.norm(), (error, ref_error)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_items", [None, 37])
def test_fused_head_equals_linear_then_transformers_loss(dtype, num_items, monkeypatch):
    monkeypatch.setattr(L, "_head_rows_per_block", lambda vocab: 4)  # several blocks and a ragged last one
    torch.manual_seed(0)
    hidden = torch.randn(2, 13, 24).to(dtype)
    weight = (torch.randn(301, 24) / 2).to(dtype)
    labels = torch.randint(0, 301, (2, 13))
    labels[0, :4] = L.IGNORE_INDEX
    labels[1, -3:] = L.IGNORE_INDEX
    kwargs = {} if num_items is None else {"num_items_in_batch": torch.tensor(num_items)}
    ref_value, ref_grad = _loss_and_grad(lambda h, *a, **k: ForCausalLMLoss(h @ weight.t(), *a, **k), hidden,
                                         labels, vocab=301, **kwargs)
    value, grad = _fused_loss_and_grad(hidden, weight, labels, **kwargs)
    assert grad.dtype == dtype
    torch.testing.assert_close(value.float(), ref_value.float(), rtol=1e-6, atol=1e-6)
    if dtype == torch.float32:
        torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=1e-7)
    else:  # both round once to bf16 (the reference after scaling p - onehot, the fused loss before):
        # as close to the fp32 gradient of the same inputs as transformers' bf16 gradient is
        _, exact = _loss_and_grad(lambda h, *a, **k: ForCausalLMLoss(h @ weight.float().t(), *a, **k),
                                  hidden.float(), labels, vocab=301, **kwargs)
        _assert_as_close_as(grad, ref_grad, exact)
    assert grad[0, 2].abs().sum() == 0 and grad[1, -1].abs().sum() == 0  # ignored targets: no gradient
    assert grad[0, 3].abs().sum() > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_head_gives_finite_huge_losses(dtype):
    """A target far below its row's maximum (p(target) underflows to 0 in fp32) still gets its true loss."""
    torch.manual_seed(3)
    hidden = torch.randn(1, 6, 8).to(dtype)
    weight = torch.randn(40, 8)
    labels = torch.randint(0, 40, (1, 6))
    h = hidden[0, 1].float()
    weight[labels[0, 2]] = -300 * h / h.dot(h)  # this target's logit at the position before it: -300
    weight = weight.to(dtype)
    ref_value, ref_grad = _loss_and_grad(lambda h, *a, **k: ForCausalLMLoss(h @ weight.t(), *a, **k), hidden,
                                         labels, vocab=40)
    value, grad = _fused_loss_and_grad(hidden, weight, labels)
    assert ref_value.float() > 250 / 5  # one of the 5 predicted tokens: exp(-loss) is 0 in fp32
    torch.testing.assert_close(value.float(), ref_value.float(), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(grad.float(), ref_grad.float(), rtol=2e-2, atol=2e-2)


def test_fused_head_under_autocast_computes_in_bf16_and_returns_fp32_gradients():
    torch.manual_seed(2)
    hidden, weight = torch.randn(1, 9, 16), torch.randn(50, 16)
    labels = torch.randint(0, 50, (1, 9))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref_value, ref_grad = _loss_and_grad(lambda h, *a, **k: ForCausalLMLoss(h @ weight.t(), *a, **k), hidden,
                                             labels, vocab=50)
        value, grad = _fused_loss_and_grad(hidden, weight, labels)
    assert grad.dtype == torch.float32
    torch.testing.assert_close(value, ref_value, rtol=1e-6, atol=1e-6)
    exact_value, exact = _loss_and_grad(lambda h, *a, **k: ForCausalLMLoss(h @ weight.t(), *a, **k), hidden,
                                        labels, vocab=50)
    _assert_as_close_as(grad, ref_grad, exact)
    assert value != exact_value  # really computed in bf16, as autocast would


def test_training_uses_the_fused_head(tiny_model_dir, tiny_alpaca_json, tmp_path, monkeypatch):
    """`train` installs the fused loss (the loss curve tests of test_packing then run on it); eval the chunked one."""
    from lorakit.config import build_config
    from lorakit.train.config import FinetuneConfig
    from lorakit.train.finetune import finetune

    calls = {"fused": 0, "chunked": 0}
    for name, cls in (("fused", L.LinearCrossEntropy), ("chunked", L.ChunkedCrossEntropy)):
        real = cls.forward
        monkeypatch.setattr(cls, "forward", staticmethod(
            lambda *a, name=name, real=real: calls.__setitem__(name, calls[name] + 1) or real(*a)))
    cfg = build_config(FinetuneConfig, dict(
        base_model=str(tiny_model_dir), data_path=str(tiny_alpaca_json), output_dir=str(tmp_path / "out"),
        batch_size=4, micro_batch_size=4, max_steps=1, val_set_size=4, eval_steps=1, cutoff_len=64,
        logging_steps=1))
    summary = finetune(cfg)
    assert summary.global_step == 1 and summary.eval_loss is not None
    assert calls["fused"] == 1 and calls["chunked"] >= 1


def _tiny_lora_grads(model, ids: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, dict]:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    peft_model.train()
    loss = peft_model(input_ids=ids, labels=labels).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in peft_model.named_parameters() if p.requires_grad}


def test_fused_head_in_a_model_gives_transformers_loss_and_lora_gradients(tiny_model_dir, monkeypatch):
    from lorakit.models import load_model

    fused_rows = []
    real = L.LinearCrossEntropy.forward
    monkeypatch.setattr(L.LinearCrossEntropy, "forward", staticmethod(
        lambda ctx, hidden, *a: fused_rows.append(len(hidden)) or real(ctx, hidden, *a)))

    ids = torch.randint(5, 1000, (2, 11), generator=torch.Generator().manual_seed(3))
    labels = ids.clone()
    labels[:, :5] = L.IGNORE_INDEX  # a masked prompt: those rows get no logits at all
    ref_loss, ref_grads = _tiny_lora_grads(load_model(tiny_model_dir, torch.float32), ids, labels)
    model = load_model(tiny_model_dir, torch.float32)
    keys, tied = set(model.state_dict()), model.lm_head.weight is model.model.embed_tokens.weight
    assert L.install_training_loss(model)
    assert isinstance(model.lm_head, L.FusedLMHead) and set(model.state_dict()) == keys
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    loss, grads = _tiny_lora_grads(model, ids, labels)
    torch.testing.assert_close(loss, ref_loss)
    assert grads.keys() == ref_grads.keys() and len(grads) == 8
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)
    assert fused_rows == [22] and not model.lm_head.defer  # it ran, and is reset after the forward


def test_trainable_head_and_plain_forwards_get_real_logits(tiny_model_dir):
    from lorakit.models import load_model

    model = load_model(tiny_model_dir, torch.float32)
    ids = torch.tensor([[5, 9, 200, 31, 7]])
    expected_logits = model(input_ids=ids).logits
    L.install_training_loss(model)
    model.train()
    torch.testing.assert_close(model(input_ids=ids).logits, expected_logits)  # no labels: logits, not hidden
    model.lm_head.weight.requires_grad_(True)  # e.g. a trained output layer: not fused, still right
    expected = torch.nn.functional.cross_entropy(expected_logits[0, :-1], ids[0, 1:])
    loss = model(input_ids=ids, labels=ids).loss
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert model.lm_head.weight.grad is not None and model.lm_head.weight.grad.abs().sum() > 0


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


@pytest.mark.parametrize("n_rows", [0, 1, 10, 255, 256, 257, 610, 700, 830, 1793, 3841, 4880, 5000])
def test_lm_head_blocks_are_few_and_even(n_rows):
    from lorakit.train.loss import even_block_rows

    rows = even_block_rows(n_rows, 256)
    assert 0 < rows <= 256
    sizes = [min(rows, n_rows - start) for start in range(0, n_rows, rows)]
    assert sum(sizes) == n_rows and len(sizes) == -(-n_rows // 256)  # the fewest blocks of <= 256 rows
    assert not sizes or sizes[0] - sizes[-1] < len(sizes)  # no ragged last block of a few rows
