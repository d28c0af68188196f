"""The demo task's data and the demo pipeline on a tiny chat model (the real run is `make demo`)."""

from __future__ import annotations

import datetime as dt
import json

from lorakit.cli import main
from lorakit.demo.task import make_split, score, spell_date
from tiny_models import make_tiny_llama


def test_split_is_disjoint_and_correct():
    train, test = make_split(300, 50, seed=1)
    assert len(train) == 300 and len(test) == 50
    assert not {r["output"] for r in train} & {r["output"] for r in test}
    for r in train + test:
        date = dt.date.fromisoformat(r["output"])
        assert str(date.year) in r["input"] and date.strftime("%B")[:3] in r["input"]
    assert make_split(300, 50, seed=1) == (train, test)  # reproducible


def test_spelling_and_scoring():
    d = dt.date(2021, 3, 2)
    assert {spell_date(d, s) for s in range(6)} == {"March 2, 2021", "2 March 2021", "Mar 2, 2021",
                                                    "the 2nd of March, 2021", "March 2nd, 2021", "2 Mar. 2021"}
    assert score("2021-03-02", "2021-03-02") == (True, True)
    assert score("The date is 2021-03-02.", "2021-03-02") == (False, True)
    assert score("2021-02-03", "2021-03-02") == (False, False)


def test_demo_pipeline_on_tiny_model(tmp_path, capsys):
    model = make_tiny_llama(tmp_path / "chat", chat=True)
    out = tmp_path / "demo"
    try:
        main(["demo", "--base-model", str(model), "--output-dir", str(out), "--num-train", "48", "--num-test", "4",
              "--max-steps", "2", "--batch-size", "8", "--micro-batch-size", "8", "--precision", "fp32"])
    except SystemExit as e:
        assert e.code == 0
    report = json.loads((out / "report.json").read_text())
    assert report["held_out"] == 4 and report["train_steps"] == 2
    assert 0.0 <= report["after_exact"] <= 1.0 and len(report["examples"]) == 4
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert "held-out accuracy" in capsys.readouterr().out
