"""The reference a merge is verified against: base + adapters, one tensor at a time, computed apart
from the merge's own arithmetic (streaming.py).

`MergeReference` is a `checkpoint.layerwise.WeightSource`: `get(name)` reads the base tensor and, for
each adapter in order, takes its saved copy (modules_to_save, trainable tokens, a replaced base layer)
or adds its whole LoRA update scale * B @ A (transposed for embeddings and fan_in_fan_out layers) in
fp32, in one product over the whole matrix (no row blocks, no reused buffers, no output cast, no merge
plan). Tied embeddings follow PEFT's forward pass: while no adapter changes embed_tokens or lm_head on its own, the
head is the (updated) embedding matrix; from the first adapter that does, the head starts as the shared
matrix as it was then and takes only its own updates.
Only adapter parsing (merge/adapters.py: keys, scale = alpha / r, rank and alpha patterns) is shared
with the merge; tests compare that part with PEFT's own merge (tests/test_merge.py).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from lorakit.checkpoint.layerwise import FolderSource
from lorakit.merge.adapters import LoraAdapter, open_adapter

if TYPE_CHECKING:
    import torch

EMBED, HEAD = "model.embed_tokens.weight", "lm_head.weight"


class MergeReference:
    """Base model folder + adapters (in order) as a WeightSource of the merged model's tensors."""

    def __init__(self, base_dir: str | Path, adapter_dirs: list[str | Path]):
        self.base = FolderSource(base_dir)
        self.adapters: list[LoraAdapter] = [open_adapter(d) for d in adapter_dirs]
        config = json.loads((Path(base_dir) / "config.json").read_text())
        base_names = set(self.base.names())
        # adapters before this index see a head tied to the embeddings (len(adapters): tied throughout)
        self.untie_at = len(self.adapters)
        if config.get("tie_word_embeddings") and HEAD not in base_names and EMBED in base_names:
            for i, a in enumerate(self.adapters):
                if any(n in a.lora or (n in a.replace and n not in a.in_place) for n in (EMBED, HEAD)):
                    self.untie_at = i
                    break
            self._head_from_embed = True
        else:
            self._head_from_embed = False
        self._names = list(self.base.names())
        if self._head_from_embed and self.untie_at < len(self.adapters):
            self._names.append(HEAD)

    def names(self) -> list[str]:
        return self._names

    def get(self, name: str) -> torch.Tensor:
        """The merged tensor `name`: stored dtype when no adapter changes it, else fp32."""
        import torch

        if name not in self._names:
            raise KeyError(name)
        w = self.base.get(EMBED if name == HEAD and self._head_from_embed else name)
        for i, a in enumerate(self.adapters):
            key = EMBED if name == HEAD and self._head_from_embed and i < self.untie_at else name
            if key in a.replace:
                w = a.replacement(key)
            if key in a.lora:
                pair = a.lora[key]
                lora_a, lora_b = a.tensor(pair.a_key).to(torch.float32), a.tensor(pair.b_key).to(torch.float32)
                w = w.to(torch.float32, copy=True)  # never in place into a tensor the reader may share
                if pair.embedding or pair.fan_in_fan_out:  # delta (B @ A)^T = A^T @ B^T
                    w.addmm_(lora_a.T, lora_b.T, alpha=pair.scale)
                else:  # delta B @ A: [out, r] @ [r, in]
                    w.addmm_(lora_b, lora_a, alpha=pair.scale)
        return w

    def close(self) -> None:
        self.base.close()
        for a in self.adapters:
            a.close()
