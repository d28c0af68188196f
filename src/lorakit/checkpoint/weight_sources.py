"""Weight sources for layer-by-layer verification: a written checkpoint read back one tensor at a time,
under Hugging Face names and in HF layout (`checkpoint/layerwise.py`'s `WeightSource`).

- `PthWeights`: a Meta `consolidated.NN.pth` folder (`export --format pth`, `merge --output-type pth`),
  each shard opened with torch.load(weights_only=True, mmap=True), so a tensor is read from disk when
  asked for. A mapped file's touched pages count as resident memory until it is unmapped, so the shards
  are re-opened (and the previous mapping dropped) whenever a tensor of another layer is asked for: what stays
  resident is about one layer, not the model.
- `interleaved_to_half_rows`: the rows of a q/k projection from Meta's / llama.cpp's interleaved rotary
  layout back to HF's half-split one. It is written independently of the writers' permutation
  (`layout.hf_to_meta_rows`): an explicit row index, so that a verification does not share the writer's
  code (and a bug in it).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lorakit.errors import MismatchError, ModelNotFoundError
from lorakit.models.layout import TensorRule, map_meta, rotary_heads

if TYPE_CHECKING:
    import torch


def interleaved_to_half_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rows of a q/k weight [n_heads * head_dim, ...] (or bias [n_heads * head_dim]) stored with
    interleaved rotary pairs (row 2i + j of a head is HF's row j * head_dim/2 + i) -> HF's order."""
    import torch

    rows = w.shape[0]
    if rows % (2 * n_heads):
        raise MismatchError(f"{rows} rows cannot hold {n_heads} heads of an even rotary dimension")
    head_dim = rows // n_heads
    half = head_dim // 2
    # HF row (h, j * half + i) comes from stored row (h, 2 * i + j)
    within = torch.tensor([2 * i + j for j in range(2) for i in range(half)])
    index = (torch.arange(n_heads)[:, None] * head_dim + within[None, :]).reshape(-1)
    return w.index_select(0, index)


def config_dict(config: Any) -> dict[str, Any]:
    """An HF config (PretrainedConfig or config.json dict) as a dict."""
    return config if isinstance(config, dict) else config.to_dict()


class PthWeights:
    """The tensors of a Meta `consolidated.NN.pth` folder under HF names, in HF layout.

    Meta's model-parallel shards are concatenated back along each tensor's split dimension, q/k rows are
    put back in HF's rotary order (`interleaved_to_half_rows`), `rope.freqs` (not a parameter) is skipped.
    Meta's format always has its own `output.weight`, so `lm_head.weight` is listed even for a model whose
    HF checkpoint ties it to the embeddings."""

    def __init__(self, folder: str | Path, config: Any):

        self.folder = Path(folder)
        self.config = config_dict(config)
        self.files = sorted(self.folder.glob("consolidated.*.pth"))
        if not self.files or not (self.folder / "params.json").is_file():
            raise ModelNotFoundError(str(self.folder), [f"params.json and consolidated.*.pth in {self.folder}"])
        self._group: str | None = None  # the layer (or "" for the other tensors) whose mapping is open
        self._shards: list[dict[str, torch.Tensor]] = []
        self._open("")
        self._by_hf: dict[str, tuple[str, TensorRule]] = {}
        for name in self._shards[0]:
            if name.endswith("rope.freqs"):
                continue
            mapped = map_meta(name)
            if mapped is None:
                raise MismatchError(f"{self.files[0]}: unknown Meta tensor {name!r}")
            self._by_hf[mapped.hf] = (name, mapped.rule)
        for f, shard in zip(self.files[1:], self._shards[1:], strict=True):
            if set(shard) != set(self._shards[0]):
                raise MismatchError(f"{f}: not the same tensors as {self.files[0].name}")

    def _open(self, group: str) -> None:
        """Map every shard anew (dropping the previous mappings and their resident pages)."""
        import torch

        if group != self._group:
            self._shards = []
            # mmap=True: torch maps each file and reads a tensor's bytes only when it is used
            self._shards = [torch.load(f, map_location="cpu", weights_only=True, mmap=True) for f in self.files]
            self._group = group

    def names(self) -> Iterator[str]:
        return iter(self._by_hf)

    def get(self, name: str) -> torch.Tensor:
        """Tensor `name` in HF layout (the stored dtype; a copy, not a view of the mapped file)."""
        import torch

        if name not in self._by_hf:
            raise KeyError(f"{self.folder}: no tensor for {name}")
        meta, rule = self._by_hf[name]
        layer = re.match(r"layers\.(\d+)\.", meta)
        self._open(layer.group(1) if layer else "")
        parts = [shard[meta] for shard in self._shards]
        split = rule.meta_split
        w = parts[0].clone() if split is None or len(parts) == 1 else torch.cat(parts, dim=split)
        heads = rotary_heads(rule, self.config)
        return interleaved_to_half_rows(w, heads) if heads else w

    def close(self) -> None:
        self._shards, self._group = [], None
