"""Check a PEFT adapter folder, and that it fits a base model, from its config and headers alone.

`validate_adapter_dir` (called where adapters are resolved) refuses a folder without its weights, an
adapter_config.json that does not parse or whose fields have the wrong type (r must be an integer,
lora_alpha a number, target_modules a list or a string...), an unknown `peft_type`, and weights whose
header is damaged. `check_adapter_fits` compares the LoRA factors' shapes with the base weights'
(safetensors headers of both: no tensor is loaded): A is [r, in] and B [out, r] for a base weight
[out, in] (transposed for embeddings and fan_in_fan_out layers).
"""

from __future__ import annotations

import re
import zipfile
from pathlib import Path
from typing import Any

from lorakit.errors import DamagedFileError, MismatchError
from lorakit.models.headers import nonempty_size, safetensors_header
from lorakit.models.validate import field_error, is_int, is_number, read_json_object

CONFIG, WEIGHTS, WEIGHTS_BIN = "adapter_config.json", "adapter_model.safetensors", "adapter_model.bin"
PREFIX = "base_model.model."
# PEFT's PeftType names (peft.utils.peft_types); lorakit trains and merges LORA
KNOWN_PEFT_TYPES = ("LORA", "ADALORA", "LOHA", "LOKR", "IA3", "OFT", "BOFT", "VERA", "FOURIERFT", "HRA", "BONE",
                    "LN_TUNING", "PROMPT_TUNING", "P_TUNING", "PREFIX_TUNING", "MULTITASK_PROMPT_TUNING",
                    "POLY", "XLORA", "CPT", "VBLORA", "RANDLORA", "SHIRA", "C3A", "MISS", "ROAD", "WAVEFT",
                    "GRALORA", "DELORA", "OSF", "TRAINABLE_TOKENS", "ADAPTION_PROMPT")
_ADVICE = "fix the field or use the adapter_config.json saved with the adapter"
_PAIR = re.compile(r"(.+)\.lora_(?:embedding_)?([AB])(?:\.[^.]+)?(?:\.weight)?")


def _check_lora_fields(path: Path, cfg: dict[str, Any]) -> None:
    checks: list[tuple[str, bool, str, bool]] = [  # (field, ok, expected, required)
        ("r", is_int(cfg.get("r")) and cfg.get("r", 0) > 0, "a positive integer", True),
        ("lora_alpha", is_number(cfg.get("lora_alpha")), "a number", True),
        ("target_modules", cfg.get("target_modules") is None or isinstance(cfg.get("target_modules"), str)
         or (isinstance(cfg.get("target_modules"), list) and all(isinstance(t, str) for t in cfg["target_modules"])),
         "a list of module names or a string", False),
        ("lora_dropout", is_number(cfg.get("lora_dropout")) and 0 <= cfg.get("lora_dropout", 0) < 1,
         "a number in [0, 1)", False),
        ("modules_to_save", cfg.get("modules_to_save") is None or (isinstance(cfg.get("modules_to_save"), list)
         and all(isinstance(t, str) for t in cfg["modules_to_save"])), "a list of module names", False),
        ("rank_pattern", cfg.get("rank_pattern") is None or (isinstance(cfg.get("rank_pattern"), dict)
         and all(is_int(v) and v > 0 for v in cfg["rank_pattern"].values())), "an object of positive integers", False),
        ("alpha_pattern", cfg.get("alpha_pattern") is None or (isinstance(cfg.get("alpha_pattern"), dict)
         and all(is_number(v) for v in cfg["alpha_pattern"].values())), "an object of numbers", False),
    ]
    checks += [(name, isinstance(cfg.get(name), bool), "true or false", False)
               for name in ("use_rslora", "fan_in_fan_out", "use_dora", "inference_mode")]
    for name, ok, expected, required in checks:
        if (required or cfg.get(name) is not None) and not ok:
            raise field_error(path, name, cfg.get(name), expected, _ADVICE)


def validate_adapter_dir(folder: Path) -> dict[str, list[int]] | None:
    """Check an adapter folder's config and weights header; return {tensor: shape} (None for .bin)."""
    cfg_path = folder / CONFIG
    cfg = read_json_object(cfg_path, "a PEFT adapter config", _ADVICE)
    peft_type = cfg.get("peft_type")
    if not isinstance(peft_type, str) or peft_type.upper() not in KNOWN_PEFT_TYPES:
        raise field_error(cfg_path, "peft_type", peft_type, "a PEFT method name such as 'LORA'", _ADVICE)
    if peft_type.upper() == "LORA":
        _check_lora_fields(cfg_path, cfg)
    st, binary = folder / WEIGHTS, folder / WEIGHTS_BIN
    if not st.exists() and binary.is_file():
        nonempty_size(binary, "PyTorch adapter weights")
        if not zipfile.is_zipfile(binary):
            raise DamagedFileError(binary, "not a PyTorch weights file (not a zip archive)",
                                   "copy the adapter folder again")
        return None
    if not st.exists():
        raise DamagedFileError(st, f"missing: the adapter folder {folder} has {CONFIG} but no weights",
                               "copy the whole adapter folder again, or re-run the training that wrote it")
    header = safetensors_header(st)
    shapes = {name: shape for name, (_, shape) in header.items()}
    if not shapes:
        raise DamagedFileError(st, "holds no tensors (an empty adapter)", "re-run the training that wrote it")
    for name in shapes:
        if not name.startswith(PREFIX):
            raise DamagedFileError(st, f"tensor {name!r} is not a PEFT adapter weight (no {PREFIX!r} prefix)",
                                   "save the adapter with PEFT's save_pretrained")
    if peft_type.upper() == "LORA":
        _check_pairs(st, shapes)
    return shapes


def _lora_pairs(shapes: dict[str, list[int]]) -> dict[str, dict[str, tuple[str, list[int]]]]:
    """{module: {"A"|"B": (key, shape)}} of the LoRA factors in an adapter's tensors."""
    pairs: dict[str, dict[str, tuple[str, list[int]]]] = {}
    for key, shape in shapes.items():
        m = _PAIR.fullmatch(key[len(PREFIX):])
        if m:
            pairs.setdefault(m.group(1), {})[m.group(2)] = (key, shape)
    return pairs


def _check_pairs(path: Path, shapes: dict[str, list[int]]) -> None:
    for module, ab in _lora_pairs(shapes).items():
        if set(ab) != {"A", "B"}:
            raise DamagedFileError(path, f"the LoRA of {module} has only its {'A' if 'A' in ab else 'B'} matrix",
                                   "copy the adapter again, or re-run the training that wrote it")
        (_, a), (_, b) = ab["A"], ab["B"]
        if len(a) != 2 or len(b) != 2 or a[0] != b[1]:
            raise DamagedFileError(path, f"the LoRA of {module} has A {a} and B {b}, which do not multiply",
                                   "copy the adapter again, or re-run the training that wrote it")


def check_adapter_fits(folder: Path, adapter_shapes: dict[str, list[int]] | None,
                       base_shapes: dict[str, list[int]] | None, tied: bool = False) -> None:
    """Every module the adapter changes exists in the base, and every LoRA update has its weight's shape.

    Embedding and lm_head rows are not compared: a vocabulary-extended adapter carries more rows."""
    if adapter_shapes is None or base_shapes is None:
        return  # .bin weights: PEFT's loader reports mismatches itself
    import json

    cfg = json.loads((folder / CONFIG).read_text(encoding="utf-8"))
    base = dict(base_shapes)
    if tied and "lm_head.weight" not in base and "model.embed_tokens.weight" in base:
        base["lm_head.weight"] = base["model.embed_tokens.weight"]
    where = folder / WEIGHTS
    for module, ab in _lora_pairs(adapter_shapes).items():
        target = module + ".weight"
        if target not in base:
            raise MismatchError(f"{where}: targets {module!r}, which the base model does not have; use the base "
                                "model the adapter was trained on")
        (a_key, a), (_, b) = ab["A"], ab["B"]
        transposed = "lora_embedding_" in a_key or bool(cfg.get("fan_in_fan_out"))
        delta = [a[1], b[0]] if transposed else [b[0], a[1]]
        want = base[target]
        vocab_side = module.endswith(("embed_tokens", "lm_head"))
        if (delta[1:] != want[1:] if vocab_side else delta != want):
            raise MismatchError(f"{where}: the LoRA of {module} gives a {delta} update but the base model's "
                                f"weight is {want}; use the base model the adapter was trained on")
    for key, shape in adapter_shapes.items():
        rest = key[len(PREFIX):]
        for suffix in (".modules_to_save.weight", ".base_layer.weight"):
            if rest.endswith(suffix):
                target = rest.removesuffix(suffix) + ".weight"
                if target not in base:
                    raise MismatchError(f"{where}: saves a full {target!r}, which the base model does not have; "
                                        "use the base model the adapter was trained on")
                if shape[1:] != base[target][1:]:
                    raise MismatchError(f"{where}: its {target} has shape {shape} but the base model's is "
                                        f"{base[target]}; use the base model the adapter was trained on")


def check_adapters_fit_base(adapter_dirs: list[Path], base_dir: Path) -> None:
    """`check_adapter_fits` for each adapter against an (already validated) HF base folder."""
    if not adapter_dirs:
        return
    import json

    from lorakit.models.validate import weight_shapes

    base = weight_shapes(base_dir)
    config = json.loads((base_dir / "config.json").read_text(encoding="utf-8"))
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
    for d in adapter_dirs:
        check_adapter_fits(d, validate_adapter_dir(d), base, tied=bool(text.get("tie_word_embeddings")))
