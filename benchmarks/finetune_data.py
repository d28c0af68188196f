"""Speed and memory of finetune's data preparation: the example cache with 1 and 2 workers, side by side,
its cache-hit load time, and the in-memory path it replaces (read_examples + tokenize_examples).

    python benchmarks/finetune_data.py --examples 20000 --workers 1 2 [--format jsonl|json|parquet] [--in-memory]

The data is data/alpaca_en_demo.json's records repeated to --examples records (each with its number in the
instruction, so no two are the same) in a temporary file. Each measurement runs in a fresh process
(`--inner`): load the tokenizer, build the cache (a miss: its own empty cache folder), then load it again (a
hit). The Rust tokenizer's own threads are off (TOKENIZERS_PARALLELISM=false), so N workers use N cores.
Printed per run: examples, tokens, seconds, examples/s, tokens/s, CPU seconds (process and workers), the
CPU seconds of the busiest process (the main process reading and writing, or the busiest tokenizing worker),
peak RSS, the cache-hit time, the speed-up in wall time over the first run, and "on free cores": the first
run's busiest CPU time over this run's, the speed-up to expect when every process has a core of its own
(wall-time ratios mean little on a machine busy with other work). Everything temporary is deleted at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def make_data(folder: Path, n: int, fmt: str) -> Path:
    source = json.loads((ROOT / "data" / "alpaca_en_demo.json").read_text(encoding="utf-8"))
    records = [{**source[i % len(source)], "instruction": f"{i}. {source[i % len(source)]['instruction']}"}
               for i in range(n)]
    path = folder / f"data.{fmt}"
    if fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(records), path)
    elif fmt == "json":
        path.write_text(json.dumps(records, ensure_ascii=False, indent=1), encoding="utf-8")
    else:
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def inner(args: argparse.Namespace) -> None:
    from lorakit.models import ensure_pad_token, load_tokenizer, resolve_model_dir
    from lorakit.prompts import get_prompter

    model_dir = resolve_model_dir(args.model)
    tok = load_tokenizer(model_dir, add_pad_token=False)
    ensure_pad_token(tok)
    prompter = get_prompter(args.template, tok)
    me = resource.getrusage(resource.RUSAGE_SELF)
    cpu_before = me.ru_utime + me.ru_stime
    start = time.perf_counter()
    if args.in_memory:  # the code before the cache
        from lorakit.data import read_examples, tokenize_examples

        examples, _ = read_examples(args.data)
        feats = tokenize_examples(examples, prompter, tok, args.cutoff_len, False)
        n, tokens, hit = len(examples), sum(len(f["input_ids"]) for f in feats), None
        seconds = time.perf_counter() - start
        busiest = sum(resource.getrusage(resource.RUSAGE_SELF)[:2]) - cpu_before
    else:
        from lorakit.data.example_cache import load_or_build

        build = lambda: load_or_build(args.data, tok, Path(model_dir), prompter, Path(args.cache),  # noqa: E731
                                      args.workers[0], args.cutoff_len, False, show_progress=False)
        cache = build()
        seconds = time.perf_counter() - start
        main_cpu = sum(resource.getrusage(resource.RUSAGE_SELF)[:2]) - cpu_before
        n, tokens = cache.meta["read"], cache.meta["tokens"]
        worker_cpu = cache.meta["tokenizing_cpu_seconds"]
        # the main process reads and writes; with workers, they tokenize: on free cores the build lasts about
        # as long as the busiest process's CPU time
        busiest = max(main_cpu, *worker_cpu) if args.workers[0] > 1 else main_cpu
        t = time.perf_counter()
        again = build()
        again[len(again) - 1]  # touch an example
        hit = time.perf_counter() - t
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    print(json.dumps({"examples": n, "tokens": tokens, "seconds": seconds, "hit_seconds": hit, "busiest_cpu": busiest,
                      "cpu_seconds": me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime - cpu_before,
                      "peak_rss_mb": me.ru_maxrss / 1024, "worker_peak_rss_mb": kids.ru_maxrss / 1024}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--examples", type=int, default=20000)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--format", choices=["jsonl", "json", "parquet"], default="jsonl")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--template", default="alpaca")
    p.add_argument("--cutoff-len", type=int, default=256)
    p.add_argument("--in-memory", action="store_true", help="also measure the in-memory path (before the cache)")
    p.add_argument("--inner", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--cache", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.inner:
        return inner(args)
    tmp = Path(tempfile.mkdtemp(prefix="lorakit-finetune-data-"))
    try:
        data = make_data(tmp, args.examples, args.format)
        print(f"{args.examples} examples, {args.format}, {data.stat().st_size / 2**20:.1f} MB, template "
              f"{args.template}, --no-train-on-inputs, cutoff {args.cutoff_len}")
        print(f"{'path':>12} {'workers':>7} {'tokens':>10} {'s':>7} {'examples/s':>10} {'tokens/s':>9} "
              f"{'CPU s':>6} {'busiest':>7} {'peak RSS':>9} {'hit s':>6} {'speed-up':>8} {'on free cores':>13}")
        runs = [(w, False) for w in args.workers] + ([(1, True)] if args.in_memory else [])
        first = first_cpu = None
        for workers, in_memory in runs:
            cmd = [sys.executable, __file__, "--inner", "--data", str(data), "--cache", str(tmp / f"cache-{workers}"),
                   "--model", args.model, "--template", args.template, "--cutoff-len", str(args.cutoff_len),
                   "--workers", str(workers)] + (["--in-memory"] if in_memory else [])
            env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
            r = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
                           .stdout.strip().splitlines()[-1])
            rate = r["examples"] / r["seconds"]
            first, first_cpu = first or rate, first_cpu or r["busiest_cpu"]
            hit = "" if r["hit_seconds"] is None else f"{r['hit_seconds']:.3f}"
            print(f"{'in-memory' if in_memory else 'cache':>12} {workers:>7} {r['tokens']:>10,} {r['seconds']:>7.1f} "
                  f"{rate:>10,.0f} {r['tokens'] / r['seconds']:>9,.0f} {r['cpu_seconds']:>6.1f} "
                  f"{r['busiest_cpu']:>7.1f} {r['peak_rss_mb']:>6.0f} MB {hit:>6} {rate / first:>7.2f}x "
                  f"{first_cpu / r['busiest_cpu']:>12.2f}x", flush=True)
            shutil.rmtree(tmp / f"cache-{workers}", ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
