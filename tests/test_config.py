"""Dataclass options -> flags and YAML configs."""

from __future__ import annotations

import dataclasses
import re

import pytest

from lorakit.cli import COMMANDS, build_parser, main
from lorakit.config import build_config, config_from_args
from lorakit.errors import ConfigError
from lorakit.train.config import FinetuneConfig


def _parse(argv: list[str]) -> FinetuneConfig:
    args = build_parser().parse_args(["finetune", *argv])
    return config_from_args(FinetuneConfig, args, args.config)


def test_kebab_flags_booleans_and_lists():
    cfg = _parse(["--data-path", "d.json", "--no-train-on-inputs", "--lora-target-modules", "q_proj,k_proj",
                  "v_proj", "--micro-batch-size", "2", "--batch-size", "8", "--learning-rate", "1e-4"])
    assert cfg.train_on_inputs is False and cfg.add_eos_token is True
    assert cfg.lora_target_modules == ["q_proj", "k_proj", "v_proj"]
    assert (cfg.micro_batch_size, cfg.batch_size, cfg.learning_rate) == (2, 8, 1e-4)
    # untouched options keep alpaca-lora's defaults
    assert (cfg.lora_r, cfg.lora_alpha, cfg.cutoff_len, cfg.val_set_size) == (8, 16, 256, 2000)


def test_yaml_config_with_flag_override(tmp_path):
    path = tmp_path / "ft.yaml"
    path.write_text("data-path: a.json\nlora_r: 4\ntrain_on_inputs: false\nlearning_rate: 0.001\n")
    cfg = _parse([str(path), "--lora-r", "16"])
    assert cfg.data_path == "a.json" and cfg.lora_r == 16 and cfg.train_on_inputs is False
    assert cfg.learning_rate == pytest.approx(1e-3)


@pytest.mark.parametrize("yaml_text, message", [
    ("data_path: a.json\nlora_rank: 4\n", "unknown option(s): --lora-rank"),
    ("data_path: a.json\nlora_r: four\n", "--lora-r: invalid value 'four'"),
    ("data_path: a.json\nbatch_size: 10\nmicro_batch_size: 4\n", "multiple of --micro-batch-size"),
    ("data_path: a.json\nlora_dropout: 1.0\n", "--lora-dropout must be in [0, 0.999), got 1.0"),
    ("data_path: a.json\nlora_r: 0\n", "--lora-r must be >= 1"),
    ("- a\n- b\n", "a config must be a mapping"),
])
def test_bad_config_is_a_clear_error(tmp_path, yaml_text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml_text)
    with pytest.raises(ConfigError, match=re.escape(message)):
        _parse([str(path)])


def test_missing_data_path_exits_2(capsys):
    with pytest.raises(SystemExit) as e:
        main(["finetune", "--base-model", "x"])
    assert e.value.code == 2
    assert "--data-path" in capsys.readouterr().err


def test_every_command_has_help(capsys):
    for name in COMMANDS:
        with pytest.raises(SystemExit) as e:
            main([*name.split(), "--help"])
        assert e.value.code == 0
        assert "usage: lorakit " + name in capsys.readouterr().out


def test_every_field_is_documented():
    config = FinetuneConfig(data_path="x")
    for f in dataclasses.fields(config):
        assert f.metadata.get("help"), f"{f.name} has no help text"
    assert build_config(FinetuneConfig, {"data_path": "x"}) == config


@pytest.mark.parametrize("argv, flag", [
    (["merge", "--output-dir", "out"], "--lora-weights"),
    (["infer", "--data-file", "in.jsonl"], "--output"),
    (["export", "--model", "m"], "--output"),
    (["pretrain"], "--data-path"),
])
def test_required_options_are_refused_when_empty(capsys, argv, flag):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    assert f"missing required option {flag}" in capsys.readouterr().err


def test_required_options_say_so_in_help(capsys):
    with pytest.raises(SystemExit):
        main(["merge", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "merged in the given order (comma list) (required)" in help_text


def test_dtype_is_one_flag_with_the_old_spellings_as_aliases(tmp_path):
    """export: --dtype, --outtype (llama.cpp's name, also as a YAML key) land in one field, canonically
    spelled; merge: the old torch spellings (--dtype bfloat16) keep working."""
    from lorakit.export.config import ExportConfig
    from lorakit.merge.config import MergeConfig

    parser = build_parser()
    for flag, value in [("--dtype", "bf16"), ("--outtype", "bf16"), ("--outtype", "bfloat16")]:
        args = parser.parse_args(["export", "--model", "m", "--output", "o.gguf", flag, value])
        assert config_from_args(ExportConfig, args).dtype == "bf16"
    yaml_file = tmp_path / "export.yaml"
    yaml_file.write_text("model: m\noutput: o.gguf\nouttype: q8_0\n")
    args = parser.parse_args(["export"])
    assert config_from_args(ExportConfig, args, str(yaml_file)).dtype == "q8_0"
    args = parser.parse_args(["export", "--dtype", "f32"])
    assert config_from_args(ExportConfig, args, str(yaml_file)).dtype == "f32"  # the flag wins over YAML
    with pytest.raises(ConfigError, match=r"--dtype q8_0 is only for --format gguf"):
        build_config(ExportConfig, {"model": "m", "output": "o", "format": "pth", "dtype": "q8_0"})
    merge = build_config(MergeConfig, {"lora_model": ["a"], "output_dir": "o", "dtype": "bfloat16"})
    assert merge.dtype == "bf16"
    assert build_config(MergeConfig, {"lora_model": ["a"], "output_dir": "o"}).dtype == "auto"
