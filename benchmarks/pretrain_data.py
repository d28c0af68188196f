"""Peak memory and speed of pretrain's data preparation: the token cache (today) vs the in-memory lists (before).

    python benchmarks/pretrain_data.py --sizes-mb 10 400 --workers 1 2 [--model smollm2-135m] [--in-memory]

For each corpus size, a corpus is made by repeating data/wiki_demo.txt into a temporary folder; each
measurement runs in a fresh process (`--inner`): load the tokenizer, build the token cache (a miss: its
own empty cache folder), cut blocks of --block-size, split. The Rust tokenizer's own threads are off
(TOKENIZERS_PARALLELISM=false), so N workers use N cores. Printed per run: tokens, seconds, tokens/s,
CPU seconds (the process and its workers, from the tokenizer load on), peak RSS of the process and of its
largest tokenizing worker, and a second run's time (a cache hit).
Everything temporary is deleted at the end.
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


def make_corpus(folder: Path, megabytes: int) -> Path:
    source = (ROOT / "data" / "wiki_demo.txt").read_bytes()
    if not source.endswith(b"\n"):
        source += b"\n"
    path = folder / f"corpus_{megabytes}mb.txt"
    with open(path, "wb") as f:
        while f.tell() < megabytes * 2**20:
            f.write(source)
    return path


def inner(args: argparse.Namespace) -> None:
    import numpy as np

    from lorakit.data.blocks import TokenBlocks
    from lorakit.data.token_cache import load_or_build
    from lorakit.models import load_tokenizer, resolve_model_dir

    model_dir = resolve_model_dir(args.model)
    tok = load_tokenizer(model_dir, add_pad_token=False)
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    me = resource.getrusage(resource.RUSAGE_SELF)
    cpu_before = me.ru_utime + me.ru_stime
    start = time.perf_counter()
    if args.in_memory:  # the code before the cache: documents, a C int array, lists of blocks
        from lorakit.data import read_text_documents
        from lorakit.train.pretrain import make_blocks, tokenize_documents

        stream = tokenize_documents(read_text_documents(args.corpus), tok, show_progress=False)
        blocks, n_tokens = make_blocks(stream, args.block_size), len(stream)
        hit_seconds = None
    else:
        cache = load_or_build(args.corpus, tok, Path(model_dir), Path(args.cache), args.workers[0],
                              show_progress=False)
        blocks, n_tokens = TokenBlocks(cache.tokens, args.block_size), len(cache)
        train, _ = blocks.split(0, 42)
        int(np.asarray(train[len(train) - 1]["input_ids"]).sum())  # touch a block
        seconds = time.perf_counter() - start
        t = time.perf_counter()
        load_or_build(args.corpus, tok, Path(model_dir), Path(args.cache), args.workers[0], show_progress=False)
        hit_seconds = time.perf_counter() - t
    seconds = time.perf_counter() - start if args.in_memory else seconds
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime - cpu_before
    print(json.dumps({"tokens": n_tokens, "cpu_seconds": cpu, "blocks": len(blocks), "seconds": seconds,
                      "tokens_per_second": n_tokens / seconds, "hit_seconds": hit_seconds,
                      "rss_after_tokenizer_mb": base_rss,
                      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "worker_peak_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes-mb", type=int, nargs="+", default=[10, 400])
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--block-size", type=int, default=256)
    p.add_argument("--in-memory", action="store_true", help="also measure the in-memory path (before the cache)")
    p.add_argument("--inner", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--corpus", help=argparse.SUPPRESS)
    p.add_argument("--cache", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.inner:
        return inner(args)
    tmp = Path(tempfile.mkdtemp(prefix="lorakit-pretrain-data-"))
    try:
        print(f"{'corpus':>8} {'path':>12} {'workers':>7} {'tokens':>11} {'s':>7} {'tokens/s':>9} {'CPU s':>6} "
              f"{'peak RSS':>9} {'worker RSS':>10} {'hit s':>6}")
        for mb in args.sizes_mb:
            corpus = make_corpus(tmp, mb)
            runs = [(w, False) for w in args.workers] + ([(1, True)] if args.in_memory else [])
            for workers, in_memory in runs:
                cache = tmp / f"cache-{mb}-{workers}"
                cmd = [sys.executable, __file__, "--inner", "--corpus", str(corpus), "--cache", str(cache),
                       "--model", args.model, "--block-size", str(args.block_size), "--workers", str(workers)]
                # one worker = one thread: the Rust tokenizer's own threads off, as in the workers
                env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
                out = subprocess.run(cmd + (["--in-memory"] if in_memory else []), check=True, capture_output=True,
                                     text=True, env=env).stdout
                r = json.loads(out.strip().splitlines()[-1])
                hit = "" if r["hit_seconds"] is None else f"{r['hit_seconds']:.2f}"
                print(f"{mb:>6}MB {'in-memory' if in_memory else 'token cache':>12} {workers:>7} {r['tokens']:>11,} "
                      f"{r['seconds']:>7.1f} {r['tokens_per_second']:>9,.0f} {r['cpu_seconds']:>6.1f} "
                      f"{r['peak_rss_mb']:>6.0f} MB "
                      f"{r['worker_peak_rss_mb']:>7.0f} MB {hit:>6}", flush=True)
                shutil.rmtree(cache, ignore_errors=True)
            corpus.unlink()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
