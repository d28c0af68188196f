"""Streaming LoRA merge: plan the output from headers alone, then produce merged tensors one at a time.

`plan_merge` reads only the safetensors headers of the base and the adapters' shapes, checks that each
adapter fits the base (every target exists, every delta has the target's shape, extended embeddings and
lm_head agree), and lists the output tensors (name, dtype, shape) with the updated config. `iter_merged`
then yields each output tensor, computed as

    W = base[name];  for each adapter in order: W = replacement (if saved)  then  W += scale * B @ A

in fp32, block of rows by block, and cast to the output dtype. `write_merged` streams them into a
`StreamingShardWriter` through a few reused buffers, and copies tensors no adapter touches as raw file
ranges. Only a few tensors (and the mapped pages of the current base shard) are in memory.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lorakit.errors import MismatchError
from lorakit.formats.safetensors_io import FileRange, SafetensorsFolder, st_dtype, torch_dtype
from lorakit.formats.shard_writer import BufferPool, PlannedTensor, StreamingShardWriter
from lorakit.merge.adapters import LoraAdapter, open_adapter
from lorakit.models.families import family_of_config
from lorakit.precision import torch_dtype as torch_dtype_of
from lorakit.precision import weight_type

if TYPE_CHECKING:
    import torch

EMBED, HEAD = "model.embed_tokens.weight", "lm_head.weight"
DTYPES = ("auto", "float16", "bfloat16", "float32")


# One step in computing an output tensor: ("base", base_name) | ("replace", adapter_index, name) |
# ("lora", adapter_index, name). `name` is the adapter's tensor, which for a tied lm_head is not the output's.
Op = tuple


@dataclass
class MergePlan:
    """A checked merge: the base and adapters opened, the output config and tensors, and each tensor's steps."""

    base: SafetensorsFolder
    config: dict[str, Any]  # the output config.json (vocab_size, tie_word_embeddings, dtype updated)
    adapters: list[LoraAdapter]
    tensors: list[PlannedTensor]
    ops: dict[str, list[Op]] = field(default_factory=dict)  # output name -> steps, in order

    @property
    def vocab_size(self) -> int:
        return int(self.config["vocab_size"])

    def close(self) -> None:
        self.base.close()
        for a in self.adapters:
            a.close()


def _out_dtype(requested: str, base_dtype: torch.dtype) -> torch.dtype:
    """The output dtype of a tensor stored as `base_dtype`: `requested` (any precision.WEIGHT_TYPES
    spelling of a float type, or "auto": unchanged) for float tensors; others stay as they are."""
    if requested == "auto" or not base_dtype.is_floating_point:
        return base_dtype
    return torch_dtype_of(requested)


def _weights_file(a: LoraAdapter) -> Path:
    """The adapter file a message names (its safetensors, or an old adapter_model.bin)."""
    st = a.path / "adapter_model.safetensors"
    return st if st.is_file() else a.path / "adapter_model.bin"


def plan_merge(base_dir: Path, adapter_dirs: list[str | Path], dtype: str = "auto") -> MergePlan:
    """Check the adapters against the base (headers only) and plan the merged checkpoint.

    Tied embeddings: the merged model computes what base + adapter computed in training (PEFT's forward
    pass). An adapter that changes embed_tokens or lm_head on its own (LoRA, or a modules_to_save copy)
    changed only that one in its forward pass, so the two are untied: each starts from the shared
    matrix as it was, and only the targeted one gets the change. Replacing the shared base layer
    (`base_layer.weight`) keeps them tied.
    """
    base = SafetensorsFolder(base_dir)
    config = json.loads((base_dir / "config.json").read_text())
    family_of_config(config, str(base_dir)).check_names(base.names, str(base_dir))
    adapters = [open_adapter(d) for d in adapter_dirs]

    tied = bool(config.get("tie_word_embeddings")) and HEAD not in base and EMBED in base
    names = list(base.names)
    ops: dict[str, list[Op]] = {n: [("base", n)] for n in names}
    shapes = {n: list(base.shape(n)) for n in names}
    src_dtype = {n: base.dtype(n) for n in names}

    for i, a in enumerate(adapters):
        own_change = any(n in a.lora or (n in a.replace and n not in a.in_place) for n in (EMBED, HEAD))
        if tied and own_change:
            tied = False
            names.append(HEAD)
            ops[HEAD], shapes[HEAD], src_dtype[HEAD] = list(ops[EMBED]), list(shapes[EMBED]), src_dtype[EMBED]
        for name in a.replace:
            if name not in shapes:
                raise MismatchError(f"adapter {_weights_file(a)} saves a full {name!r} but the base model "
                                    f"{base_dir} has no such tensor (made for another architecture?)")
            new = a.replacement_shape(name)
            if new[1:] != shapes[name][1:] or (name not in (EMBED, HEAD) and new != shapes[name]):
                raise MismatchError(f"adapter {_weights_file(a)}: saved {name} has shape {new} but the base's is "
                                    f"{shapes[name]} (made for another model size?)")
            shapes[name] = new
            ops[name].append(("replace", i, name))
        for name in a.lora:
            target = name
            if target not in shapes:
                raise MismatchError(f"adapter {_weights_file(a)} targets {name.removesuffix('.weight')!r} which "
                                    f"the base model {base_dir} does not have (made for another architecture?)")
            if a.delta_shape(name) != shapes[target]:
                raise MismatchError(f"adapter {_weights_file(a)}: LoRA of {name.removesuffix('.weight')} gives a "
                                    f"{a.delta_shape(name)} update but the weight is {shapes[target]} "
                                    "(made for another model size, or a vocabulary it does not carry?)")
            ops[target].append(("lora", i, name))

    if EMBED in shapes and HEAD in shapes and shapes[EMBED][0] != shapes[HEAD][0]:
        raise MismatchError(f"after merging, embed_tokens has {shapes[EMBED][0]} rows but lm_head has "
                            f"{shapes[HEAD][0]}: an adapter extended one without the other")

    tensors = [PlannedTensor(n, st_dtype(_out_dtype(dtype, src_dtype[n])), shapes[n]) for n in names]
    out_config = dict(config)
    if EMBED in shapes:
        out_config["vocab_size"] = shapes[EMBED][0]
    if config.get("tie_word_embeddings") and not tied:
        out_config["tie_word_embeddings"] = False
    if dtype != "auto":
        out_config["dtype"] = weight_type(dtype).torch
        out_config.pop("torch_dtype", None)
    return MergePlan(base, out_config, adapters, tensors, ops)


# Rows merged per block: the fp32 work block (~1M elements, 4 MB) stays in cache, so each weight is
# read once and written once instead of making a full fp32 copy of it (3x the memory traffic).
_BLOCK_ELEMENTS = 1 << 20


def merged_tensor(plan: MergePlan, t: PlannedTensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """One output tensor: the last base/replacement in its plan, plus the LoRA updates after it.

    Computed block of rows by block in fp32 (W[rows] += scale * B[rows] @ A for each update, in order)
    and cast into `out` (shape `t.shape`, dtype `t.dtype`; allocated when not given). Reusing `out`
    matters: a fresh multi-MB allocation per tensor costs page faults that dominate a merge."""
    import torch

    w, updates = None, []
    for op in plan.ops[t.name]:
        if op[0] == "base":
            w, updates = plan.base.get(op[1]), []
        elif op[0] == "replace":
            w, updates = plan.adapters[op[1]].replacement(op[2]), []
        else:
            updates.append(plan.adapters[op[1]].factors(op[2]))
    assert w is not None
    if out is None:
        out = torch.empty(t.shape, dtype=torch_dtype(t.dtype))
    if not updates:
        out.copy_(w)
        return out
    # rows of the update: B[rows] @ A, or for transposed ones ((B @ A)^T = A^T @ B^T) A^T[rows] @ B^T
    factors = [(a.T, b.T, scale) if transposed else (b, a, scale) for a, b, scale, transposed in updates]
    rows = max(1, _BLOCK_ELEMENTS // max(1, w.shape[1]))
    work = torch.empty(min(rows, w.shape[0]), w.shape[1], dtype=torch.float32)
    for r0 in range(0, w.shape[0], rows):
        block = work[: min(rows, w.shape[0] - r0)]
        block.copy_(w[r0:r0 + rows])
        for left, right, scale in factors:
            block.addmm_(left[r0:r0 + rows], right, alpha=scale)
        out[r0:r0 + rows].copy_(block)
    return out


def untouched_range(plan: MergePlan, t: PlannedTensor) -> FileRange | None:
    """Where the bytes of `t` already are, when it is a base tensor copied unchanged (no adapter
    touches it and its dtype stays): the writer then copies them inside the kernel."""
    ops = plan.ops[t.name]
    if len(ops) != 1 or ops[0][0] != "base" or st_dtype(plan.base.dtype(ops[0][1])) != t.dtype:
        return None
    return plan.base.location(ops[0][1])


def iter_merged(plan: MergePlan) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, merged tensor) in plan order, each a tensor of its own (for writers that keep them)."""
    for t in plan.tensors:
        yield t.name, merged_tensor(plan, t)
    plan.base.close()


def write_merged(plan: MergePlan, writer: StreamingShardWriter, progress: Callable[[int], Any] | None = None,
                 buffers: int = 3) -> list[str]:
    """Merge every planned tensor into `writer`: unchanged tensors as file ranges, the others computed
    into a few reused output buffers (computation overlaps the writer thread's disk writes)."""
    import torch

    pool = BufferPool(buffers)

    def items() -> Iterator[tuple[str, torch.Tensor | FileRange]]:
        for t in plan.tensors:
            source = untouched_range(plan, t)
            yield t.name, source if source is not None else merged_tensor(plan, t, pool.acquire(t))
            if progress is not None:
                progress(1)
        plan.base.close()

    # One compute thread: the merge is memory-bound, and a second OpenMP thread spinning on the other core
    # starves the writer thread (docs/performance.md#streaming-merge-memory-and-time).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return writer.write_all(items(), on_written=pool.release)
    finally:
        torch.set_num_threads(threads)
