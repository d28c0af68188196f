"""Time and peak RSS of a verified `lorakit merge` and `lorakit export --format gguf` of a LLaMA-shaped
model, side by side with `cp` of the same files.

    .venv/bin/python benchmarks/scale.py --shape 1b                          # TinyLlama's shape, minutes
    .venv/bin/python benchmarks/scale.py --shape 7b   # LLaMA-2-7B's shape: ~27 GB of disk, 2 GB of RAM

A random bf16 LLaMA of the shape (train_memory.py's writer: one tensor in memory at a time, 2 shards),
LLaMA's SentencePiece-style test tokenizer (data/, 16k tokens, filled up to the vocabulary with added
tokens) and a rank-8 PEFT adapter on all linear layers are written to a temporary folder.
Then, each in its own process (ru_maxrss of a wrapper's children, so each peak is its own):
`cp` of the base shards, `lorakit merge` (default: verified layer by layer) and `lorakit export --format
gguf --dtype bf16` of the merged model (default: verified). Prints a table with ratios to `cp`, writes
benchmarks/results/scale_<shape>.json and removes everything it wrote. Skipped, with a message, when the
disk lacks room for the base, the merged model and the GGUF (3x the model plus 2 GB).

Targets (issue 23): 7B merge and export, each verified, <= 2 GB peak RSS and <= 4x the time of `cp`.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from merge_memory import MEASURE
from train_memory import SHAPES, tensor_shapes, write_model

ROOT = Path(__file__).resolve().parents[1]
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
RANK = 8


def write_adapter(folder: Path, shape: str) -> int:
    """A PEFT LoRA (r=8, alpha 16) on every linear layer with random A and B; returns its bytes."""
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(1)
    tensors = {}
    for name, (rows, cols) in ((n, s) for n, s in tensor_shapes(shape).items() if n.split(".")[-2] in TARGETS):
        key = "base_model.model." + name.removesuffix(".weight")
        tensors[key + ".lora_A.weight"] = (torch.randn(RANK, cols, generator=g) / math.sqrt(cols)).to(torch.bfloat16)
        tensors[key + ".lora_B.weight"] = (torch.randn(rows, RANK, generator=g) * 1e-3).to(torch.bfloat16)
    save_file(tensors, folder / "adapter_model.safetensors")
    (folder / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": RANK, "lora_alpha": 2 * RANK, "bias": "none",
        "target_modules": list(TARGETS), "fan_in_fan_out": False, "base_model_name_or_path": None}, indent=2))
    return sum(t.numel() * t.element_size() for t in tensors.values())


def add_tokenizer(folder: Path, vocab: int) -> None:
    """The test SentencePiece tokenizer (16k), filled up to `vocab` tokens with added ones."""
    from lorakit.models import load_tokenizer

    tok = load_tokenizer(folder, ROOT / "data" / "llama_style_bpe_16k.model", add_pad_token=False)
    tok.add_tokens([f"<extra_{i}>" for i in range(vocab - len(tok))])
    tok.save_pretrained(folder)


def measure(cmd: list[str]) -> tuple[float, float]:
    """(seconds, peak RSS in GB) of `cmd`, in a fresh wrapper process so that ru_maxrss is its own (its
    stderr shows here)."""
    out = subprocess.run([sys.executable, "-c", MEASURE, *cmd], stdout=subprocess.PIPE, text=True, check=True)
    seconds, kb, code = out.stdout.split()
    if code != "0":
        raise SystemExit(f"failed ({code}): {' '.join(cmd)}")
    return float(seconds), int(kb) / 1e6


def lorakit(*args: str) -> list[str]:
    return [sys.executable, "-m", "lorakit", *args]


def du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="1b")
    ap.add_argument("--workdir", default=None, help="where the temporary files go (default: the system's temp)")
    ap.add_argument("--skip-export", action="store_true")
    ap.add_argument("--unverified", action="store_true", help="also time `merge --no-verify` (the check's share)")
    args = ap.parse_args()

    model_bytes = sum(math.prod(s) * 2 for s in tensor_shapes(args.shape).values())
    root = Path(tempfile.mkdtemp(prefix=f"lorakit-scale-{args.shape}-", dir=args.workdir))
    free = shutil.disk_usage(root).free
    need = 3 * model_bytes + 2 * 2**30
    if free < need:
        shutil.rmtree(root)
        print(f"skipped: the {args.shape} benchmark needs {need / 1e9:.0f} GB of free disk in {root.parent}, "
              f"{free / 1e9:.0f} GB free")
        return
    rows = []
    try:
        base, adapter, merged = root / "base", root / "adapter", root / "merged"
        t = time.perf_counter()
        write_model(base, args.shape, shard_gb=model_bytes / 2 / 2**30 + 0.01)  # two shards
        add_tokenizer(base, SHAPES[args.shape][5])
        write_adapter(adapter, args.shape)
        print(f"wrote the {args.shape} model ({model_bytes / 2**30:.2f} GiB, "
              f"{len(list(base.glob('*.safetensors')))} shards) and the adapter in {time.perf_counter() - t:.0f}s")
        subprocess.run(["sync"], check=True)
        shards = sorted(str(p) for p in base.glob("*.safetensors"))
        (root / "cp").mkdir()
        s, gb = measure(["cp", *shards, str(root / "cp")])
        rows.append(("cp (base shards)", s, gb))
        shutil.rmtree(root / "cp")
        subprocess.run(["sync"], check=True)
        s, gb = measure(lorakit("merge", "--base-model", str(base), "--lora-model", str(adapter),
                                "--output-dir", str(merged)))
        rows.append(("lorakit merge (verified)", s, gb))
        if args.unverified:
            s, gb = measure(lorakit("merge", "--base-model", str(base), "--lora-model", str(adapter),
                                    "--output-dir", str(root / "unverified"), "--no-verify"))
            rows.append(("lorakit merge --no-verify", s, gb))
            shutil.rmtree(root / "unverified")
        if not args.skip_export:
            subprocess.run(["sync"], check=True)
            s, gb = measure(lorakit("export", "--model", str(merged), "--format", "gguf", "--dtype", "bf16",
                                    "--output", str(root / "merged.gguf")))
            rows.append(("lorakit export gguf bf16 (verified)", s, gb))
    finally:
        shutil.rmtree(root, ignore_errors=True)

    cp_s = rows[0][1]
    print(f"\nshape {args.shape}: {model_bytes / 2**30:.2f} GiB bf16, 2 shards")
    print(f"{'':40s} {'seconds':>8s} {'x cp':>6s} {'peak RSS GB':>12s}")
    for name, s, gb in rows:
        print(f"{name:40s} {s:8.1f} {s / cp_s:6.2f} {gb:12.2f}")
    result = {"shape": args.shape, "model_bytes": model_bytes, "shards": 2,
              "rows": [{"what": n, "seconds": round(s, 2), "x_cp": round(s / cp_s, 2), "peak_rss_gb": round(gb, 3)}
                       for n, s, gb in rows]}
    out = ROOT / "benchmarks" / "results" / f"scale_{args.shape}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"written: {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
