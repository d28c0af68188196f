"""Damaged model, adapter and tokenizer files are refused up front with one line (models/validate.py,
headers.py, adapter_check.py); each check is compared with the library that would otherwise have read
the file (safetensors, gguf, sentencepiece, tokenizers, PEFT), which must fail on the same damage."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from cli_helpers import run_cli
from lorakit.errors import DamagedFileError, MismatchError
from lorakit.models.adapter_check import check_adapters_fit_base, validate_adapter_dir
from lorakit.models.headers import gguf_header, human_size, safetensors_header
from lorakit.models.validate import validate_model_dir, validate_tokenizer


@pytest.fixture(scope="module")
def adapter_dir(tiny_model_dir, tmp_path_factory) -> Path:
    from tiny_models import make_tiny_adapter

    return make_tiny_adapter(tiny_model_dir, tmp_path_factory.mktemp("adapter") / "a")


@pytest.fixture(scope="module")
def small_gguf(tmp_path_factory) -> Path:
    """A GGUF with metadata (scalars, strings, a string array) and three tensors of two types."""
    import gguf

    path = tmp_path_factory.mktemp("gguf") / "small.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(2)
    w.add_name("small")
    w.add_array("tokenizer.ggml.tokens", [f"tok{i}" for i in range(50)])
    rng = np.random.default_rng(0)
    w.add_tensor("a", rng.standard_normal((8, 16)).astype(np.float32))
    w.add_tensor("b", rng.standard_normal((4, 32)).astype(np.float16))
    w.add_tensor("c", rng.standard_normal(64).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# ---- the issue's table: each row one line, exit 2, nothing written ----------------------------------
def _row_config_json(model, adapter, tmp):
    base = _copy(model, tmp / "base")
    (base / "config.json").write_text("{not json")
    return base / "config.json", ["merge", "--base-model", base, "--lora-model", adapter]


def _row_tokenizer_model(model, adapter, tmp):
    base = _copy(model, tmp / "base")
    (base / "tokenizer.json").unlink()
    (base / "tokenizer.model").write_bytes(os.urandom(4096))
    return base / "tokenizer.model", ["merge", "--base-model", base, "--lora-model", adapter]


def _row_truncated_shard(model, adapter, tmp):
    base = _copy(model, tmp / "base")
    data = (base / "model.safetensors").read_bytes()
    (base / "model.safetensors").write_bytes(data[: len(data) // 2])
    return base / "model.safetensors", ["merge", "--base-model", base, "--lora-model", adapter]


def _row_truncated_gguf(model, adapter, tmp, gguf_file):
    data = gguf_file.read_bytes()
    (tmp / "m.gguf").write_bytes(data[: len(data) // 2])
    return tmp / "m.gguf", ["generate", "--base-model", tmp / "m.gguf", "--instruction", "hi"]


def _row_adapter_without_weights(model, adapter, tmp):
    a = _copy(adapter, tmp / "a")
    (a / "adapter_model.safetensors").unlink()
    return a / "adapter_model.safetensors", ["generate", "--base-model", model, "--lora-weights", a,
                                             "--instruction", "hi"]


def _row_adapter_r_string(model, adapter, tmp):
    a = _copy(adapter, tmp / "a")
    cfg = json.loads((a / "adapter_config.json").read_text())
    cfg["r"] = "x"
    (a / "adapter_config.json").write_text(json.dumps(cfg))
    return a / "adapter_config.json", ["merge", "--base-model", model, "--lora-model", a]


def _row_adapter_random(model, adapter, tmp):
    a = _copy(adapter, tmp / "a")
    (a / "adapter_model.safetensors").write_bytes(os.urandom(20000))
    return a / "adapter_model.safetensors", ["generate", "--base-model", model, "--lora-weights", a,
                                             "--instruction", "hi"]


ROWS = [_row_config_json, _row_tokenizer_model, _row_truncated_shard, _row_truncated_gguf,
        _row_adapter_without_weights, _row_adapter_r_string, _row_adapter_random]


@pytest.mark.parametrize("row", ROWS, ids=[r.__name__[5:] for r in ROWS])
def test_issue_table(row, tiny_model_dir, adapter_dir, small_gguf, tmp_path, capsys):
    args = (tiny_model_dir, adapter_dir, tmp_path) + ((small_gguf,) if row is _row_truncated_gguf else ())
    damaged, argv = row(*args)
    out = tmp_path / "out"
    if argv[0] == "merge":
        argv += ["--output-dir", out]
    code = run_cli(*argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2, err
    assert len(lines) == 1 and str(damaged) in lines[0], err
    assert "Traceback" not in err
    assert not out.exists()


# ---- safetensors: our header check fails exactly when safetensors itself fails -----------------------
def _safetensors_opens(path: Path) -> bool:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            for k in f.keys():  # noqa: SIM118
                f.get_tensor(k)
        return True
    except Exception:
        return False


def test_safetensors_truncation_agrees_with_the_library(tiny_model_dir, tmp_path):
    data = (tiny_model_dir / "model.safetensors").read_bytes()
    cuts = [0, 4, 8, 100, 2000, len(data) // 3, len(data) - 1]
    for n in cuts:
        p = tmp_path / f"cut{n}.safetensors"
        p.write_bytes(data[:n])
        assert not _safetensors_opens(p)
        with pytest.raises(DamagedFileError, match=str(p)):
            safetensors_header(p)
    whole = tmp_path / "whole.safetensors"
    whole.write_bytes(data)
    assert _safetensors_opens(whole) and safetensors_header(whole)
    longer = tmp_path / "longer.safetensors"
    longer.write_bytes(data + b"\0" * 16)
    assert not _safetensors_opens(longer)
    with pytest.raises(DamagedFileError, match="more than its tensors need"):
        safetensors_header(longer)


def test_truncation_message_gives_sizes(tiny_model_dir, tmp_path):
    data = (tiny_model_dir / "model.safetensors").read_bytes()
    p = tmp_path / "m.safetensors"
    p.write_bytes(data[:4_000_000])
    with pytest.raises(DamagedFileError) as e:
        safetensors_header(p)
    assert f"truncated: 4 MB of {human_size(len(data))}; download it again" in str(e.value)
    assert human_size(1_020_000_000) == "1.02 GB" and human_size(512_000_000) == "512 MB"


# ---- GGUF: our walk of the header fails exactly when gguf's reader fails ----------------------------
def _gguf_reads(path: Path) -> bool:
    from gguf import GGUFReader

    try:
        r = GGUFReader(str(path))
        return all(t.data.size for t in r.tensors)
    except Exception:
        return False


def test_gguf_truncation_agrees_with_gguf_reader(small_gguf, tmp_path):
    data = small_gguf.read_bytes()
    reference = {name: list(shape) for name, (_, shape) in gguf_header(small_gguf).items()}
    from gguf import GGUFReader

    assert reference == {t.name: [int(d) for d in t.shape] for t in GGUFReader(str(small_gguf)).tensors}
    for n in sorted({0, 3, 4, 10, 30, 200, 500, len(data) // 2, len(data) - 64, len(data) - 1}):
        p = tmp_path / f"cut{n}.gguf"
        p.write_bytes(data[:n])
        assert not _gguf_reads(p), n
        with pytest.raises(DamagedFileError, match=str(p)):
            gguf_header(p)
    p = tmp_path / "random.gguf"
    p.write_bytes(os.urandom(len(data)))
    with pytest.raises(DamagedFileError, match="not a GGUF file"):
        gguf_header(p)


# ---- tokenizers, configs, adapters ------------------------------------------------------------------
def test_tokenizer_files_checked_by_their_libraries(tiny_model_dir, tmp_path):
    from tokenizers import Tokenizer

    folder = _copy(tiny_model_dir, tmp_path / "m")
    validate_tokenizer(folder)
    (folder / "tokenizer.json").write_text('{"version": "1.0"}')  # JSON, but not a tokenizer
    with pytest.raises(Exception):  # noqa: B017 (the Rust library raises a plain Exception)
        Tokenizer.from_file(str(folder / "tokenizer.json"))
    with pytest.raises(DamagedFileError, match="tokenizer.json: not a tokenizer.json"):
        validate_tokenizer(folder)
    (folder / "tokenizer.json").unlink()
    with pytest.raises(DamagedFileError, match="holds no tokenizer"):
        validate_tokenizer(folder)
    good = Path(__file__).resolve().parents[1] / "data" / "llama_style_bpe_16k.model"
    validate_tokenizer(good)


def test_config_fields_typed(tiny_model_dir, tmp_path):
    folder = _copy(tiny_model_dir, tmp_path / "m")
    assert validate_model_dir(folder)["model.embed_tokens.weight"] == [len(json.loads(
        (folder / "tokenizer.json").read_text())["model"]["vocab"]), 64]
    cfg = json.loads((folder / "config.json").read_text())
    for key, value, message in [("hidden_size", "64", "must be a positive integer, got '64'"),
                                ("num_hidden_layers", None, "'num_hidden_layers' is missing"),
                                ("hidden_size", 32, "implies"), ("vocab_size", 10, "implies")]:
        bad = dict(cfg)
        if value is None:
            del bad[key]
        else:
            bad[key] = value
        (folder / "config.json").write_text(json.dumps(bad))
        with pytest.raises(DamagedFileError, match=message):
            validate_model_dir(folder)
    (folder / "config.json").write_text("[1, 2]")
    with pytest.raises(DamagedFileError, match="a JSON list, not an object"):
        validate_model_dir(folder)


def test_adapter_shape_mismatch_found_from_headers_as_peft_would(tiny_model_dir, adapter_dir, tmp_path):
    """An adapter for a hidden-64 model on a hidden-32 base: refused from headers; PEFT fails too."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from tiny_models import make_tiny_llama

    other = make_tiny_llama(tmp_path / "other", hidden_size=32, intermediate_size=64)
    assert validate_adapter_dir(adapter_dir)
    check_adapters_fit_base([adapter_dir], tiny_model_dir)
    with pytest.raises(MismatchError, match="q_proj gives a \\[64, 64\\] update but the base model's weight "
                                            "is \\[32, 32\\]"):
        check_adapters_fit_base([adapter_dir], other)
    with pytest.raises(RuntimeError, match="size mismatch"):
        PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(other), str(adapter_dir))


@pytest.mark.parametrize("field,value,message", [
    ("r", 2.5, "'r' must be a positive integer"), ("lora_alpha", "16", "'lora_alpha' must be a number"),
    ("target_modules", 7, "'target_modules' must be a list"), ("peft_type", "LOLA", "'peft_type' must be"),
    ("lora_dropout", 1.5, "'lora_dropout' must be a number in"), ("use_rslora", "yes", "'use_rslora' must be"),
])
def test_adapter_config_fields(adapter_dir, tmp_path, field, value, message):
    a = _copy(adapter_dir, tmp_path / "a")
    cfg = json.loads((a / "adapter_config.json").read_text())
    cfg[field] = value
    (a / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(DamagedFileError, match=message):
        validate_adapter_dir(a)
