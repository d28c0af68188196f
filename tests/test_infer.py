"""`lorakit infer`: order, kept fields, responses equal to independent greedy generation, resume."""

from __future__ import annotations

import json

import pytest

from lorakit.cli import main
from lorakit.models import load_model_and_tokenizer
from lorakit.prompts import Prompter
from test_generate_helpers import hf_greedy

RECORDS = [
    {"instruction": "Name a fruit.", "id": 1},
    {"instruction": "Translate to French.", "input": "good morning", "output": "bonjour", "id": 2},
    {"messages": [{"role": "user", "content": "Say something short."}], "id": 3},
    {"instruction": "Count to three.", "input": "", "id": 4, "tags": ["x", "y"]},
    {"instruction": "A longer instruction that makes this prompt the longest one of the batch by far.", "id": 5},
]


def run(*args: str) -> int:
    with pytest.raises(SystemExit) as e:
        main(["infer", *args])
    return int(e.value.code or 0)


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def read_jsonl(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_infer_order_fields_and_resume(tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "in.jsonl", RECORDS)
    out = tmp_path / "out.jsonl"
    common = ["--base-model", str(tiny_model_dir), "--precision", "fp32",
              "--data-file", str(data), "--output", str(out), "--temperature", "0", "--max-new-tokens", "6",
              "--batch-size", "2"]
    assert run(*common, "--limit", "3") == 0
    first = out.read_bytes()
    assert len(read_jsonl(out)) == 3
    with out.open("ab") as f:  # an interrupted write leaves a torn last line
        f.write(b'{"instruction": "Count to th')
    assert run(*common) == 0
    assert out.read_bytes().startswith(first)
    rows = read_jsonl(out)
    assert [{k: v for k, v in r.items() if k != "response"} for r in rows] == RECORDS

    model, tok = load_model_and_tokenizer(str(tiny_model_dir))
    alpaca = Prompter("alpaca")  # no chat template on this tokenizer -> alpaca
    for rec, row in zip(RECORDS, rows, strict=True):
        prompt = (alpaca.generate_prompt(rec["instruction"], rec.get("input") or None) if "instruction" in rec
                  else alpaca.generate_prompt(rec["messages"][-1]["content"]))
        assert row["response"] == hf_greedy(model.eval(), tok, list(tok(prompt)["input_ids"]), 6).strip()

    assert run(*common) == 0  # nothing left to do
    assert read_jsonl(out) == rows


def test_infer_refuses_foreign_output_and_bad_records(tiny_model_dir, tmp_path, capsys):
    data = write_jsonl(tmp_path / "in.jsonl", RECORDS[:2])
    out = write_jsonl(tmp_path / "out.jsonl", [{"instruction": "something else", "response": "x"}])
    assert run("--base-model", str(tiny_model_dir), "--data-file", str(data), "--output", str(out)) == 2
    assert "does not belong" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(RECORDS[0]) + "\n" + json.dumps({"instruction": 5}) + "\n{oops\n")
    assert run("--base-model", str(tiny_model_dir), "--data-file", str(bad), "--output", str(tmp_path / "o.jsonl")) == 2
    err = capsys.readouterr().err
    assert "bad.jsonl:2: field 'instruction'" in err and "bad.jsonl:3" in err
    assert not (tmp_path / "o.jsonl").exists()
