"""How much do 8 concurrent streams gain over one on llama.cpp here: llama.cpp's own ceiling vs lorakit's engine.

Ceiling ("raw"): llama-cpp-python's low-level API through lorakit's thin `LlamaCppModel` wrapper, nothing
else: the prompts are prefilled (not timed), then each step is ONE llama_decode of one token per sequence
plus a numpy argmax per row: 1 sequence vs 8 sequences, with the all-linear LoRA applied; timed over
the decode steps only (the ceiling) and with the prompts' prefill too (comparable with lorakit's). lorakit: the
llama.cpp engine (`--backend llamacpp`), one greedy stream vs 8 concurrent greedy streams (8 client
threads), and 8 sampled streams (temperature 0.7, as generate_speed.py measures). Decode tokens/s are
aggregate over the streams; every figure of one GGUF type is measured alternately in the same run, so
the machine's background load hits them alike (compare ratios, not absolute figures). Run:
    .venv/bin/python benchmarks/llamacpp_batching.py [--types bf16,q8_0] [--tokens 64] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))
PROMPT = "Write a short story about a robot who learns to paint."


def raw_runner(model, prompts: list[list[int]], streams: int, tokens: int, prefill: bool = False):
    """() -> (generated tokens, seconds) of `streams` sequences decoded together for `tokens` steps; the
    seconds are the decode steps' only, or (`prefill`) the prompts' prefill (one decode per prompt) too."""
    import numpy as np

    def run() -> tuple[int, float]:
        nxt = []
        start = time.perf_counter()
        for s in range(streams):
            model.forget(s)
            out = model.decode([(t, i, s, i == len(prompts[s]) - 1) for i, t in enumerate(prompts[s])])
            nxt.append(int(np.argmax(model.logits(out[-1]))))
        pos = [len(prompts[s]) for s in range(streams)]
        t = time.perf_counter()
        for _ in range(tokens):
            outs = model.decode([(nxt[s], pos[s], s, True) for s in range(streams)])
            for s, o in enumerate(outs):
                nxt[s] = int(np.argmax(model.logits(o)))
                pos[s] += 1
        return streams * tokens, time.perf_counter() - (start if prefill else t)

    return run


def engine_runner(engine, prompts: list[list[int]], streams: int, tokens: int, temperature: float):
    from lorakit.generate import GenerationParams

    def client(i: int) -> int:
        p = GenerationParams(max_new_tokens=tokens, ignore_eos=True, temperature=temperature, seed=i)
        return engine.complete(prompts[i], p).completion_tokens

    def run() -> tuple[int, float]:
        t = time.perf_counter()
        with ThreadPoolExecutor(streams) as pool:
            total = sum(pool.map(client, range(streams)))
        return total, time.perf_counter() - t

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-model", default="smollm2-135m")
    parser.add_argument("--types", default="bf16,q8_0")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="llama.cpp threads (default: usable cores)")
    args = parser.parse_args()

    from generate_speed import make_adapter

    from lorakit.export.gguf_cache import cached_adapter_gguf, cached_model_gguf
    from lorakit.generate.backends import load_engine
    from lorakit.generate.config import EngineOptions
    from lorakit.models import load_tokenizer, resolve_model_dir
    from lorakit.models.llamacpp import LlamaCppModel
    from lorakit.prompts import Prompter

    base = resolve_model_dir(args.base_model)
    tok = load_tokenizer(base, add_pad_token=False)
    prompter = Prompter("alpaca")
    prompts = [tok(prompter.generate_prompt(f"{PROMPT} Story number {i}."))["input_ids"] for i in range(args.streams)]
    n = args.streams
    with tempfile.TemporaryDirectory() as tmp:
        adapter = make_adapter(base, Path(tmp) / "adapter", "all-linear")
        lora = cached_adapter_gguf(adapter, base, "f32")
        for gguf_type in args.types.split(","):
            model = LlamaCppModel(cached_model_gguf(base, gguf_type), {"a": lora}, n_ctx=2048, n_seq=n,
                                  n_threads=args.threads)
            model.use_adapters(["a"])
            engine = load_engine(EngineOptions(base_model=str(base), lora_weights=[str(adapter)],
                                               prompt_template="alpaca", backend="llamacpp", gguf_type=gguf_type),
                                 max_batch_size=n)
            runs = {"raw 1": raw_runner(model, prompts, 1, args.tokens),
                    f"raw {n}": raw_runner(model, prompts, n, args.tokens),
                    "raw 1 +prefill": raw_runner(model, prompts, 1, args.tokens, prefill=True),
                    f"raw {n} +prefill": raw_runner(model, prompts, n, args.tokens, prefill=True),
                    "lorakit 1": engine_runner(engine, prompts, 1, args.tokens, 0.0),
                    f"lorakit {n}": engine_runner(engine, prompts, n, args.tokens, 0.0),
                    f"lorakit {n} sampled": engine_runner(engine, prompts, n, args.tokens, 0.7)}
            for fn in runs.values():  # warm-up
                fn()
            best = dict.fromkeys(runs, 0.0)
            for _ in range(args.repeats):
                for name, fn in runs.items():
                    done, seconds = fn()
                    best[name] = max(best[name], done / seconds)
            print(f"\n{args.base_model} {gguf_type} + all-linear LoRA r=16, {model.n_threads} threads, "
                  f"{args.tokens} tokens per stream, best of {args.repeats} (machine shared: compare ratios)")
            for name, rate in best.items():
                one = best["lorakit 1"] if name.startswith("lorakit") else best[
                    "raw 1 +prefill" if name.endswith("prefill") else "raw 1"]
                print(f"  {name:22}{rate:8.1f} tok/s   {rate / one:5.2f}x one stream", flush=True)
            print(f"  lorakit (prefill included) = {best['lorakit 1'] / best['raw 1 +prefill']:.0%} of raw with "
                  f"prefill at 1 stream, {best[f'lorakit {n}'] / best[f'raw {n} +prefill']:.0%} at {n}", flush=True)
            engine.close()
            model.close()


if __name__ == "__main__":
    main()
