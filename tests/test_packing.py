"""Padding-free batches: a flattened micro-batch must give each example exactly the loss it has alone,
and training with and without padding must optimise the same objective (same tokens averaged)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lorakit.config import build_config
from lorakit.data import read_examples, tokenize_examples
from lorakit.data.collators import make_collator
from lorakit.data.tokenize import IGNORE_INDEX
from lorakit.models import load_model, load_tokenizer
from lorakit.prompts import get_prompter
from lorakit.train import packed_attention
from lorakit.train.config import FinetuneConfig
from lorakit.train.packed_attention import NAME as PACKED
from lorakit.train.packed_attention import use_packed_attention


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    return load_tokenizer(tiny_model_dir)


@pytest.fixture(scope="module")
def features(tok, tiny_alpaca_json):
    examples, _ = read_examples(tiny_alpaca_json)
    feats = tokenize_examples(examples[:8], get_prompter("alpaca_short", tok), tok, cutoff_len=128)
    lengths = [len(f["input_ids"]) for f in feats]
    assert len(set(lengths)) > 2, lengths  # variable lengths, or padding would be trivial
    return feats


def _lora_model(model_dir, attn: str):
    """The tiny base with a LoRA whose B is random (so the adapter path matters), dropout off."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = load_model(model_dir, torch.float32, attn_implementation="eager" if attn == "eager" else "sdpa")
    if attn == PACKED:
        assert use_packed_attention(model) and model.config._attn_implementation == PACKED
    assert model.config.use_cache  # the default: the collator must make packing safe anyway
    cfg = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"],
                     init_lora_weights=False, task_type="CAUSAL_LM")
    return get_peft_model(model, cfg)


def _token_losses(logits: torch.Tensor, ids: list[int]) -> torch.Tensor:
    """Next-token cross-entropy of one example: logits [T, V], ids [T] -> [T-1]."""
    return F.cross_entropy(logits[:-1].float(), torch.tensor(ids[1:]), reduction="none")


@pytest.mark.parametrize("attn", ["eager", "sdpa", PACKED])
def test_packed_row_equals_each_example_alone(tiny_model_dir, features, attn, monkeypatch):
    model = _lora_model(tiny_model_dir, attn)
    batch = make_collator(None, padding_free=True)([dict(f) for f in features[:4]])
    assert batch["input_ids"].shape[0] == 1 and batch["use_cache"] is False
    segments = []
    real = packed_attention.segment_lengths
    monkeypatch.setattr(packed_attention, "segment_lengths", lambda p: segments.append(real(p)) or segments[-1])
    for mode in ("train", "eval"):  # dropout is 0: train mode must give the same numbers
        model.train(mode == "train")
        _check_packed(model, batch, features[:4], leaks=attn != PACKED)
    if attn == PACKED:  # the per-example path really ran on the packed row (and the alone rows fell back)
        assert [len(f["input_ids"]) for f in features[:4]] in segments and None in segments


@torch.no_grad()
def _check_packed(model, batch: dict, features: list[dict], leaks: bool) -> None:
    """Per-token losses of each example inside the packed row [1, sum T] == the example run alone."""
    packed = model(**{k: v for k, v in batch.items() if k != "labels"}).logits[0]
    leaky = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=True).logits[0]
    start, leak = 0, 0.0
    for f in features:
        ids = f["input_ids"]
        alone = model(input_ids=torch.tensor([ids])).logits[0]
        end = start + len(ids)
        torch.testing.assert_close(_token_losses(packed[start:end], ids), _token_losses(alone, ids),
                                   atol=2e-5, rtol=1e-5)
        leak = max(leak, float((leaky[start:end] - alone).abs().max()))
        start = end
    assert start == batch["input_ids"].shape[1]
    # The check is sensitive: with a cache, sdpa/eager attention crosses example boundaries (stack pitfall
    # 2); the per-example attention splits by position_ids, so it stays inside examples even then.
    assert leak > 1e-3 if leaks else leak < 1e-4


def _count_targets(feats: list[dict]) -> int:
    """Independent count of predicted tokens: label positions 1..T-1 of each example that are not -100."""
    return sum(sum(label != IGNORE_INDEX for label in f["labels"][1:]) for f in feats)


def test_padded_and_padding_free_average_over_the_same_tokens(tiny_model_dir, features, tok, tmp_path):
    """HF Trainer divides the summed loss of the micro-batches of one step by num_items_in_batch: both
    collators must yield the same count and the same summed loss (= the independent mean CE)."""
    from transformers import Trainer, TrainingArguments

    model = _lora_model(tiny_model_dir, "sdpa")
    model.config.use_cache = False
    micro = [features[:4], features[4:8]]  # one optimizer step of two micro-batches
    n_expected = _count_targets(features[:8])
    with torch.no_grad():
        reference = sum(float(_token_losses(model(input_ids=torch.tensor([f["input_ids"]])).logits[0],
                                            f["input_ids"]).sum()) for f in features[:8]) / n_expected
        step_losses = {}
        for padding_free in (False, True):
            args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[],
                                     gradient_accumulation_steps=2)
            trainer = Trainer(model=model, args=args, data_collator=make_collator(tok, padding_free=padding_free))
            batches = [trainer.data_collator([dict(f) for f in mb]) for mb in micro]
            n_items = trainer._get_num_items_in_batch(batches, torch.device("cpu"))
            assert int(n_items) == n_expected, (padding_free, int(n_items), n_expected)
            step_losses[padding_free] = sum(float(trainer.compute_loss(model, b, num_items_in_batch=n_items))
                                            for b in batches)
    assert step_losses[False] == pytest.approx(reference, rel=1e-5)
    assert step_losses[True] == pytest.approx(reference, rel=1e-5)


def _run_finetune(model_dir, data, out, padding_free: bool):
    from lorakit.train.finetune import finetune

    cfg = build_config(FinetuneConfig, dict(
        base_model=str(model_dir), data_path=str(data), output_dir=str(out), padding_free=padding_free,
        precision="fp32", lora_dropout=0.0, batch_size=8, micro_batch_size=4, max_steps=3, learning_rate=3e-3,
        warmup_steps=0, val_set_size=8, cutoff_len=128, prompt_template="alpaca_short", logging_steps=1,
        eval_steps=100, save_steps=100))
    summary = finetune(cfg)
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    losses = [(r["step"], r["loss"]) for r in log if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in log if "eval_loss" in r]
    return summary, losses, evals


def test_padding_free_and_padded_runs_give_the_same_loss_curve(tiny_model_dir, tiny_alpaca_json, tmp_path):
    from safetensors.torch import load_file

    s_pad, loss_pad, eval_pad = _run_finetune(tiny_model_dir, tiny_alpaca_json, tmp_path / "pad", False)
    s_free, loss_free, eval_free = _run_finetune(tiny_model_dir, tiny_alpaca_json, tmp_path / "free", True)
    assert [s for s, _ in loss_pad] == [s for s, _ in loss_free] == [1, 2, 3], (loss_pad, loss_free)
    for (_, a), (_, b) in zip(loss_pad, loss_free, strict=True):
        assert a == pytest.approx(b, rel=1e-4)
    assert loss_pad[0][1] > loss_pad[-1][1]  # it did learn (lr 3e-3), so equal curves are not trivial
    assert len(eval_pad) == len(eval_free) == 1  # at the last step, once
    for (_, a), (_, b) in zip(eval_pad, eval_free, strict=True):
        assert a == pytest.approx(b, rel=1e-4)
    w_pad, w_free = load_file(tmp_path / "pad" / "adapter_model.safetensors"), \
        load_file(tmp_path / "free" / "adapter_model.safetensors")
    assert w_pad.keys() == w_free.keys()
    for k in w_pad:
        torch.testing.assert_close(w_pad[k], w_free[k], atol=2e-5, rtol=1e-3)
    # Same real tokens counted; the padded run computes pads but does not count them.
    assert s_pad.tokens_seen == s_free.tokens_seen > 0
    # Peak memory in the summary is this process's high-water mark (the kernel's VmHWM, read independently).
    status = Path("/proc/self/status").read_text().splitlines()
    hwm_kb = next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
    assert 0.95 * hwm_kb / 1024 <= s_free.peak_rss_mb <= hwm_kb / 1024 + 1
    assert s_free.peak_gpu_mb is None  # no CUDA here


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_grouped_attention_matches_sdpa_forward_and_backward(dtype, tol):
    """The per-example CPU kernel (GQA without repeating K/V) vs SDPA on repeated heads, run in fp32 as the
    reference: outputs and the gradients of q, k and v, for 9 query heads sharing 3 key/value heads."""
    from transformers.integrations.sdpa_attention import repeat_kv

    torch.manual_seed(0)
    q, k, v = torch.randn(9, 23, 16), torch.randn(3, 23, 16), torch.randn(3, 23, 16)
    upstream = torch.randn(9, 23, 16)

    def run(fn, cast):
        leaves = [t.to(cast, copy=True).requires_grad_() for t in (q, k, v)]
        out = fn(*leaves)
        out.backward(upstream.to(cast))
        return [out.float()] + [t.grad.float() for t in leaves]

    def reference(q_, k_, v_):
        return F.scaled_dot_product_attention(q_[None], repeat_kv(k_[None], 3), repeat_kv(v_[None], 3),
                                              is_causal=True, scale=0.3)[0]

    expected = run(reference, torch.float32)
    got = run(lambda a, b, c: packed_attention.grouped_causal_attention(a, b, c, 0.3), dtype)
    for name, g, e in zip(("out", "dq", "dk", "dv"), got, expected, strict=True):
        assert float((g - e).norm() / e.norm()) < tol, name


def test_packed_row_is_rounded_up_by_a_separate_pad_segment(tiny_model_dir, features, tok):
    """The pad tail must change nothing: same per-example losses, no targets, positions restarting at 0."""
    from lorakit.data.collators import PACKED_LENGTH_MULTIPLE

    model = _lora_model(tiny_model_dir, PACKED).eval()
    plain = make_collator(None, padding_free=True)([dict(f) for f in features[:3]])
    rounded = make_collator(tok, padding_free=True)([dict(f) for f in features[:3]])
    n, m = plain["input_ids"].shape[1], rounded["input_ids"].shape[1]
    assert m % PACKED_LENGTH_MULTIPLE == 0 and n <= m < n + PACKED_LENGTH_MULTIPLE and m > n, (n, m)
    assert (rounded["input_ids"][0, n:] == tok.pad_token_id).all()
    assert (rounded["labels"][0, n:] == IGNORE_INDEX).all()
    assert rounded["position_ids"][0, n:].tolist() == list(range(m - n))
    for key in ("input_ids", "labels", "position_ids"):
        assert torch.equal(rounded[key][:, :n], plain[key])
    with torch.no_grad():
        a = model(**plain).logits[0]
        b = model(**{k: v for k, v in rounded.items() if k != "labels"}).logits[0, :n]
        loss_plain, loss_rounded = model(**plain).loss, model(**rounded).loss
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(loss_plain, loss_rounded)
