"""A PEFT LoRA adapter -> a GGUF LoRA adapter that llama.cpp (`--lora`) and Ollama (`ADAPTER`) apply at run time.

The file follows llama.cpp's own converter (convert_lora_to_gguf.py): `general.type = adapter`,
`adapter.type = lora`, `adapter.lora.alpha`, and for each adapted weight `W` (its GGUF name, e.g.
`blk.0.attn_q.weight`) two tensors `W.lora_a` = A [r, in] and `W.lora_b` = B [out, r] (torch shapes;
GGUF lists dimensions the other way round). llama.cpp computes W x + (alpha / r) * B (A x), r taken
from B's shape, as PEFT does.

Everything family-specific comes from the registry (models/families.py), as the converter takes it from
the base model's class: the GGUF names, `general.architecture` (llama.cpp refuses an adapter whose
architecture differs from the model's), and whether q/k are permuted. LLaMA/Mistral q/k projections are
stored in llama.cpp's interleaved rotary order: the permutation acts on the output rows of W = the rows
of B, so B is permuted and A is not; Qwen2/Qwen3/Gemma 3 run HF's half-split rotary and are not
permuted. Nothing else is written: the base GGUF carries the rest (Llama 3's RoPE scaling is its
`rope_freqs` tensor; an adapter does not change it, and the converter never adds it to adapters).

PEFT scales that one `alpha / r` cannot express (rsLoRA's alpha / sqrt(r), alpha_pattern) are folded into
B. Adapters that also train embeddings or the output head (modules_to_save, an extended vocabulary)
are refused: llama.cpp has no way to replace whole tensors from an adapter, so those must be merged.
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorakit.errors import ConfigError, MismatchError
from lorakit.models.families import Family, family_of_config
from lorakit.models.layout import hf_to_meta_rows, rotary_heads

log = logging.getLogger("lorakit")
_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight$")

MERGE_HINT = ("merge it instead (`lorakit merge --base-model BASE --lora-weights ADAPTER --output DIR`, then "
              "`lorakit export --model DIR`)")


class AdapterNotConvertibleError(ConfigError):
    """The adapter changes more than low-rank updates of linear layers: it must be merged."""


@dataclass
class LoraSummary:
    tensors: int
    rank: int
    alpha: float
    rescaled: int  # weights whose B was rescaled (rsLoRA / alpha_pattern)


def adapter_config(adapter_dir: Path) -> dict[str, Any]:
    path = adapter_dir / "adapter_config.json"
    if not path.is_file():
        raise ConfigError(f"{adapter_dir}: not a PEFT adapter folder (no adapter_config.json)")
    return json.loads(path.read_text())


def trains_embeddings(adapter_dir: Path) -> str | None:
    """Why this adapter cannot be applied by llama.cpp at run time (None: it can)."""
    from lorakit.models import adapter_vocab_size

    cfg = adapter_config(adapter_dir)
    if cfg.get("modules_to_save"):
        return f"it trains whole modules ({', '.join(cfg['modules_to_save'])}) besides LoRA (modules_to_save)"
    if adapter_vocab_size(adapter_dir) is not None:
        return "it carries full embedding/output matrices (an extended vocabulary)"
    return None


def base_family(base_config: dict[str, Any], where: str) -> Family:
    """The registry family of the base (a clear MismatchError if none, or if its base GGUF cannot be written)."""
    from lorakit.export.gguf_metadata import check_gguf_config

    family = family_of_config(base_config, where)
    check_gguf_config(family, base_config, where)
    return family


def base_unsupported(base_dir: Path) -> str | None:
    """Why GGUF LoRA adapters cannot be written for this base (None: they can): every family of the
    registry whose base GGUF lorakit writes is covered."""
    try:
        base_family(json.loads((base_dir / "config.json").read_text()), str(base_dir))
    except MismatchError as e:
        return f"no GGUF LoRA adapter for this base ({e})"
    return None


def _load_adapter_tensors(adapter_dir: Path) -> dict[str, Any]:
    st = adapter_dir / "adapter_model.safetensors"
    if st.is_file():
        from safetensors.torch import load_file

        return load_file(str(st))
    binary = adapter_dir / "adapter_model.bin"
    if binary.is_file():
        import torch

        return torch.load(binary, map_location="cpu", weights_only=True)
    raise ConfigError(f"{adapter_dir}: no adapter_model.safetensors or adapter_model.bin")


def _pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    """PEFT's rank_pattern/alpha_pattern lookup: a key matches the module name or a dotted suffix of it."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def lora_tensors(adapter_dir: Path, base_config: dict[str, Any], base_has_output: bool, family: Family):
    """Yield (gguf tensor name, tensor, B's rescale factor) for the adapter: `<W>.lora_a` [r, in],
    `<W>.lora_b` [out, r], named and (q/k) permuted as `family` says."""
    import torch

    cfg = adapter_config(adapter_dir)
    why = trains_embeddings(adapter_dir)
    if why:
        raise AdapterNotConvertibleError(f"{adapter_dir}: cannot be a GGUF LoRA adapter: {why}; {MERGE_HINT}")
    if cfg.get("peft_type", "LORA") != "LORA":
        raise AdapterNotConvertibleError(f"{adapter_dir}: a {cfg.get('peft_type')} adapter, not LoRA; {MERGE_HINT}")
    if cfg.get("use_dora"):
        raise AdapterNotConvertibleError(f"{adapter_dir}: DoRA adapters are not supported by llama.cpp; {MERGE_HINT}")
    alpha = float(cfg.get("lora_alpha") or cfg.get("r") or 8)
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in _load_adapter_tensors(adapter_dir).items():
        if key.endswith(".base_layer.weight"):
            continue  # PEFT saves the (untrained) base of an adapted lm_head/embedding alongside; not needed
        m = _KEY.match(key)
        if not m:
            raise AdapterNotConvertibleError(f"{adapter_dir}: tensor {key} is not a LoRA A/B matrix (embedding LoRA, "
                                             f"bias or a trained module); {MERGE_HINT}")
        pairs.setdefault(m["module"], {})[m["ab"]] = t
    for module in sorted(pairs):
        ab = pairs[module]
        mapped = family.map_hf(module + ".weight")
        if mapped is None or set(ab) != {"A", "B"}:
            raise AdapterNotConvertibleError(f"{adapter_dir}: cannot place the LoRA of {module} in a {family.name} "
                                             f"GGUF; {MERGE_HINT}")
        if mapped.rule.gguf == "output.weight" and not base_has_output:
            raise AdapterNotConvertibleError(f"{adapter_dir}: adapts lm_head, which this base ties to the embeddings "
                                             f"(no separate output tensor in llama.cpp); {MERGE_HINT}")
        a, b = ab["A"].float(), ab["B"].float()
        r = a.shape[0]
        r_alpha = float(_pattern_value(cfg.get("alpha_pattern"), module, alpha))
        peft_scale = r_alpha / (math.sqrt(r) if cfg.get("use_rslora") else r)
        factor = peft_scale / (alpha / r)
        if not math.isclose(factor, 1.0, rel_tol=1e-7):
            b = b * factor
        heads = rotary_heads(mapped.rule, base_config) if family.permute_qk else None
        if heads:
            b = hf_to_meta_rows(b, heads)
        yield mapped.gguf + ".lora_a", a, factor
        yield mapped.gguf + ".lora_b", b, factor


def write_gguf_lora(adapter_dir: Path, base_dir: Path, out: Path, outtype: str = "f32") -> LoraSummary:
    """Write the adapter in `adapter_dir` (trained on the HF model `base_dir`) as a GGUF LoRA at `out`."""
    from gguf import GGUFWriter

    from lorakit.export.gguf_writer import _encode, _file_type, _ggml_type
    from lorakit.formats.safetensors_io import SafetensorsFolder

    if outtype not in ("f32", "f16", "bf16"):
        raise ConfigError(f"GGUF LoRA adapters are written in f32, f16 or bf16, not {outtype}")
    base_config = json.loads((base_dir / "config.json").read_text())
    family = base_family(base_config, str(base_dir))
    src = SafetensorsFolder(base_dir)
    base_has_output = "lm_head.weight" in src.names and not base_config.get("tie_word_embeddings", False)
    src.close()
    cfg = adapter_config(adapter_dir)
    alpha = float(cfg.get("lora_alpha") or cfg.get("r") or 8)
    tensors = list(lora_tensors(adapter_dir, base_config, base_has_output, family))
    if not tensors:
        raise MismatchError(f"{adapter_dir}: no LoRA tensors in this adapter")
    w = GGUFWriter(out, family.gguf_arch)
    w.add_type("adapter")
    w.add_string("adapter.type", "lora")
    w.add_float32("adapter.lora.alpha", alpha)
    w.add_name(adapter_dir.name)
    w.add_file_type(_file_type(outtype))
    for name, t, _ in tensors:
        qtype = _ggml_type(outtype, list(t.shape))
        w.add_tensor(name, _encode(t.contiguous(), qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    rescaled = sum(1 for name, _, f in tensors if name.endswith(".lora_b") and not math.isclose(f, 1.0, rel_tol=1e-7))
    return LoraSummary(len(tensors) // 2, int(cfg.get("r") or 0), alpha, rescaled)
