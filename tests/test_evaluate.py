"""`lorakit eval` and `lorakit data preview` through the CLI, checked against independent computations."""

from __future__ import annotations

import json
import math

import torch

from cli_helpers import run_cli
from lorakit.data import IGNORE_INDEX, read_examples, tokenize_example
from lorakit.models import load_model, load_tokenizer
from lorakit.prompts import get_prompter


def test_eval_loss_equals_per_example_average(tiny_model_dir, tiny_alpaca_json, capsys):
    assert run_cli("eval", "--base-model", tiny_model_dir, "--data-path", tiny_alpaca_json, "--limit", "6",
                   "--cutoff-len", "128", "--no-train-on-inputs", "--micro-batch-size", "4") == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])

    tok, model = load_tokenizer(tiny_model_dir), load_model(tiny_model_dir)
    prompter = get_prompter("alpaca")
    total, count = 0.0, 0
    for ex in read_examples(tiny_alpaca_json)[0][:6]:  # one example at a time: no padding involved
        f = tokenize_example(ex, prompter, tok, cutoff_len=128, train_on_inputs=False)
        labels = torch.tensor([f["labels"]])
        n = int((labels[:, 1:] != IGNORE_INDEX).sum())
        with torch.no_grad():
            total += float(model(torch.tensor([f["input_ids"]]), labels=labels).loss) * n
        count += n
    assert result["tokens"] == count
    assert math.isclose(result["loss"], total / count, rel_tol=1e-4)
    assert math.isclose(result["perplexity"], math.exp(total / count), rel_tol=1e-4)


def test_preview_shows_what_the_trainer_sees(tiny_model_dir, tiny_alpaca_json, capsys):
    args = ["data", "preview", "--base-model", tiny_model_dir, "--data-path", tiny_alpaca_json, "--num", "2",
            "--no-train-on-inputs", "--cutoff-len", "64"]
    assert run_cli(*args, "--json") == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    tok = load_tokenizer(tiny_model_dir)
    ex = read_examples(tiny_alpaca_json)[0][0]
    expected = tokenize_example(ex, get_prompter("alpaca"), tok, cutoff_len=64, train_on_inputs=False)
    assert len(rows) == 2 and rows[0]["input_ids"] == expected["input_ids"] and rows[0]["labels"] == expected["labels"]

    assert run_cli(*args) == 0
    text = capsys.readouterr().out
    assert "[MASKED]" in text and "[LABEL]" in text and "### Response:" in text
