"""Read a PEFT LoRA adapter folder lazily: which base tensors it changes, and how.

An adapter changes a base weight W [out, in] in one of two ways:
- LoRA: W += scale * B @ A with A [r, in], B [out, r] (`lora_A`/`lora_B`); for embeddings PEFT stores
  `lora_embedding_A` [r, num_embeddings] and `lora_embedding_B` [dim, r] and the delta is (B @ A)^T.
  scale = alpha / r, or alpha / sqrt(r) with rslora; r and alpha may be overridden per module by
  `rank_pattern` / `alpha_pattern` (matched as PEFT does).
- Replacement: full tensors saved with the adapter (`modules_to_save`, e.g. the embeddings and lm_head
  after vocabulary extension, or `base_layer.weight` when embeddings are LoRA targets) replace W.
The weights are read through safetensors' memory map (or torch.load(weights_only=True, mmap=True) for
old `adapter_model.bin` files), one tensor at a time.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lorakit.errors import MismatchError, ModelNotFoundError
from lorakit.models import resolve_adapter_dir

if TYPE_CHECKING:
    import torch

_PREFIX = "base_model.model."
_LINEAR = re.compile(r"(.+)\.lora_([AB])(?:\.[^.]+)?\.weight")
_EMBED = re.compile(r"(.+)\.lora_embedding_([AB])(?:\.[^.]+)?")


@dataclass
class LoraPair:
    """One LoRA update of base tensor `<module>.weight`."""

    module: str
    a_key: str = ""
    b_key: str = ""
    embedding: bool = False
    scale: float = 0.0
    fan_in_fan_out: bool = False


@dataclass
class LoraAdapter:
    """One PEFT adapter read from its headers: config, LoRA pairs and replaced tensors by base tensor name."""

    path: Path
    config: dict[str, Any]
    lora: dict[str, LoraPair] = field(default_factory=dict)  # base tensor name -> update
    replace: dict[str, str] = field(default_factory=dict)  # base tensor name -> key in the adapter file
    shapes: dict[str, list[int]] = field(default_factory=dict)  # adapter key -> shape
    # replacements loaded into the base layer itself (shared with a tied lm_head), not a separate copy
    in_place: set[str] = field(default_factory=set)
    _handle: Any = None

    def tensor(self, key: str) -> torch.Tensor:
        """One tensor of the adapter file by its key, as stored (`shapes[key]`)."""
        if isinstance(self._handle, dict):
            return self._handle[key]
        return self._handle.get_tensor(key)

    def replacement(self, name: str) -> torch.Tensor:
        """The adapter's full copy of base tensor `name` (modules_to_save), shape `replacement_shape(name)`."""
        return self.tensor(self.replace[name])

    def replacement_shape(self, name: str) -> list[int]:
        return self.shapes[self.replace[name]]

    def delta_shape(self, name: str) -> list[int]:
        """Shape of the delta this adapter adds to base tensor `name`, as the base stores it."""
        p = self.lora[name]
        a, b = self.shapes[p.a_key], self.shapes[p.b_key]
        if p.embedding or p.fan_in_fan_out:
            return [a[1], b[0]]
        return [b[0], a[1]]

    def factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor, float, bool]:
        """(A [r, in], B [out, r] in fp32, scale, transposed) of the update of `name`; the update is
        scale * B @ A, transposed ((B @ A)^T = A^T @ B^T) for embeddings and fan_in_fan_out layers."""
        p = self.lora[name]
        a, b = self.tensor(p.a_key).float(), self.tensor(p.b_key).float()
        return a, b, p.scale, p.embedding or p.fan_in_fan_out

    def close(self) -> None:
        self._handle = None


def _pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    """PEFT's rank_pattern/alpha_pattern lookup: the first key matching the end of the module name."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def open_adapter(path: str | Path) -> LoraAdapter:
    """Parse an adapter folder: config checks, LoRA pairs with their scale, replaced tensors."""
    folder = resolve_adapter_dir(path)
    cfg_path = folder / "adapter_config.json"
    try:
        config = json.loads(cfg_path.read_text())
    except ValueError as e:
        raise MismatchError(f"{cfg_path}: not valid JSON ({e})") from None
    if config.get("peft_type", "LORA") != "LORA":
        raise MismatchError(f"{cfg_path}: peft_type {config.get('peft_type')!r}: only LoRA adapters can be merged")
    if config.get("use_dora"):
        raise MismatchError(f"{cfg_path}: DoRA adapters (use_dora) are not supported by the streaming merge")
    if config.get("lora_bias") or config.get("bias", "none") != "none":
        raise MismatchError(f"{cfg_path}: adapters with trained biases (bias/lora_bias) are not supported by the merge")

    adapter = LoraAdapter(folder, config)
    st_file, bin_file = folder / "adapter_model.safetensors", folder / "adapter_model.bin"
    if st_file.is_file():
        from safetensors import safe_open

        adapter._handle = safe_open(str(st_file), framework="pt")
        keys = list(adapter._handle.keys())
        adapter.shapes = {k: list(adapter._handle.get_slice(k).get_shape()) for k in keys}
    elif bin_file.is_file():
        import torch

        adapter._handle = torch.load(bin_file, map_location="cpu", weights_only=True, mmap=True)
        keys = list(adapter._handle)
        adapter.shapes = {k: list(v.shape) for k, v in adapter._handle.items()}
    else:
        raise ModelNotFoundError(str(folder), [f"{st_file.name} or {bin_file.name} in {folder}"])

    r_default, alpha_default = int(config.get("r", 8)), float(config.get("lora_alpha", 8))
    for key in keys:
        if not key.startswith(_PREFIX):
            raise MismatchError(f"{folder}: unexpected tensor {key!r} in the adapter (not a PEFT LoRA key)")
        rest = key[len(_PREFIX):]
        m = _LINEAR.fullmatch(rest) or _EMBED.fullmatch(rest)
        if m:
            module, which = m.group(1), m.group(2)
            pair = adapter.lora.setdefault(module + ".weight", LoraPair(module))
            pair.embedding = m.re is _EMBED
            pair.fan_in_fan_out = bool(config.get("fan_in_fan_out")) and not pair.embedding
            if which == "A":
                pair.a_key = key
            else:
                pair.b_key = key
        elif rest.endswith(".base_layer.weight"):
            adapter.replace[rest.removesuffix(".base_layer.weight") + ".weight"] = key
            adapter.in_place.add(rest.removesuffix(".base_layer.weight") + ".weight")
        elif rest.endswith(".original_module.weight"):
            continue  # the untouched base copy PEFT saves beside a resized modules_to_save layer
        elif rest.endswith(".modules_to_save.weight"):  # the trained copy (wins over a plain `.weight`)
            adapter.replace[rest.removesuffix(".modules_to_save.weight") + ".weight"] = key
        elif rest.endswith(".weight") and "lora_" not in rest and "magnitude" not in rest:
            adapter.replace.setdefault(rest, key)
        else:
            raise MismatchError(f"{folder}: unsupported adapter tensor {key!r} (DoRA/bias/other PEFT method?)")

    for pair in adapter.lora.values():
        if not pair.a_key or not pair.b_key:
            raise MismatchError(f"{folder}: LoRA of {pair.module} has only one of its A/B matrices")
        r = int(_pattern_value(config.get("rank_pattern"), pair.module, r_default))
        alpha = float(_pattern_value(config.get("alpha_pattern"), pair.module, alpha_default))
        rank = adapter.shapes[pair.a_key][0]
        if rank != r:
            raise MismatchError(f"{folder}: {pair.module}: lora_A has rank {rank} but the config says r={r}")
        pair.scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
    return adapter
