"""Near-duplicate filter speed: indexed ROUGE-L filter vs. comparing with every kept text.

Texts are instruction-like word windows from the shared wiki_demo.txt, a third of them mutated copies
of earlier ones (the near-duplicates a model produces). Prints the time of each method on the same
texts, that they agree, and the filter's throughput at tens of thousands of texts.

    .venv/bin/python benchmarks/bench_selfinstruct_dedup.py [--n-compare 2000] [--n-large 50000]
"""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

from lorakit.selfinstruct.dedup import DuplicateFilter, lcs_length, tokenize

WIKI = Path(__file__).resolve().parents[2] / "shared" / "data" / "wiki_demo.txt"


def make_texts(n: int, seed: int = 0) -> list[str]:
    words = WIKI.read_text(encoding="utf-8").split()
    rng = random.Random(seed)
    texts: list[str] = []
    for _ in range(n):
        if texts and rng.random() < 0.33:
            w = rng.choice(texts).split()
            w[rng.randrange(len(w))] = rng.choice(words)
            texts.append(" ".join(w))
        else:
            i = rng.randrange(len(words) - 40)
            texts.append(" ".join(words[i:i + rng.randrange(6, 30)]))
    return texts


def naive(texts: list[str], threshold: float) -> list[bool]:
    vocab: dict[str, int] = {}
    kept: list[list[int]] = []
    decisions = []
    for text in texts:
        ids = [vocab.setdefault(t, len(vocab)) for t in tokenize(text)]
        keep = not any(ids == k or 2 * lcs_length(ids, k) > threshold * (len(ids) + len(k)) for k in kept)
        if keep:
            kept.append(ids)
        decisions.append(keep)
    return decisions


def indexed(texts: list[str], threshold: float) -> list[bool]:
    filt = DuplicateFilter(threshold)
    decisions = []
    for text in texts:
        keep = filt.check(text) is None
        if keep:
            filt.add(text)
        decisions.append(keep)
    return decisions


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n-compare", type=int, default=2000)
    ap.add_argument("--n-large", type=int, default=50000)
    ap.add_argument("--threshold", type=float, default=0.7)
    args = ap.parse_args()
    texts = make_texts(args.n_compare)
    t0 = time.perf_counter()
    ref = naive(texts, args.threshold)
    t1 = time.perf_counter()
    got = indexed(texts, args.threshold)
    t2 = time.perf_counter()
    print(f"{args.n_compare} texts: all-pairs {t1 - t0:.2f} s | indexed {t2 - t1:.2f} s | "
          f"speed-up x{(t1 - t0) / (t2 - t1):.1f} | same decisions: {ref == got} | kept {sum(got)}")
    texts = make_texts(args.n_large, seed=1)
    t0 = time.perf_counter()
    kept = sum(indexed(texts, args.threshold))
    dt = time.perf_counter() - t0
    print(f"{args.n_large} texts: indexed {dt:.1f} s ({args.n_large / dt:.0f} texts/s), kept {kept}")


if __name__ == "__main__":
    main()
