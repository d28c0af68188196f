"""Dataclass options -> command-line flags and YAML configs.

Each verb declares its options once, as a dataclass whose fields carry defaults and help text
(`opt(...)`). This module turns such a dataclass into argparse flags (kebab-case, `--x/--no-x` for
booleans, comma lists for list fields) and builds the instance from `CONFIG.yaml` + flags, flags
winning. It imports nothing heavy, so `lorakit --help` stays fast.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

import yaml

from lorakit.errors import ConfigError

T = TypeVar("T")


def opt(default: Any = dataclasses.MISSING, help: str = "", required: bool = False,  # noqa: A002
        aliases: tuple[str, ...] = (), **kw: Any) -> Any:
    """A dataclass field with a help text. Mutable defaults (lists) are copied per instance.

    `required=True` keeps an empty default (so option groups can still be combined by inheritance)
    but makes `build_config` refuse the option when it is left empty. `aliases` are other spellings
    of the option (field-style names such as "lora_model"), accepted as flags and as YAML keys, so
    users of alpaca-lora and Chinese-LLaMA each find the names they know.
    """
    meta = {"help": help, "required": required, "aliases": tuple(aliases)}
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda d=default: list(d), metadata=meta, **kw)
    return dataclasses.field(default=default, metadata=meta, **kw)


def flag_name(field_name: str) -> str:
    """Field name -> its flag: `base_model` -> `--base-model`."""
    return "--" + field_name.replace("_", "-")


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    if get_origin(tp) in (Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _split_list(values: list[str] | str) -> list[str]:
    items = [values] if isinstance(values, str) else values
    return [part.strip() for item in items for part in str(item).split(",") if part.strip()]


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """Add one flag per field of `cls`. Defaults are SUPPRESSed so that only given flags override."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp, optional = _unwrap_optional(hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else None
        if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = f.default_factory()  # type: ignore[misc]
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING  # type: ignore[misc]
        help_text = f.metadata.get("help", "")
        if required or f.metadata.get("required"):
            help_text += " (required)"
        elif "default:" not in help_text:  # a help that explains its default itself keeps only that one
            help_text += f" (default: {default})"
        if f.metadata.get("aliases"):
            help_text += "; also " + ", ".join(flag_name(a) for a in f.metadata["aliases"])
        kw: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS, "help": help_text}
        if tp is bool:
            kw["action"] = argparse.BooleanOptionalAction
        elif get_origin(tp) is list:
            kw.update(nargs="+", action="extend", metavar="VALUE")
        elif get_origin(tp) is Literal:
            kw.update(choices=list(get_args(tp)))
        elif tp in (int, float):
            kw.update(type=tp, metavar="N" if tp is int else "X")
        elif tp in (str, Path):
            kw["metavar"] = "PATH" if tp is Path or "path" in f.name or "dir" in f.name else "TEXT"
        else:
            raise TypeError(f"{cls.__name__}.{f.name}: unsupported option type {tp}")
        spellings = [flag_name(f.name), *(flag_name(a) for a in f.metadata.get("aliases", ()))]
        parser.add_argument(*spellings, **kw)


def _coerce(cls: type, name: str, value: Any, tp: Any) -> Any:
    inner, optional = _unwrap_optional(tp)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"option {flag_name(name)}: a value is required")
    try:
        if inner is bool:
            if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
                return value.lower() in ("true", "yes", "1")
            if isinstance(value, bool):
                return value
            raise ValueError(value)
        if get_origin(inner) is list:
            return _split_list(value if isinstance(value, list) else str(value))
        if get_origin(inner) is Literal:
            if value not in get_args(inner):
                raise ValueError(f"{value!r} is not one of {list(get_args(inner))}")
            return value
        if inner is int and isinstance(value, float) and not value.is_integer():
            raise ValueError(value)
        if inner is Path:
            return str(value)
        return inner(value)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"option {flag_name(name)}: invalid value {value!r} ({e})") from None


def load_yaml_config(path: str | Path) -> dict[str, Any]:
    """A YAML options file -> {field_name: value} (kebab-case keys accepted); ConfigError when unreadable."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        text = p.read_text(encoding="utf-8")
        data = yaml.safe_load(text) or {}
    except UnicodeDecodeError:
        raise ConfigError(f"{p}: not a YAML config (not UTF-8 text)") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML: {' '.join(str(e).split())}") from None
    if not text.strip():
        raise ConfigError(f"{p}: empty config file (write the options as `name: value` lines)")
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: a config must be a mapping of option names to values")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def _canonical_names(cls: type, values: dict[str, Any], source: str) -> dict[str, Any]:
    """Rename alias keys (e.g. `lora_model`) to their field's name; an option given twice is refused."""
    alias_of = {a: f.name for f in dataclasses.fields(cls) for a in f.metadata.get("aliases", ())}
    out: dict[str, Any] = {}
    for key, value in values.items():
        name = alias_of.get(key, key)
        if name in out:
            raise ConfigError(f"{source}: {flag_name(name)} is given twice (also as {flag_name(key)})")
        out[name] = value
    return out


def build_config(cls: type[T], values: dict[str, Any], source: str = "options") -> T:
    """Instantiate `cls` from a dict (YAML and/or flags), checking names, types and required fields."""
    values = _canonical_names(cls, values, source)
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(f"{source}: unknown option(s): {', '.join(flag_name(u) for u in unknown)}")
    kwargs = {k: _coerce(cls, k, v, hints[k]) for k, v in values.items()}
    for f in dataclasses.fields(cls):
        missing = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING  # type: ignore[misc]
        if missing and f.name not in kwargs:
            raise ConfigError(f"missing required option {flag_name(f.name)}")
    cfg = cls(**kwargs)
    for f in dataclasses.fields(cls):
        if f.metadata.get("required") and getattr(cfg, f.name) in ("", [], None):
            raise ConfigError(f"missing required option {flag_name(f.name)}")
    validate = getattr(cfg, "validate", None)
    if callable(validate):
        validate()
    return cfg


def config_from_args(cls: type[T], namespace: argparse.Namespace, config_path: str | None = None) -> T:
    values: dict[str, Any] = load_yaml_config(config_path) if config_path else {}
    values = _canonical_names(cls, values, str(config_path))
    names = {f.name for f in dataclasses.fields(cls)}
    flags = {k: v for k, v in vars(namespace).items() if k in names}
    from_file = set(values) - set(flags)
    values.update(flags)
    try:
        return build_config(cls, values, source=str(config_path or "options"))
    except ConfigError as e:  # name the YAML file when one of its values is the bad one
        if config_path and str(config_path) not in str(e) and any(flag_name(k) in str(e) for k in from_file):
            raise ConfigError(f"{config_path}: {e}") from None
        raise


def to_dict(cfg: Any) -> dict[str, Any]:
    """A config dataclass -> a plain dict for YAML (paths as strings)."""
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(cfg).items()}


def save_yaml(cfg: Any, path: str | Path) -> None:
    """Write a config dataclass to `path` as YAML (what a run saves next to its outputs)."""
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False, allow_unicode=True), encoding="utf-8")
