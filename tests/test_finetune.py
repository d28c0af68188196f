"""End-to-end `lorakit finetune` on tiny random LLaMA models, driven through the CLI."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lorakit.cli import main

FAST = ["--cutoff-len", "64", "--micro-batch-size", "4", "--batch-size", "8", "--warmup-steps", "1",
        "--learning-rate", "1e-3", "--precision", "fp32", "--lora-target-modules", "all-linear"]


def run_cli(*argv: str) -> int:
    try:
        main([str(a) for a in argv])
    except SystemExit as e:
        return int(e.code or 0)
    return 0


def _logged(out: Path) -> dict[int, float]:
    lines = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in lines if "loss" in r}


def test_finetune_alpaca_json(tiny_model_dir, tiny_alpaca_json, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "adapter"
    code = run_cli("finetune", "--base-model", tiny_model_dir, "--data-path", tiny_alpaca_json, "--output-dir", out,
                   "--val-set-size", "8", "--max-steps", "4", "--eval-steps", "2", "--logging-steps", "1", *FAST)
    assert code == 0
    for name in ["adapter_config.json", "adapter_model.safetensors", "lorakit_config.yaml", "tokenizer.json",
                 "train_log.jsonl", "loss.png"]:
        assert (out / name).is_file(), name
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    weights = load_file(out / "adapter_model.safetensors")
    assert len(weights) == 2 * 7 * 2  # A and B for 7 linear layers in each of 2 blocks
    assert any(t.abs().sum() > 0 for k, t in weights.items() if "lora_B" in k)
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert any("eval_loss" in r for r in log) and sorted(_logged(out)) == [1, 2, 3, 4]

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    ids = torch.tensor([[1, 400, 500, 600]])
    before = base(ids).logits
    tuned = PeftModel.from_pretrained(base, str(out))  # interoperable: plain peft loads it
    assert not torch.allclose(tuned(ids).logits, before, atol=1e-4)


def test_finetune_chat_jsonl_with_masking(tmp_path):
    from tiny_models import make_tiny_llama

    model = make_tiny_llama(tmp_path / "chat-model", chat=True)
    data = tmp_path / "chat.jsonl"
    rows = [{"messages": [{"role": "user", "content": f"Count to {i}"},
                          {"role": "assistant", "content": " ".join(map(str, range(1, i + 2)))}]} for i in range(12)]
    rows.append({"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]})
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    code = run_cli("finetune", "--base-model", model, "--data-path", data, "--output-dir", out, "--prompt-template",
                   "chat", "--no-train-on-inputs", "--val-set-size", "0", "--max-steps", "2", "--report-to",
                   "tensorboard", *FAST)
    assert code == 0 and (out / "adapter_model.safetensors").is_file()
    assert list(out.glob("runs/*/events.out.tfevents.*")), "TensorBoard logs were asked for"


def test_malformed_data_fails_cleanly(tiny_model_dir, tmp_path, capsys):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "a", "outptu": "b"}\n')
    out = tmp_path / "never"
    code = run_cli("finetune", "--base-model", tiny_model_dir, "--data-path", data, "--output-dir", out)
    err = capsys.readouterr().err
    assert code == 2
    assert f"{data}:2: field 'output': missing" in err and "Traceback" not in err
    assert not out.exists()  # nothing written


def test_existing_adapter_needs_overwrite(tiny_model_dir, tiny_alpaca_json, tmp_path, capsys):
    out = tmp_path / "o"
    out.mkdir()
    (out / "adapter_model.safetensors").write_bytes(b"x")
    code = run_cli("finetune", "--base-model", tiny_model_dir, "--data-path", tiny_alpaca_json, "--output-dir", out,
                   "--val-set-size", "0", "--max-steps", "1", *FAST)
    assert code == 2 and "--overwrite" in capsys.readouterr().err


def test_resume_is_exact(tiny_model_dir, tiny_alpaca_json, tmp_path):
    """6 steps straight == 3 steps, stop, resume to 6: same loss at every step, same adapter (fp32, dropout on)."""
    args = ["--base-model", tiny_model_dir, "--data-path", tiny_alpaca_json, "--val-set-size", "0",
            "--max-steps", "6", "--save-steps", "3", "--logging-steps", "1", "--lora-dropout", "0.1", *FAST]
    straight = tmp_path / "straight"
    assert run_cli("finetune", *args, "--output-dir", straight) == 0

    resumed = tmp_path / "resumed"  # a run stopped right after its step-3 checkpoint
    resumed.mkdir()
    shutil.copytree(straight / "checkpoint-3", resumed / "checkpoint-3")
    assert run_cli("finetune", *args, "--output-dir", resumed, "--resume-from-checkpoint", "last") == 0

    a, b = _logged(straight), _logged(resumed)
    assert sorted(b) == [4, 5, 6]
    for step in (4, 5, 6):
        assert b[step] == pytest.approx(a[step], abs=1e-5)
    wa, wb = load_file(straight / "adapter_model.safetensors"), load_file(resumed / "adapter_model.safetensors")
    assert wa.keys() == wb.keys()
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], atol=1e-5, rtol=0)

    # an adapter folder as the starting point: weights only (a vanishing lr keeps them unchanged)
    warm = tmp_path / "warm"
    warm_args = [a if a != "1e-3" else "1e-12" for a in args]  # same options, vanishing learning rate
    assert run_cli("finetune", *warm_args, "--max-steps", "1", "--resume-from-checkpoint", straight,
                   "--output-dir", warm) == 0
    ww = load_file(warm / "adapter_model.safetensors")
    for key in wa:
        torch.testing.assert_close(ww[key], wa[key], atol=1e-6, rtol=0)
