"""The back-end table of generate_speed.py (`--backends`): one child process per column.

Columns: torch (lorakit's torch engine, defaults), llamacpp with a bf16 / q8_0 / q4_k_m GGUF (lorakit's
llama.cpp engine, adapter applied as a GGUF LoRA), and llama.cpp's own figure: a llama-cpp-python
`Llama` object on the same GGUF files and thread count, decoding greedily with the adapter (one stream;
a `Llama` object decodes one sequence), and a raw loop: llama_decode + argmax through llama-cpp-python's
low-level API with nothing of lorakit's engine around it (no queue, worker thread or detokenizing).
Figures: decode tokens/s of one stream (prefill subtracted), first-token latency (prompt -> first token),
aggregate tokens/s of 8 concurrent streams, peak RSS.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

COLUMNS = ["torch", "llamacpp:bf16", "llamacpp:q8_0", "llamacpp:q4_k_m", "raw loop:bf16", "raw loop:q4_k_m",
           "llama.cpp own:bf16"]
PROMPT = "Write a short story about a robot who learns to paint."


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _engine_column(args, backend: str, gguf_type: str) -> dict:
    from lorakit.generate import GenerationParams
    from lorakit.generate.backends import load_engine
    from lorakit.generate.config import EngineOptions

    engine = load_engine(EngineOptions(base_model=args.base_model, lora_weights=[args.adapter],
                                       prompt_template="alpaca", backend=backend, gguf_type=gguf_type),
                         max_batch_size=8)
    ids = engine.instruction_ids(PROMPT)
    n = args.tokens
    engine.complete(ids, GenerationParams(max_new_tokens=2, ignore_eos=True))  # warm-up
    one, ttft = 0.0, float("inf")
    for _ in range(args.repeats):
        t = time.perf_counter()
        engine.complete(ids, GenerationParams(max_new_tokens=1, ignore_eos=True))
        first = time.perf_counter() - t
        t = time.perf_counter()
        r = engine.complete(ids, GenerationParams(max_new_tokens=n, ignore_eos=True))
        total = time.perf_counter() - t
        one, ttft = max(one, (r.completion_tokens - 1) / (total - first)), min(ttft, first)
    prompts = [engine.instruction_ids(f"{PROMPT} Story number {i}.") for i in range(8)]

    def client(i: int) -> int:
        p = GenerationParams(max_new_tokens=n, ignore_eos=True, temperature=0.7, seed=i)
        return engine.complete(prompts[i], p).completion_tokens

    eight = 0.0
    for _ in range(args.repeats):
        t = time.perf_counter()
        with ThreadPoolExecutor(8) as pool:
            total_tokens = sum(pool.map(client, range(8)))
        eight = max(eight, total_tokens / (time.perf_counter() - t))
    threads = getattr(getattr(engine, "runner", None), "n_threads", None) or engine.num_threads
    engine.close()
    return {"one": one, "ttft": ttft, "eight": eight, "rss": _peak_rss_mb(), "threads": threads}


def _own_column(args, gguf_type: str) -> dict:
    from llama_cpp import Llama

    from lorakit.export.gguf_cache import cached_adapter_gguf, cached_model_gguf
    from lorakit.machine import usable_cores
    from lorakit.models import load_tokenizer, resolve_model_dir
    from lorakit.prompts import Prompter

    base_dir = resolve_model_dir(args.base_model)
    gguf = cached_model_gguf(base_dir, gguf_type)
    lora = cached_adapter_gguf(Path(args.adapter), base_dir, "f32")
    threads = usable_cores()
    llm = Llama(model_path=str(gguf), lora_path=str(lora), n_threads=threads, n_threads_batch=threads, n_ctx=1024,
                verbose=False)
    tok = load_tokenizer(base_dir, add_pad_token=False)
    ids = tok(Prompter("alpaca").generate_prompt(PROMPT))["input_ids"]

    def run(k: int) -> tuple[float, float]:
        llm.reset()
        t = time.perf_counter()
        first = 0.0
        for i, _ in enumerate(llm.generate(ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0,
                                           reset=True)):
            if i == 0:
                first = time.perf_counter() - t
            if i + 1 == k:
                break
        return first, time.perf_counter() - t

    run(2)
    one, ttft = 0.0, float("inf")
    for _ in range(args.repeats):
        first, _ = run(1)
        _, total = run(args.tokens)
        one, ttft = max(one, (args.tokens - 1) / (total - first)), min(ttft, first)
    return {"one": one, "ttft": ttft, "eight": None, "rss": _peak_rss_mb(), "threads": threads}


def _raw_column(args, gguf_type: str) -> dict:
    import numpy as np

    from lorakit.export.gguf_cache import cached_adapter_gguf, cached_model_gguf
    from lorakit.models import load_tokenizer, resolve_model_dir
    from lorakit.models.llamacpp import LlamaCppModel
    from lorakit.prompts import Prompter

    base_dir = resolve_model_dir(args.base_model)
    model = LlamaCppModel(cached_model_gguf(base_dir, gguf_type),
                          {"a": cached_adapter_gguf(Path(args.adapter), base_dir, "f32")}, n_ctx=1024)
    model.use_adapters(["a"])
    ids = load_tokenizer(base_dir, add_pad_token=False)(Prompter("alpaca").generate_prompt(PROMPT))["input_ids"]

    def run(k: int) -> tuple[float, float]:
        model.forget(0)
        t = time.perf_counter()
        out = model.decode([(tok, i, 0, i == len(ids) - 1) for i, tok in enumerate(ids)])
        nxt = int(np.argmax(model.logits(out[-1])))
        first = time.perf_counter() - t
        for j in range(k - 1):
            out = model.decode([(nxt, len(ids) + j, 0, True)])
            nxt = int(np.argmax(model.logits(out[0])))
        return first, time.perf_counter() - t

    run(2)
    one, ttft = 0.0, float("inf")
    for _ in range(args.repeats):
        first, total = run(args.tokens)
        one, ttft = max(one, (args.tokens - 1) / (total - first)), min(ttft, first)
    return {"one": one, "ttft": ttft, "eight": None, "rss": _peak_rss_mb(), "threads": model.n_threads}


def run_column(args) -> None:
    kind, _, gguf_type = args.column.partition(":")
    if kind == "torch":
        result = _engine_column(args, "torch", "auto")
    elif kind == "llamacpp":
        result = _engine_column(args, "llamacpp", gguf_type)
    elif kind == "raw loop":
        result = _raw_column(args, gguf_type)
    else:
        result = _own_column(args, gguf_type)
    print("RESULT " + json.dumps(result), flush=True)


def backend_table(args, make_adapter) -> None:
    from lorakit.models import resolve_model_dir

    model_dir = resolve_model_dir(args.base_model)
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        adapter = make_adapter(model_dir, Path(tmp) / "adapter", args.targets)
        for column in COLUMNS:
            script = str(Path(__file__).with_name("generate_speed.py"))
            run = subprocess.run([sys.executable, script, "--column", column, "--adapter", str(adapter),
                                  "--base-model", args.base_model, "--tokens", str(args.tokens),
                                  "--repeats", str(args.repeats)], capture_output=True, text=True)
            line = [x for x in run.stdout.splitlines() if x.startswith("RESULT ")]
            if run.returncode or not line:
                print(f"{column}: failed\n{run.stderr[-2000:]}")
                continue
            rows[column] = json.loads(line[-1][7:])
    print(f"\nmodel {args.base_model}, LoRA r=16 on {args.targets}, {args.tokens} new tokens, best of {args.repeats}")
    print(f"{'back-end':22}{'1 stream tok/s':>15}{'first token ms':>16}{'8 streams tok/s':>17}{'peak RSS MB':>13}"
          f"{'threads':>9}")
    for column, r in rows.items():
        eight = f"{r['eight']:.1f}" if r["eight"] is not None else "-"
        print(f"{column:22}{r['one']:>15.1f}{r['ttft'] * 1000:>16.0f}{eight:>17}{r['rss']:>13.0f}{r['threads']:>9}")
    for t in ("bf16", "q4_k_m"):
        for ref in ("llama.cpp own", "raw loop"):
            ours, own = rows.get(f"llamacpp:{t}"), rows.get(f"{ref}:{t}")
            if ours and own:
                ratio = ours["one"] / own["one"]
                print(f"llamacpp {t} one stream = {ratio:.0%} of the {ref} (target >= 90% for bf16)")
