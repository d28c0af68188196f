"""Generation speed, side by side, on smollm2-135m with a LoRA adapter.

1. Decode tokens/s for one stream: the alpaca-lora way (PeftModel unmerged, fp32, HF `generate`) vs
   lorakit's engine with its defaults (adapter merged in memory; bf16 weights where the CPU has native
   bf16, linear layers prepacked for oneDNN; continuous-batching decode loop).
2. Server aggregate tokens/s: 1 vs 8 concurrent streaming clients against `lorakit serve`'s app
   (dynamic batching), started in-process with uvicorn on 127.0.0.1.

3. `--backends`: the back-ends side by side (each in its own process, so peak RSS is its own): torch,
   llamacpp with a bf16, q8_0 and q4_k_m GGUF, and llama.cpp's own figure (a `Llama` object on the same
   GGUF, adapter and threads): decode tokens/s of one stream, first-token latency, aggregate tokens/s of
   8 concurrent streams, peak RSS.

Every measurement is best-of-N, the two single-stream ways interleaved and both run off the main thread
(other processes share the cores). Run:
    .venv/bin/python benchmarks/generate_speed.py [--tokens 64] [--repeats 3] [--backends]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

PROMPT = "Write a short story about a robot who learns to paint."


def make_adapter(model_dir: Path, out: Path, targets: str) -> Path:
    """A random LoRA adapter (peft directly, init_lora_weights=False: non-zero, like a trained one)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    target = "all-linear" if targets == "all-linear" else targets.split(",")
    peft_model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=target, init_lora_weights=False))
    peft_model.save_pretrained(out)
    return out


def best_rate(fn, repeats: int) -> float:
    """Best tokens/s over `repeats` runs of fn() -> (tokens, seconds)."""
    rates = []
    for _ in range(repeats):
        tokens, seconds = fn()
        rates.append(tokens / seconds)
    return max(rates)


def interleaved(fns, repeats: int) -> list[float]:
    """Best tokens/s of each fn, run alternately so that background load hits all of them alike."""
    rates: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            time.sleep(1.0)  # let the previous contender's OpenMP threads stop spinning
            tokens, seconds = fn()
            rates[i].append(tokens / seconds)
    return [max(r) for r in rates]


def alpaca_lora_way(model_dir: Path, adapter: Path, n: int):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lorakit.prompts import Prompter

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32),
                                      str(adapter)).eval()
    batch = tok(Prompter("alpaca").generate_prompt(PROMPT), return_tensors="pt")

    def run(k: int) -> float:
        t = time.perf_counter()
        with torch.inference_mode():
            model.generate(**batch, max_new_tokens=k, min_new_tokens=k, do_sample=False,
                           pad_token_id=tok.eos_token_id)
        return time.perf_counter() - t

    run(2)  # warm-up

    # Run HF generate in a worker thread, as the engine does: on this machine, under CPU contention, the
    # main thread's OpenMP/MKL team measured ~2x slower than a worker thread's, which would flatter the engine.
    worker = ThreadPoolExecutor(1)

    def once():  # decode rate: the prefill (time of a 1-token generate) is subtracted
        return n - 1, worker.submit(run, n).result() - worker.submit(run, 1).result()

    return once


def engine_way(engine, n: int):
    from lorakit.generate import GenerationParams

    ids = engine.instruction_ids(PROMPT)
    params = GenerationParams(max_new_tokens=n, ignore_eos=True)
    one = GenerationParams(max_new_tokens=1, ignore_eos=True)
    engine.complete(ids, GenerationParams(max_new_tokens=2, ignore_eos=True))  # warm-up

    def once():
        t = time.perf_counter()
        r = engine.complete(ids, params)
        total = time.perf_counter() - t
        t = time.perf_counter()
        engine.complete(ids, one)
        return r.completion_tokens - 1, total - (time.perf_counter() - t)

    return once


def server_way(engine, n: int, streams: int, repeats: int) -> tuple[float, float]:
    """Aggregate completion tokens/s of `streams` concurrent streaming clients; also the mean batch size."""
    import httpx
    import uvicorn

    from lorakit.serve.api import create_app

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(engine), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    url = f"http://127.0.0.1:{port}/v1/chat/completions"

    def client(i: int) -> int:
        body = {"model": engine.default_model, "stream": True, "max_tokens": n, "temperature": 0.7, "seed": i,
                "ignore_eos": True, "stream_options": {"include_usage": True},
                "messages": [{"role": "user", "content": f"{PROMPT} Story number {i}."}]}
        tokens = 0
        with httpx.stream("POST", url, json=body, timeout=600) as r:
            for line in r.iter_lines():
                if line.startswith("data: {") and '"usage"' in line:
                    tokens = json.loads(line[6:])["usage"]["completion_tokens"]
        return tokens

    def once():
        start = len(engine.batch_sizes)
        t = time.perf_counter()
        with ThreadPoolExecutor(streams) as pool:
            total = sum(pool.map(client, range(streams)))
        sizes.extend(engine.batch_sizes[start:])
        return total, time.perf_counter() - t

    sizes: list[int] = []
    try:
        client(0)  # warm-up
        rate = best_rate(once, repeats)
    finally:
        server.should_exit = True
        thread.join(timeout=10)
    return rate, sum(sizes) / max(len(sizes), 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-model", default="smollm2-135m")
    parser.add_argument("--tokens", type=int, default=64, help="new tokens per stream")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--targets", default="all-linear", help="LoRA target modules (comma list or all-linear)")
    parser.add_argument("--backends", action="store_true", help="the back-end table (see the module docstring)")
    parser.add_argument("--column", help=argparse.SUPPRESS)  # one column, in a child process
    parser.add_argument("--adapter", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.column or args.backends:
        from backend_columns import backend_table, run_column

        if args.column:
            run_column(args)
        else:
            backend_table(args, make_adapter)
        return

    import torch

    from lorakit.generate.config import EngineOptions
    from lorakit.generate.runner import Engine
    from lorakit.models import resolve_model_dir

    model_dir = resolve_model_dir(args.base_model)
    with tempfile.TemporaryDirectory() as tmp:
        adapter = make_adapter(model_dir, Path(tmp) / "adapter", args.targets)
        print(f"model {args.base_model}, LoRA r=16 on {args.targets}, {args.tokens} new tokens, "
              f"{torch.get_num_threads()} threads, best of {args.repeats}")
        engine = Engine.load(EngineOptions(base_model=args.base_model, lora_weights=[str(adapter)],
                                           prompt_template="alpaca"), gather_ms=20)
        baseline, ours = interleaved([alpaca_lora_way(model_dir, adapter, args.tokens),
                                      engine_way(engine, args.tokens)], args.repeats)
        print("\n1 stream, decode tokens/s        alpaca-lora way    lorakit engine    ratio (goal >= 1.5x)")
        print(f"{'':33}{baseline:>15.1f}{ours:>18.1f}{ours / baseline:>10.2f}x")
        one, _ = server_way(engine, args.tokens, 1, args.repeats)
        eight, mean_batch = server_way(engine, args.tokens, 8, args.repeats)
        print("\nserver aggregate tokens/s       1 stream     8 streams    ratio (goal >= 3x)   mean batch")
        print(f"{'':31}{one:>9.1f}{eight:>14.1f}{eight / one:>10.2f}x{mean_batch:>19.1f}")
        engine.close()


if __name__ == "__main__":
    main()
