"""Meta/llama.cpp `consolidated.NN.pth` + `params.json`: writer and reader.

The writer takes HF-named tensors one at a time (from a folder or from the streaming merge), renames
them, permutes wq/wk back to Meta's rotary layout and splits each into the model-parallel shard count
along the dimension Meta's loader concatenates (`layout.RULES`). Each shard is a dict saved with
torch.save, so one shard's tensors are held in memory until it is written (as in Meta's format itself).
The reader inverts all of it into an HF `LlamaForCausalLM`, used by `--verify`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lorakit.errors import MismatchError, ModelNotFoundError
from lorakit.models.layout import (
    IGNORED_HF,
    check_supported_config,
    hf_config_from_meta,
    hf_to_meta_rows,
    map_hf,
    map_meta,
    meta_num_shards,
    meta_params,
    meta_to_hf_rows,
    rotary_heads,
)

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel

log = logging.getLogger("lorakit")


def write_pth(tensors: Iterable[tuple[str, torch.Tensor]], config: dict[str, Any], out_dir: Path,
              num_shards: int | None = None) -> list[str]:
    """Write `consolidated.NN.pth` files and `params.json` into `out_dir`; return the file names."""
    import torch

    check_supported_config(config, "pth export")
    n = num_shards or meta_num_shards(config)
    shards: list[dict[str, torch.Tensor]] = [{} for _ in range(n)]
    embed = None
    for name, w in tensors:
        if IGNORED_HF.fullmatch(name):
            continue
        mapped = map_hf(name)
        if mapped is None:
            raise MismatchError(f"pth export: no Meta name for tensor {name!r}")
        heads = rotary_heads(mapped.rule, config)
        if heads:
            w = hf_to_meta_rows(w, heads)
        _put(shards, mapped.meta, w, mapped.rule.meta_split)
        if name == "model.embed_tokens.weight" and config.get("tie_word_embeddings"):
            embed = w
    if "output.weight" not in shards[0]:  # tied embeddings: Meta's format always has its own output matrix
        if embed is None:
            raise MismatchError("pth export: the model has neither lm_head nor tied embeddings")
        _put(shards, "output.weight", embed, 0)
    names = []
    for i, shard in enumerate(shards):
        fname = f"consolidated.{i:02d}.pth"
        torch.save(shard, out_dir / fname)
        names.append(fname)
        shard.clear()
    (out_dir / "params.json").write_text(json.dumps(meta_params(config), indent=2))
    return names


def _put(shards: list[dict[str, torch.Tensor]], name: str, w: torch.Tensor, split: int | None) -> None:
    n = len(shards)
    if split is None or n == 1:
        for shard in shards:
            shard[name] = w.contiguous().clone() if n > 1 else w.contiguous()
        return
    if w.shape[split] % n:
        raise MismatchError(f"pth export: {name} dimension {split} ({w.shape[split]}) is not divisible by {n} shards")
    for shard, part in zip(shards, w.chunk(n, dim=split), strict=True):
        shard[name] = part.contiguous().clone()  # clone: torch.save of a view would save the whole tensor


def read_pth_state(folder: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(HF config fields, HF state dict) of a Meta checkpoint folder: shards concatenated, q/k re-permuted."""
    import torch

    params_file = folder / "params.json"
    files = sorted(folder.glob("consolidated.*.pth"))
    if not params_file.is_file() or not files:
        raise ModelNotFoundError(str(folder), [f"params.json and consolidated.*.pth in {folder}"])
    config = hf_config_from_meta(json.loads(params_file.read_text()))
    parts = [torch.load(f, map_location="cpu", weights_only=True, mmap=True) for f in files]
    state: dict[str, torch.Tensor] = {}
    for name in parts[0]:
        mapped = map_meta(name)
        if mapped is None:
            if name.endswith("rope.freqs"):
                continue
            raise MismatchError(f"{files[0]}: unknown Meta tensor {name!r}")
        split = mapped.rule.meta_split
        w = parts[0][name] if split is None or len(parts) == 1 else torch.cat([p[name] for p in parts], dim=split)
        heads = rotary_heads(mapped.rule, config)
        if heads:
            w = meta_to_hf_rows(w, heads)
        state[mapped.hf] = w
    return config, state


def load_pth_model(folder: Path, dtype: torch.dtype | None = None) -> PreTrainedModel:
    """An HF LlamaForCausalLM with the weights of a Meta checkpoint (fp32 unless `dtype`)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    fields, state = read_pth_state(folder)
    rope_theta = fields.pop("rope_theta")
    fields.pop("model_type")
    config = LlamaConfig(**fields, tie_word_embeddings=False,
                         rope_parameters={"rope_type": "default", "rope_theta": rope_theta})
    model = LlamaForCausalLM(config).to(dtype or torch.float32)
    model.load_state_dict(state, strict=True)
    return model.eval()
