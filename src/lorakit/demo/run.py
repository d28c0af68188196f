"""`lorakit demo` (`make demo`): teach smollm2-135m to convert dates with LoRA; accuracy before/after."""

from __future__ import annotations

import json
import logging
import shlex
import time
from pathlib import Path

from lorakit.data import read_examples
from lorakit.demo.config import DemoConfig
from lorakit.demo.task import INSTRUCTION, make_split, score
from lorakit.files import write_atomic
from lorakit.models import load_model_and_tokenizer
from lorakit.prompts import get_prompter
from lorakit.train.config import FinetuneConfig
from lorakit.train.evaluate import greedy_responses
from lorakit.train.finetune import finetune
from lorakit.train.launch import train_as_configured

log = logging.getLogger("lorakit")


def _accuracy(base_model: str, adapters: list[str], test_file: Path) -> tuple[float, float, list[str]]:
    model, tokenizer = load_model_and_tokenizer(base_model, adapters=adapters, merge=True)
    prompter = get_prompter("chat", tokenizer)
    examples, _ = read_examples(test_file)
    responses = greedy_responses(model, tokenizer, prompter, examples, max_new_tokens=16, batch_size=20)
    scores = [score(r, ex.output or "") for r, ex in zip(responses, examples, strict=True)]
    n = len(scores)
    return sum(s[0] for s in scores) / n, sum(s[1] for s in scores) / n, responses


def _write_jsonl(path: Path, records: list[dict]) -> None:
    write_atomic(path, "".join(json.dumps(r) + "\n" for r in records))


def run_demo(cfg: DemoConfig) -> int:
    """The `lorakit demo` verb: accuracy before, fine-tune, accuracy after; returns the exit code."""
    t0 = time.perf_counter()
    out = Path(cfg.output_dir)
    (out / "data").mkdir(parents=True, exist_ok=True)
    train_records, test_records = make_split(cfg.num_train, cfg.num_test, cfg.seed)
    train_file, test_file = out / "data" / "train.jsonl", out / "data" / "test.jsonl"
    _write_jsonl(train_file, train_records)
    _write_jsonl(test_file, test_records)
    print(f"task: {test_records[0]['instruction']}\n  e.g. {test_records[0]['input']!r} -> "
          f"{test_records[0]['output']!r}   ({cfg.num_train} train / {cfg.num_test} held-out dates)", flush=True)

    print("measuring the base model on the held-out dates ...", flush=True)
    before_exact, before_contains, before_resp = _accuracy(cfg.base_model, [], test_file)
    print(f"  before: exact {before_exact:.0%}, right date somewhere in the answer {before_contains:.0%}", flush=True)
    print(f"  e.g. {test_records[0]['input']!r} -> {before_resp[0]!r}", flush=True)

    adapter_dir = out / "adapter"
    train_cfg = FinetuneConfig(
        base_model=cfg.base_model, data_path=str(train_file), output_dir=str(adapter_dir), prompt_template="chat",
        train_on_inputs=False, cutoff_len=128, batch_size=cfg.batch_size, micro_batch_size=cfg.micro_batch_size,
        max_steps=cfg.max_steps, learning_rate=cfg.learning_rate, warmup_steps=5, lr_scheduler="cosine",
        lora_r=cfg.lora_r, lora_alpha=2 * cfg.lora_r, lora_dropout=0.05, lora_target_modules=["all-linear"],
        val_set_size=32, eval_steps=16, save_steps=cfg.max_steps, logging_steps=5, precision=cfg.precision,
        seed=cfg.seed, overwrite=True)
    print(f"fine-tuning LoRA (r={cfg.lora_r}, all linear layers, {cfg.max_steps} steps of {cfg.batch_size}) ...",
          flush=True)
    summary = train_as_configured(train_cfg, "finetune", finetune)  # --nproc auto: one process per core on a CPU

    print("measuring the fine-tuned model on the same held-out dates ...", flush=True)
    after_exact, after_contains, after_resp = _accuracy(cfg.base_model, [str(adapter_dir)], test_file)
    minutes = (time.perf_counter() - t0) / 60
    report = {"task": "date to ISO 8601", "held_out": cfg.num_test, "before_exact": before_exact,
              "before_contains": before_contains, "after_exact": after_exact, "after_contains": after_contains,
              "train_steps": summary.global_step, "train_loss": summary.train_loss, "eval_loss": summary.eval_loss,
              "tokens_per_second": summary.tokens_per_second, "precision": summary.precision, "minutes": minutes,
              "examples": [{"input": r["input"], "expected": r["output"], "before": b, "after": a}
                           for r, b, a in list(zip(test_records, before_resp, after_resp, strict=True))[:5]]}
    (out / "report.json").write_text(json.dumps(report, indent=2), encoding="utf-8")

    print("\n================ lorakit demo ================")
    print(f"held-out accuracy (exact answer)  before {before_exact:6.1%}   after {after_exact:6.1%}")
    print(f"right date in the answer          before {before_contains:6.1%}   after {after_contains:6.1%}")
    print(f"training: {summary.global_step} steps, {summary.tokens_per_second:.0f} tokens/s ({summary.precision}), "
          f"eval loss {summary.eval_loss:.3f}; total {minutes:.1f} min")
    for ex in report["examples"][:3]:
        print(f"  {ex['input']!r}: before {ex['before']!r}  after {ex['after']!r}  (expected {ex['expected']})")
    print(f"adapter: {adapter_dir}   loss plot: {adapter_dir / 'loss.png'}   report: {out / 'report.json'}")
    print("chat with it:")
    print("  .venv/bin/" + shlex.join(chat_command(cfg, str(adapter_dir))))
    return 0


def chat_command(cfg: DemoConfig, adapter_dir: str) -> list[str]:
    """The command line the demo prints to try its adapter (tested to parse with the real CLI)."""
    return ["lorakit", "generate", "--base-model", cfg.base_model, "--lora-weights", adapter_dir,
            "--prompt-template", "chat", "--instruction", INSTRUCTION, "--input", "July 4, 1976"]
