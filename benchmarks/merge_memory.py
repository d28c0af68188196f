"""Peak memory and wall time of `lorakit merge` vs PEFT merge_and_unload + save_pretrained vs `cp`.

Builds a random LLaMA base of about 2 GB (fp16, several safetensors shards) and a PEFT-format LoRA
(r=16 on all linear layers) in a temporary folder, then runs each contender in its own process and
reads its peak RSS (ru_maxrss of the child). The fast contenders run in several interleaved rounds, each
into a fresh output path after a sync and a pause, and the medians are reported: writing GBs into the page cache is
noisy on a VM (freed memory goes back to the host, and re-touching it is slow), so one run of each says
little. PEFT (slow) runs once. Everything is removed at the end.

    .venv/bin/python benchmarks/merge_memory.py [--layers 18] [--rounds 3] [--keep DIR]

Goal (issue 4): lorakit's peak RSS <= 0.6 GB + 2 shards; time <= 1.5 x cp + start-up.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

HIDDEN, FFN, HEADS, KV_HEADS, VOCAB = 2048, 5632, 16, 16, 32000
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def shapes(layers: int) -> dict[str, tuple[int, ...]]:
    out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (VOCAB, HIDDEN)}
    kv = HIDDEN // HEADS * KV_HEADS
    for i in range(layers):
        p = f"model.layers.{i}."
        out.update({p + "self_attn.q_proj.weight": (HIDDEN, HIDDEN), p + "self_attn.k_proj.weight": (kv, HIDDEN),
                    p + "self_attn.v_proj.weight": (kv, HIDDEN), p + "self_attn.o_proj.weight": (HIDDEN, HIDDEN),
                    p + "mlp.gate_proj.weight": (FFN, HIDDEN), p + "mlp.up_proj.weight": (FFN, HIDDEN),
                    p + "mlp.down_proj.weight": (HIDDEN, FFN), p + "input_layernorm.weight": (HIDDEN,),
                    p + "post_attention_layernorm.weight": (HIDDEN,)})
    out["model.norm.weight"] = (HIDDEN,)
    out["lm_head.weight"] = (VOCAB, HIDDEN)
    return out


def make_base(folder: Path, layers: int, shard_bytes: int) -> int:
    """Random fp16 base written shard by shard (never the whole model in memory); returns its bytes."""
    folder.mkdir(parents=True)
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": HIDDEN,
              "intermediate_size": FFN, "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS,
              "num_hidden_layers": layers, "vocab_size": VOCAB, "rms_norm_eps": 1e-5,
              "max_position_embeddings": 2048, "tie_word_embeddings": False, "dtype": "float16",
              "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu"}
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    groups: list[dict[str, tuple[int, ...]]] = [{}]
    size = 0
    for name, shape in shapes(layers).items():
        n = math.prod(shape) * 2
        if groups[-1] and size + n > shard_bytes:
            groups.append({})
            size = 0
        groups[-1][name] = shape
        size += n
    weight_map, total = {}, 0
    g = torch.Generator().manual_seed(0)
    for i, group in enumerate(groups):
        fname = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {n: (torch.randn(s, generator=g) * 0.02).half() if len(s) == 2 else torch.ones(s).half()
                   for n, s in group.items()}
        save_file(tensors, folder / fname, metadata={"format": "pt"})
        for n, t in tensors.items():
            weight_map[n] = fname
            total += t.numel() * 2
        del tensors
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}))
    return total


def make_adapter(folder: Path, layers: int, r: int = 16) -> None:
    """A LoRA in PEFT's on-disk format (keys and adapter_config.json as PEFT writes them)."""
    folder.mkdir(parents=True)
    g = torch.Generator().manual_seed(1)
    tensors = {}
    for name, shape in shapes(layers).items():
        module = name.removesuffix(".weight")
        if module.split(".")[-1] in TARGETS:
            key = f"base_model.model.{module}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(r, shape[1], generator=g) * 0.01
            tensors[f"{key}.lora_B.weight"] = torch.randn(shape[0], r, generator=g) * 0.01
    save_file(tensors, folder / "adapter_model.safetensors", metadata={"format": "pt"})
    (folder / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": 32, "lora_dropout": 0.0,
        "target_modules": list(TARGETS), "bias": "none", "fan_in_fan_out": False, "inference_mode": True,
        "base_model_name_or_path": None}))


PEFT_SCRIPT = """
import sys, torch
from peft import PeftModel
from transformers import AutoModelForCausalLM
base, adapter, out = sys.argv[1:4]
model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float16)
model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
model.save_pretrained(out, max_shard_size="500MB")
"""

WRITE_SCRIPT = """
import sys
path, size = sys.argv[1], int(sys.argv[2])
chunk = bytes(1 << 20)  # modest writes: on some VMs 64 MB writes are several times slower
with open(path, "wb") as f:
    for _ in range(size // len(chunk) + 1):
        f.write(chunk)
"""

MEASURE = """
import resource, subprocess, sys, time
t = time.perf_counter()
code = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL).returncode
print(time.perf_counter() - t, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, code)
"""


def measure(cmd: list[str]) -> tuple[float, float]:
    """(seconds, peak RSS in GB) of `cmd`, run in a fresh wrapper process so ru_maxrss is its own."""
    out = subprocess.run([sys.executable, "-c", MEASURE, *cmd], capture_output=True, text=True, check=True)
    seconds, kb, code = out.stdout.split()
    if code != "0":
        raise SystemExit(f"failed ({code}): {' '.join(cmd)}")
    return float(seconds), int(kb) / 1e6


def remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def max_difference(a: Path, b: Path) -> tuple[int, float]:
    """(tensors compared, max |a - b|) over every tensor of two sharded safetensors folders."""
    from safetensors import safe_open

    def files(folder: Path) -> dict[str, Path]:
        index = folder / "model.safetensors.index.json"
        if not index.is_file():
            return {"*": folder / "model.safetensors"}
        return {n: folder / f for n, f in json.loads(index.read_text())["weight_map"].items()}

    fa, fb = files(a), files(b)
    names = set().union(*(safe_open(str(f), "pt").keys() for f in set(fa.values())))
    worst = 0.0
    for name in sorted(names):
        with safe_open(str(fa.get(name, fa.get("*"))), "pt") as x, safe_open(str(fb.get(name, fb.get("*"))), "pt") as y:
            worst = max(worst, (x.get_tensor(name).float() - y.get_tensor(name).float()).abs().max().item())
    return len(names), worst


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=18, help="decoder layers (18 -> ~2.1 GB fp16)")
    ap.add_argument("--shard-mb", type=int, default=500, help="base shard size in MB")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds of the fast contenders")
    ap.add_argument("--pause", type=float, default=3.0, help="seconds of quiet before each run")
    ap.add_argument("--keep", help="work in this folder and keep it (default: a temp dir, removed)")
    args = ap.parse_args()

    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="lorakit-merge-bench-"))
    try:
        t = time.perf_counter()
        size = make_base(work / "base", args.layers, args.shard_mb * 10**6)
        make_adapter(work / "adapter", args.layers)
        shard = max(f.stat().st_size for f in (work / "base").glob("*.safetensors")) / 1e9
        n_shards = len(list((work / "base").glob("*.safetensors")))
        print(f"base: {size / 1e9:.2f} GB fp16 in {n_shards} shards (largest {shard:.2f} GB), "
              f"LoRA r=16 on all linear layers; built in {time.perf_counter() - t:.0f}s")
        subprocess.run(["cat", *map(str, (work / "base").glob("*"))], stdout=subprocess.DEVNULL, check=True)

        # name -> (command, the path it writes or None)
        fast: dict[str, tuple[list[str], Path | None]] = {
            "cp -r": (["cp", "-r", str(work / "base"), str(work / "out_cp")], work / "out_cp"),
            # cp copies in the kernel (copy_file_range); a merge must write most bytes from user space:
            "write same bytes from Python": ([sys.executable, "-c", WRITE_SCRIPT, str(work / "out_write"), str(size)],
                                             work / "out_write"),
            # start-up: the interpreter importing what any merge needs (torch, transformers, safetensors)
            "start-up (import torch, ...)": ([sys.executable, "-c",
                                              "import torch, transformers, safetensors, lorakit.merge.run"], None),
            "lorakit merge --no-verify": ([sys.executable, "-m", "lorakit", "merge", "--base-model",
                                           str(work / "base"), "--lora-model", str(work / "adapter"),
                                           "--output-dir", str(work / "out_lorakit"), "--no-verify"],
                                          work / "out_lorakit"),
        }
        runs: dict[str, list[tuple[float, float]]] = {name: [] for name in fast}
        for r in range(args.rounds):
            for name, (cmd, output) in fast.items():
                if output is not None:
                    remove(output)  # each writes into a fresh path, as a user would
                # Flush the previous runs' dirty pages first: otherwise whoever runs next pays for their
                # writeback (the contender after cp and the Python write was measured up to 2x slower).
                os.sync()
                time.sleep(args.pause)
                runs[name].append(measure(cmd))
            print(f"round {r + 1}: " + ", ".join(f"{n.split()[0]} {v[-1][0]:.1f}s" for n, v in runs.items()))
        rows = [(name, statistics.median(s for s, _ in v), max(m for _, m in v)) for name, v in runs.items()]
        time.sleep(args.pause)
        rows.append(("peft merge_and_unload + save", *measure(
            [sys.executable, "-c", PEFT_SCRIPT, str(work / "base"), str(work / "adapter"), str(work / "out_peft")])))
        print(f"(median of {args.rounds} rounds; peft once)")

        cp_time, startup = rows[0][1], rows[2][1]
        print(f"\n{'':32s} {'wall s':>8s} {'peak RSS GB':>12s} {'time / cp':>10s}")
        for name, seconds, rss in rows:
            print(f"{name:32s} {seconds:8.1f} {rss:12.2f} {seconds / cp_time:10.2f}")
        lk_time, lk_rss = rows[3][1], rows[3][2]
        print(f"\nlorakit peak RSS {lk_rss:.2f} GB vs goal 0.6 + 2 x {shard:.2f} = {0.6 + 2 * shard:.2f} GB; "
              f"peft / lorakit RSS = {rows[4][2] / lk_rss:.1f}x")
        print(f"lorakit time {lk_time:.1f}s vs goal 1.5 x cp + start-up = {1.5 * cp_time + startup:.1f}s; "
              f"vs 1.5 x Python write + start-up = {1.5 * rows[1][1] + startup:.1f}s; "
              f"peft / lorakit time = {rows[4][1] / lk_time:.1f}x")
        count, diff = max_difference(work / "out_lorakit", work / "out_peft")
        print(f"max |lorakit - peft| over all {count} tensors: {diff:.2g}")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    main()
