"""Memory of a LoRA training step on a full-precision, 8-bit and 4-bit (QLoRA) base, with and without
gradient checkpointing, side by side in one run; plus a projection to 13B and 70B.

    .venv/bin/python benchmarks/train_memory.py --shape 1b                  # quick: TinyLlama's shape
    .venv/bin/python benchmarks/train_memory.py --shape 7b --configs 4bit   # LLaMA-2-7B's shape

A random LLaMA of the chosen shape is written as bf16 safetensors shards (7b: ~4 GB each) tensor by
tensor through lorakit's streaming shard writer, so the benchmark itself never holds the model. Each
configuration then runs in its own subprocess, exactly as `lorakit finetune` prepares the model
(lorakit.models.load_model with --quantization, train/memory.prepare_base, the fused lm_head loss,
RMSNorm, LoRA r 8 on q_proj/v_proj with fp32 weights and AdamW), and takes --steps optimizer steps of one
row of --seq tokens under bf16 autocast. Reported per configuration: peak RSS of the whole process
(ru_maxrss; peak CUDA memory where a GPU exists), peak RSS when loading finished, the weights' size
(model.get_memory_footprint), load time, seconds per step and the loss of the first step.

The projection: weights (bf16: 2 bytes/parameter; 8-bit: 1 byte per decoder-linear parameter + fp32 row
scales; 4-bit NF4 with double quantization: 0.5 + 0.0158 bytes; lorakit's k-bit preparation keeps the
embeddings and lm_head in bf16 and the norms in fp32), LoRA (16 bytes a parameter: fp32 weight, gradient, two AdamW
moments), activations (per token and layer, fitted on this run's measurements: with and without
checkpointing) and a fixed runtime. The fitted formula is printed next to the measured peaks.
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
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from train_memory_projection import CONFIGS, LORA_R, LORA_TARGETS, SHAPES, parameter_groups, report_projection

ROOT = Path(__file__).resolve().parents[1]


def tensor_shapes(shape: str) -> dict[str, list[int]]:
    hidden, layers, inter, heads, kv_heads, vocab = SHAPES[shape]
    kv = hidden // heads * kv_heads
    out = {"model.embed_tokens.weight": [vocab, hidden]}
    for i in range(layers):
        p = f"model.layers.{i}."
        out.update({p + "input_layernorm.weight": [hidden], p + "self_attn.q_proj.weight": [hidden, hidden],
                    p + "self_attn.k_proj.weight": [kv, hidden], p + "self_attn.v_proj.weight": [kv, hidden],
                    p + "self_attn.o_proj.weight": [hidden, hidden], p + "post_attention_layernorm.weight": [hidden],
                    p + "mlp.gate_proj.weight": [inter, hidden], p + "mlp.up_proj.weight": [inter, hidden],
                    p + "mlp.down_proj.weight": [hidden, inter]})
    out["model.norm.weight"] = [hidden]
    out["lm_head.weight"] = [vocab, hidden]
    return out


def write_model(folder: Path, shape: str, shard_gb: float) -> int:
    """A random bf16 LLaMA of `shape`, one tensor in memory at a time; returns its bytes."""
    import torch

    from lorakit.formats.shard_writer import PlannedTensor, StreamingShardWriter

    hidden, layers, inter, heads, kv_heads, vocab = SHAPES[shape]
    folder.mkdir(parents=True, exist_ok=True)
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
              "intermediate_size": inter, "num_attention_heads": heads, "num_key_value_heads": kv_heads,
              "num_hidden_layers": layers, "vocab_size": vocab, "rms_norm_eps": 1e-5, "max_position_embeddings": 4096,
              "tie_word_embeddings": False, "dtype": "bfloat16", "bos_token_id": 1, "eos_token_id": 2,
              "hidden_act": "silu"}
    plan = [PlannedTensor(n, "BF16", s) for n, s in tensor_shapes(shape).items()]
    writer = StreamingShardWriter(folder, plan, int(shard_gb * 2**30))
    g = torch.Generator().manual_seed(0)
    try:
        for t in plan:
            if len(t.shape) == 1:
                tensor = torch.ones(t.shape, dtype=torch.bfloat16)
            else:  # std 0.02 as LLaMA initialises; drawn in row blocks to keep the fp32 scratch small
                tensor = torch.empty(t.shape, dtype=torch.bfloat16)
                for start in range(0, t.shape[0], 1024):
                    block = tensor[start:start + 1024]
                    block.copy_(torch.randn(block.shape, generator=g).mul_(0.02))
            writer.write(t.name, tensor)
            del tensor
        writer.finish()
    finally:
        writer.close()
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return sum(t.nbytes for t in plan)


@dataclass
class Result:
    config: str
    checkpointing: bool
    load_s: float
    load_peak_mb: float  # peak RSS when loading (and k-bit preparation) finished
    weights_mb: float  # model.get_memory_footprint()
    peak_mb: float  # peak RSS of the whole run
    step_s: float  # seconds per optimizer step (mean of the steps after the first when there are several)
    loss: float  # loss of the first step (same data and LoRA init in every configuration)
    peak_gpu_mb: float | None = None
    shape: str = ""
    seq: int = 0
    runtime_mb: float = 0.0  # RSS after the imports, before loading the model (0: not measured)
    measured: str = ""  # UTC time the row was measured (rows of one file may come from different runs)
    prepare: str = "lorakit"  # k-bit preparation: lorakit's, or PEFT's prepare_model_for_kbit_training (--peft-prepare)


def rss_peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_now_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def worker(args: argparse.Namespace) -> None:
    """One configuration, in this (fresh) process; prints a Result as JSON on the last line."""
    import torch
    from peft import LoraConfig, get_peft_model

    from lorakit.models import load_model
    from lorakit.models.rmsnorm import swap_rmsnorms
    from lorakit.train.lora_layers import speed_up_lora
    from lorakit.train.loss import install_training_loss
    from lorakit.train.memory import prepare_base

    opts = argparse.Namespace(quantization=args.config, bnb_4bit_quant_type="nf4", bnb_4bit_double_quant=True,
                              gradient_checkpointing=args.checkpointing)
    runtime = rss_now_mb()
    start = time.perf_counter()
    model = load_model(args.model_dir, torch.bfloat16, quantization=opts)
    model.config.use_cache = False
    if args.peft_prepare and args.config != "none":  # PEFT's own, to compare: every non-quantized weight in fp32
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=args.checkpointing,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model = prepare_base(model, opts)
    load_s, load_peak = time.perf_counter() - start, rss_peak_mb()
    weights = model.get_memory_footprint() / 2**20
    install_training_loss(model)
    swap_rmsnorms(model)
    torch.manual_seed(0)
    model = get_peft_model(model, LoraConfig(r=LORA_R, lora_alpha=16, lora_dropout=0.05,
                                             target_modules=list(LORA_TARGETS), task_type="CAUSAL_LM"))
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    speed_up_lora(model, "bf16")
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(3, 32000, (1, args.seq), generator=torch.Generator().manual_seed(1))
    times, losses = [], []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
        losses.append(loss.item())
    step_s = sum(times[1:]) / len(times[1:]) if len(times) > 1 else times[0]
    gpu = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None
    result = Result(args.config, args.checkpointing, load_s, load_peak, weights, rss_peak_mb(), step_s, losses[0],
                    gpu, args.shape, args.seq, runtime, time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    "peft" if args.peft_prepare and args.config != "none" else "lorakit")
    print(json.dumps(asdict(result)))


def run_config(model_dir: Path, shape: str, config: str, checkpointing: bool, seq: int, steps: int,
               peft_prepare: bool = False) -> Result | str:
    cmd = [sys.executable, __file__, "--worker", "--model-dir", str(model_dir), "--config", config, "--seq", str(seq),
           "--steps", str(steps), "--ckpt", str(int(checkpointing)), "--shape", shape]
    cmd += ["--peft-prepare"] if peft_prepare else []
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error", "LORAKIT_LOG_LEVEL": "WARNING"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        return (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]
    row = json.loads(proc.stdout.strip().splitlines()[-1])
    known = {f.name for f in fields(Result)}  # a worker of newer code may report more
    return Result(**{k: v for k, v in row.items() if k in known})


def report(results: list, shape: str, seq: int, model_gb: float) -> None:
    print(f"\nshape {shape} ({model_gb:.1f} GB bf16 on disk), LoRA r {LORA_R} on {'/'.join(LORA_TARGETS)}, "
          f"sequence {seq}, bf16 compute, {os.cpu_count()} CPU threads")
    ok = [r for r in results if isinstance(r, Result)]
    base = next((r.peak_mb for r in ok if r.config == "none" and not r.checkpointing), None)
    print("| base | grad. ckpt | peak RSS | vs bf16 | peak at load | weights | load s | s/step | loss |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        if not isinstance(r, Result):
            print(f"| {r[0]} | {'yes' if r[1] else 'no'} | failed: {r[2]} |")
            continue
        rel = f"{100 * r.peak_mb / base:.0f}%" if base else "-"
        name = r.config + (" (PEFT prep.)" if r.prepare == "peft" else "")
        print(f"| {name} | {'yes' if r.checkpointing else 'no'} | {r.peak_mb / 1024:.2f} GB | {rel} | "
              f"{r.load_peak_mb / 1024:.2f} GB | {r.weights_mb / 1024:.2f} GB | {r.load_s:.1f} | {r.step_s:.1f} | "
              f"{r.loss:.4f} |")


def write_results(path: Path, rows: list[Result], update: bool) -> None:
    """`rows` to `path` (JSON); with `update`, in place of the file's rows of the same configuration."""
    def key(r: Result) -> tuple:
        return r.shape, r.config, r.checkpointing, r.seq, r.prepare

    if update and path.is_file():
        new = {key(r): r for r in rows}
        old = load_results([str(path)])
        rows = [new.pop(key(r), r) for r in old] + list(new.values())
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps([asdict(r) for r in rows], indent=1))
    tmp.replace(path)


def load_results(paths: list[str]) -> list[Result]:
    return [Result(**row) for p in paths for row in json.loads(Path(p).read_text())]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", choices=list(SHAPES), default="7b")
    p.add_argument("--configs", default=",".join(CONFIGS), help="comma list of none,8bit,4bit")
    p.add_argument("--checkpointing", choices=["both", "on", "off"], default="both")
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--shard-gb", type=float, default=None, help="shard size (default: 4 for 7b and up, else 1)")
    p.add_argument("--model-dir", help="reuse (or keep) the random model in this folder")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--config", help=argparse.SUPPRESS)
    p.add_argument("--results-out", help="also write the measurements to this JSON file")
    p.add_argument("--update", action="store_true", help="with --results-out: replace that file's rows of the "
                   "configurations measured now and keep its others (each row says when it was measured)")
    p.add_argument("--from-results", nargs="+", metavar="JSON", help="report saved measurements instead of running: "
                   "the formula is fitted on the first file and checked against the others")
    p.add_argument("--ckpt", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--peft-prepare", action="store_true", help="quantized rows prepared by PEFT's "
                   "prepare_model_for_kbit_training (fp32 embeddings/lm_head) instead of lorakit's, to compare")
    args = p.parse_args()
    if args.worker:
        args.checkpointing = bool(args.ckpt)
        worker(args)
        return
    if args.from_results:
        fitted = load_results(args.from_results[:1])
        for path in args.from_results:
            rows = load_results([path])
            report(rows, rows[0].shape, rows[0].seq, 2 * sum(parameter_groups(rows[0].shape)[:2]) / 2**30)
        report_projection(fitted, load_results(args.from_results[1:]))
        return
    sys.path.insert(0, str(ROOT / "src"))
    tmp = None
    if args.model_dir:
        model_dir = Path(args.model_dir)
    else:
        tmp = Path(tempfile.mkdtemp(prefix="train-memory-"))
        model_dir = tmp / args.shape
    try:
        if not (model_dir / "config.json").is_file():
            t0 = time.perf_counter()
            shard_gb = args.shard_gb or (4.0 if args.shape in ("7b", "13b", "70b") else 1.0)
            size = write_model(model_dir, args.shape, shard_gb)
            print(f"wrote a random {args.shape} model ({size / 2**30:.1f} GB) in {time.perf_counter() - t0:.0f} s, "
                  f"peak RSS of this process {rss_peak_mb():.0f} MB", flush=True)
        size = sum(f.stat().st_size for f in model_dir.glob("*.safetensors"))
        checkpointing = {"both": (False, True), "on": (True,), "off": (False,)}[args.checkpointing]
        results: list = []
        for config in args.configs.split(","):
            for ck in checkpointing:
                r = run_config(model_dir, args.shape, config, ck, args.seq, args.steps, args.peft_prepare)
                results.append(r if isinstance(r, Result) else (config, ck, r))
                print(f"  {config} ckpt={ck}: {r}", flush=True)
        report(results, args.shape, args.seq, size / 2**30)
        ok = [r for r in results if isinstance(r, Result)]
        if args.results_out:
            write_results(Path(args.results_out), ok, args.update)
        if len({(r.config != "none", r.checkpointing) for r in ok}) == 4:
            report_projection(ok, [])
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
