"""Precision auto-selection: bf16 only where the CPU/GPU runs it natively, fp32 otherwise; explicit
bf16/fp16 refused with a clear message where unsupported. CPU flags and CUDA are mocked."""

from __future__ import annotations

import pytest
import torch

from lorakit import precision as P
from lorakit.errors import ConfigError


@pytest.fixture
def cpu(monkeypatch):
    """Pretend to be a CPU-only machine whose /proc/cpuinfo flags are the given set."""

    def set_flags(*flags: str) -> None:
        monkeypatch.setattr(P, "cpu_flags", lambda: frozenset(flags))
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)

    return set_flags


@pytest.mark.parametrize("flags,expected", [
    (("sse4_2", "avx2", "avx512f"), "fp32"),           # AVX-512 without bf16 instructions
    (("avx2", "avx512f", "avx512_bf16"), "bf16"),
    (("avx2", "amx_tile", "amx_bf16"), "bf16"),
    ((), "fp32"),                                       # flags unreadable
])
def test_auto_follows_cpu_flags(cpu, flags, expected):
    cpu(*flags)
    assert P.resolve_precision("auto") == expected


def test_explicit_bf16_refused_without_native_support(cpu):
    cpu("avx2", "avx512f")
    with pytest.raises(ConfigError, match="bf16 is not supported on this cpu"):
        P.resolve_precision("bf16")
    assert P.resolve_precision("fp32") == "fp32"


def test_fp16_needs_cuda(cpu):
    cpu("amx_bf16")
    with pytest.raises(ConfigError, match="fp16 needs a CUDA GPU"):
        P.resolve_precision("fp16")


def test_cuda_without_bf16_falls_back_to_fp32(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    monkeypatch.setattr(P, "cpu_flags", lambda: frozenset({"amx_bf16"}))  # the CPU must not matter on a GPU
    assert P.resolve_precision("auto") == "fp32"
    with pytest.raises(ConfigError, match="bf16 is not supported on this cuda"):
        P.resolve_precision("bf16")
    assert P.resolve_precision("fp16") == "fp16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert P.resolve_precision("auto") == "bf16"


def test_cpu_flags_parsed_from_proc_cpuinfo(tmp_path, monkeypatch):
    text = "processor\t: 0\nflags\t\t: fpu sse avx512_bf16 amx_tile\nbugs\t\t: none\n"
    fake = tmp_path / "cpuinfo"
    fake.write_text(text)
    real_path = P.Path
    monkeypatch.setattr(P, "Path", lambda p: real_path(fake) if p == "/proc/cpuinfo" else real_path(p))
    P.cpu_flags.cache_clear()
    try:
        assert P.cpu_flags() == frozenset({"fpu", "sse", "avx512_bf16", "amx_tile"})
    finally:
        P.cpu_flags.cache_clear()


def test_weights_dtype_keeps_trainable_fp32_policy():
    assert P.weights_dtype("bf16") is torch.bfloat16
    assert P.weights_dtype("fp32") is torch.float32


def test_weight_type_table_agrees_with_torch_gguf_and_safetensors():
    """Every row's names exist in the library they name, and the safetensors reader maps them alike."""
    from gguf import GGMLQuantizationType, LlamaFileType

    from lorakit.formats.safetensors_io import st_dtype, torch_dtype

    for name, t in P.WEIGHT_TYPES.items():
        assert t.name == name
        assert GGMLQuantizationType[t.gguf].name == t.gguf
        assert LlamaFileType[t.gguf_file_type].name == t.gguf_file_type
        if t.torch is not None:
            assert P.torch_dtype(name) == getattr(torch, t.torch) == torch_dtype(t.safetensors)
            assert st_dtype(getattr(torch, t.torch)) == t.safetensors
            assert P.weights_dtype(t.precision) == getattr(torch, t.torch)


@pytest.mark.parametrize("spelling,name", [
    ("f16", "f16"), ("float16", "f16"), ("fp16", "f16"), ("half", "f16"), ("F16", "f16"), ("torch.float16", "f16"),
    ("bf16", "bf16"), ("bfloat16", "bf16"), ("BF16", "bf16"),
    ("f32", "f32"), ("float32", "f32"), ("fp32", "f32"), ("q8_0", "q8_0"), ("Q8_0", "q8_0"),
])
def test_every_spelling_reaches_one_row(spelling, name):
    assert P.weight_type(spelling).name == name


def test_unknown_or_unwritable_weight_type_names_the_flag_and_the_values():
    with pytest.raises(ConfigError, match=r"--dtype q4: not one of f32, f16, bf16, q8_0"):
        P.weight_type("q4")
    with pytest.raises(ConfigError, match=r"--dtype q8_0: not one of f32, f16, bf16$"):
        P.weight_type("q8_0", P.FLOAT_TYPES)


def test_precision_takes_weight_type_spellings(cpu):
    cpu("avx512_bf16")
    assert P.resolve_precision("f32") == "fp32" and P.resolve_precision("bfloat16") == "bf16"
