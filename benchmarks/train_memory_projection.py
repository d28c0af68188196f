"""The projection of benchmarks/train_memory.py: the memory of a LoRA step on a model of any LLaMA shape
(13B, 70B) from weights + LoRA state + activations + runtime, with the activations per token and layer
and the runtime fitted on measured rows (train_memory.Result)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# name -> hidden, layers, intermediate, heads, kv heads, vocab
SHAPES = {
    "1b": (2048, 22, 5632, 32, 4, 32000),     # TinyLlama-1.1B
    "3b": (3200, 26, 8640, 32, 32, 32000),    # OpenLLaMA-3B
    "7b": (4096, 32, 11008, 32, 32, 32000),   # LLaMA-2-7B
    "13b": (5120, 40, 13824, 40, 40, 32000),  # LLaMA-2-13B
    "70b": (8192, 80, 28672, 64, 8, 32000),   # LLaMA-2-70B
}
CONFIGS = ("none", "8bit", "4bit")
LORA_TARGETS = ("q_proj", "v_proj")
LORA_R = 8


def parameter_groups(shape: str) -> tuple[int, int, int]:
    """(decoder-linear parameters, other parameters, LoRA parameters) of `shape`."""
    hidden, layers, inter, heads, kv_heads, vocab = SHAPES[shape]
    kv = hidden // heads * kv_heads
    linear = layers * (2 * hidden * hidden + 2 * kv * hidden + 3 * hidden * inter)
    other = 2 * vocab * hidden + (2 * layers + 1) * hidden
    lora = layers * LORA_R * ((hidden + hidden) + (hidden + kv))  # q_proj and v_proj
    return linear, other, lora


def weight_bytes(shape: str, config: str) -> float:
    linear, other, _ = parameter_groups(shape)
    hidden, layers, inter, heads, kv_heads, _ = SHAPES[shape]
    if config == "none":
        return 2.0 * (linear + other)
    rows = layers * (3 * hidden + 2 * hidden // heads * kv_heads + 2 * inter)  # output rows of the linears
    per_linear = 1.0 if config == "8bit" else 0.5 + 1 / 64 + 4 / (64 * 256)  # NF4 + 8-bit absmax + fp32 2nd level
    scales = 4.0 * rows if config == "8bit" else 0.0
    norms = (2 * layers + 1) * hidden
    return per_linear * linear + scales + 2.0 * (other - norms) + 4.0 * norms  # bf16 embeddings/head, fp32 norms


@dataclass
class Fit:
    runtime: float  # bytes of the process before the model loads (Python, torch, transformers, bitsandbytes)
    per_token_layer: dict[tuple[bool, bool], float]  # (quantized, checkpointing) -> bytes per token and layer


def fit(results: list[Any]) -> Fit:
    """The measured runtime, and what is left of each peak after weights, LoRA state and runtime, per token and
    layer, averaged per (quantized, checkpointing): on a quantized base PEFT keeps the residual stream in fp32
    (its embeddings are upcast), so its activations are not those of the bf16 run."""
    runtimes = [r.runtime_mb for r in results if r.runtime_mb] or \
        [r.load_peak_mb for r in results if r.config == "none"]  # mmapped weights untouched at that point
    runtime = sum(runtimes) / len(runtimes) * 2**20
    groups: dict[tuple[bool, bool], list[float]] = {}
    for r in results:
        _, layers, *_ = SHAPES[r.shape]
        rest = r.peak_mb * 2**20 - weight_bytes(r.shape, r.config) - 16.0 * parameter_groups(r.shape)[2] - runtime
        groups.setdefault((r.config != "none", r.checkpointing), []).append(rest / (r.seq * layers))
    return Fit(runtime, {k: sum(v) / len(v) for k, v in groups.items()})


def project(shape: str, config: str, checkpointing: bool, seq: int, f: Fit) -> float | None:
    key = (config != "none", checkpointing)
    if key not in f.per_token_layer:
        return None
    _, layers, *_ = SHAPES[shape]
    act = f.per_token_layer[key] * seq * layers
    return weight_bytes(shape, config) + 16.0 * parameter_groups(shape)[2] + act + f.runtime


def gb(x: float | None) -> str:
    return "-" if x is None else f"{x / 2**30:.1f} GB"


def report_projection(fitted: list[Any], checks: list[Any]) -> None:
    """The formula fitted on `fitted`, shown against every measurement (`checks`: other shapes, not fitted)."""
    f = fit(fitted)
    acts = ", ".join(f"{'quantized' if q else 'bf16'}{' +ckpt' if c else ''} {v / 1024:.0f} KB"
                     for (q, c), v in sorted(f.per_token_layer.items()))
    print(f"\nformula fitted on {fitted[0].shape}: runtime {f.runtime / 2**30:.2f} GB (measured before loading); "
          f"activations per token and layer: {acts}")
    print("| shape | base | grad. ckpt | measured peak | formula | fitted on it |")
    print("|---|---|---|---|---|---|")
    for r in [*fitted, *checks]:
        print(f"| {r.shape} | {r.config} | {'yes' if r.checkpointing else 'no'} | {r.peak_mb / 1024:.2f} GB | "
              f"{gb(project(r.shape, r.config, r.checkpointing, r.seq, f))} | {'yes' if r in fitted else 'no'} |")
    seq = fitted[0].seq
    print(f"\nprojection (sequence {seq}; weights + LoRA state + activations + runtime):")
    print("| shape | " + " | ".join(f"{c}{' +ckpt' if ck else ''}" for c in CONFIGS for ck in (False, True)) + " |")
    print("|---|" + "---|" * 6)
    for s in ("7b", "13b", "70b"):
        cells = [gb(project(s, c, ck, seq, f)) for c in CONFIGS for ck in (False, True)]
        print(f"| {s} | " + " | ".join(cells) + " |")
