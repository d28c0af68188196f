"""QLoRA quality: the same short alpaca LoRA finetune of the real SmolLM2-135M on a bf16 base and on a
4-bit (and 8-bit) base, and the held-out loss of each, side by side.

    .venv/bin/python benchmarks/qlora_quality.py                       # bf16 vs 4bit (~12 min, 2 cores)
    .venv/bin/python benchmarks/qlora_quality.py --configs none,4bit,8bit --results-out r.json

data/alpaca_en_demo.json is split once: the first --train examples to train on, the last --heldout to
evaluate on (never trained on). Each configuration runs `lorakit finetune` through the CLI with the same
seed, data order, steps, learning rate and LoRA (r 8 on --lora-targets, q/v by default; bf16 compute), and
`lorakit eval` scores its adapter on the held-out examples on a base loaded the way it was trained on
(the 4-bit adapter on the 4-bit base: how a QLoRA adapter is used before merging), and each quantized
run's adapter also on the bf16 base (the model the QLoRA workflow ends with: `lorakit merge` puts the
adapter into the full-precision weights). Each base is also scored without an adapter, quantized the same
way: what the quantization costs before training, and how much the finetune moved. Target (issue 22):
4-bit within 3% of the bf16 LoRA's loss.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data" / "alpaca_en_demo.json"


def lorakit(*args: str) -> str:
    """Run `python -m lorakit ARGS` with this checkout's sources; its stdout (raises on failure)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    proc = subprocess.run([sys.executable, "-m", "lorakit", *args], capture_output=True, text=True, env=env,
                          check=False)
    if proc.returncode != 0:
        raise SystemExit(f"lorakit {args[0]} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc.stdout


def split_data(folder: Path, train: int, heldout: int) -> tuple[Path, Path]:
    examples = json.loads(DATA.read_text(encoding="utf-8"))
    if train + heldout > len(examples):
        raise SystemExit(f"{DATA} has {len(examples)} examples, fewer than --train + --heldout")
    train_path, heldout_path = folder / "train.json", folder / "heldout.json"
    train_path.write_text(json.dumps(examples[:train]), encoding="utf-8")
    heldout_path.write_text(json.dumps(examples[-heldout:]), encoding="utf-8")
    return train_path, heldout_path


def evaluate(args: argparse.Namespace, heldout: Path, quantization: str, adapter: Path | None) -> dict:
    cmd = ["eval", "--base-model", args.model, "--data-path", str(heldout), "--cutoff-len", str(args.cutoff),
           "--quantization", quantization, "--precision", "bf16", "--micro-batch-size", "8"]
    if adapter is not None:
        cmd += ["--lora-weights", str(adapter)]
    return json.loads(lorakit(*cmd).strip().splitlines()[-1])


def finetune(args: argparse.Namespace, train: Path, quantization: str, out: Path) -> dict:
    lorakit("finetune", "--base-model", args.model, "--data-path", str(train), "--output-dir", str(out),
            "--quantization", quantization, "--precision", "bf16", "--cutoff-len", str(args.cutoff),
            "--batch-size", str(args.batch_size), "--micro-batch-size", str(args.batch_size),
            "--max-steps", str(args.steps), "--learning-rate", str(args.lr), "--warmup-steps", str(args.warmup),
            "--val-set-size", "0", "--seed", str(args.seed), "--logging-steps", "5", "--save-steps", "100000",
            "--lora-r", "8", "--lora-alpha", "16", "--lora-target-modules", *args.lora_targets.split(","))
    return json.loads((out / "train_summary.json").read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--configs", default="none,4bit", help="comma list of none,8bit,4bit (none: the bf16 base)")
    p.add_argument("--train", type=int, default=600)
    p.add_argument("--heldout", type=int, default=48)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--cutoff", type=int, default=96)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--lora-targets", default="q_proj,v_proj", help="comma list, or all-linear (QLoRA's recipe)")
    p.add_argument("--results-out", help="write the results to this JSON file")
    args = p.parse_args()
    configs = args.configs.split(",")
    tmp = Path(tempfile.mkdtemp(prefix="qlora-quality-"))
    rows = []
    try:
        train, heldout = split_data(tmp, args.train, args.heldout)
        for config in configs:
            base = evaluate(args, heldout, config, None)
            print(f"  {config} base without adapter: held-out loss {base['loss']:.4f}", flush=True)
            t0 = time.perf_counter()
            summary = finetune(args, train, config, tmp / config)
            train_s = time.perf_counter() - t0
            result = evaluate(args, heldout, config, tmp / config)
            on_bf16 = evaluate(args, heldout, "none", tmp / config) if config != "none" else result
            rows.append({"config": config, "heldout_loss": result["loss"], "heldout_tokens": result["tokens"],
                         "base_heldout_loss": base["loss"], "on_bf16_base_loss": on_bf16["loss"],
                         "train_s": train_s, "train_summary": summary})
            print(f"  {config}: held-out loss {result['loss']:.4f} (adapter on the bf16 base: "
                  f"{on_bf16['loss']:.4f}), trained in {train_s:.0f} s", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    ref = next((r for r in rows if r["config"] == "none"), None)
    print(f"\nSmolLM2-135M ({args.model}), alpaca: {args.steps} steps x {args.batch_size} examples (cutoff "
          f"{args.cutoff}), lr {args.lr}, LoRA r 8 on {args.lora_targets}, bf16 compute, seed {args.seed}; "
          f"held-out: last {args.heldout} examples ({rows[0]['heldout_tokens'] if rows else 0} target tokens)")
    print("| trained on | held-out loss, no adapter | vs bf16 | after LoRA, on the base trained on | vs bf16 LoRA "
          "| adapter on the bf16 base (merged) | vs bf16 LoRA | train s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        keys = ("base_heldout_loss", "heldout_loss", "on_bf16_base_loss")
        rel = [f"{100 * r[k] / ref[k if k != 'on_bf16_base_loss' else 'heldout_loss'] - 100:+.2f}%" if ref else "-"
               for k in keys]
        print(f"| {r['config'] if r['config'] != 'none' else 'bf16'} | {r['base_heldout_loss']:.4f} | {rel[0]} | "
              f"{r['heldout_loss']:.4f} | {rel[1]} | {r['on_bf16_base_loss']:.4f} | {rel[2]} | {r['train_s']:.0f} |")
    if args.results_out:
        out = {"measured": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "settings": vars(args),
               "rows": rows}
        Path(args.results_out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
