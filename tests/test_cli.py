"""The command line as a user meets it: `lorakit --help`, one spelling per option (with the other projects'
spellings as aliases), help lines, and the command lines lorakit prints for the user to run next."""

from __future__ import annotations

import re
import shlex

import pytest

from lorakit.cli import COMMANDS, _load, build_parser, main
from lorakit.config import config_from_args


def parse(argv: list[str]):
    """argv as a user types it (with or without the leading `lorakit`) -> the verb's config object."""
    if argv and argv[0] == "lorakit":
        argv = argv[1:]
    args = build_parser().parse_args(argv)
    return config_from_args(_load(COMMANDS[args._command][0]), args, args.config)


def test_top_level_help_addresses_a_user(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "new instructions" in out and "parse flags" not in out  # no implementation docstring
    flows = re.findall(r"^    (lorakit .+?)(?:\s+#.*)?$", out, flags=re.M)
    verbs = {shlex.split(line)[1] for line in flows}
    assert {"finetune", "generate", "serve", "merge", "export", "vocab", "pretrain"} <= verbs
    for line in flows:  # every example in the help parses with the real parser
        parse(shlex.split(line))


ADAPTER_VERBS = {
    "generate": ["generate"],
    "infer": ["infer", "--data-file", "in.jsonl", "--output", "out.jsonl"],
    "webui": ["webui"],
    "serve": ["serve"],
    "eval": ["eval", "--data-path", "d.json"],
    "merge": ["merge", "--output-dir", "out"],
}


@pytest.mark.parametrize("verb", sorted(ADAPTER_VERBS))
@pytest.mark.parametrize("flag", ["--lora-weights", "--lora-model"])
def test_both_adapter_spellings_work_on_every_adapter_verb(verb, flag):
    cfg = parse([*ADAPTER_VERBS[verb], flag, "a1,a2"])
    assert cfg.lora_weights == ["a1", "a2"]


def test_adapter_alias_in_yaml_and_given_twice(tmp_path, capsys):
    yaml_file = tmp_path / "merge.yaml"
    yaml_file.write_text("lora_model: [a1]\noutput_dir: out\n")
    assert parse(["merge", str(yaml_file)]).lora_weights == ["a1"]
    assert parse(["merge", str(yaml_file), "--lora-weights", "b"]).lora_weights == ["b"]  # flags win
    yaml_file.write_text("lora_model: [a1]\nlora_weights: [a2]\noutput_dir: out\n")
    with pytest.raises(SystemExit) as e:
        main(["merge", str(yaml_file)])
    assert e.value.code == 2 and "--lora-weights is given twice" in capsys.readouterr().err


def _help(name: str, capsys) -> str:
    with pytest.raises(SystemExit):
        main([*name.split(), "--help"])
    return " ".join(capsys.readouterr().out.split())


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_no_help_line_shows_its_default_twice(name, capsys):
    text = _help(name, capsys)
    assert not re.search(r"\(default:[^()]*(\([^()]*\))?[^()]*\)\s*\(default:", text), text
    assert "%(default)" not in text


def test_help_names_the_alias(capsys):
    assert "also --lora-model" in _help("merge", capsys)


def test_after_finetune_and_pretrain_commands_parse():
    from lorakit.train.commands import after_finetune, after_pretrain
    from lorakit.train.config import FinetuneConfig
    from lorakit.train.pretrain_config import PretrainConfig

    ft = FinetuneConfig(data_path="d.json", base_model="my-base", prompt_template="chat")
    cfg = parse(after_finetune(ft, "out/run 1"))
    assert (cfg.base_model, cfg.lora_weights, cfg.prompt_template) == ("my-base", ["out/run 1"], "chat")
    pt = PretrainConfig(data_path="t.txt", base_model="llama/")
    cfg = parse(after_pretrain(pt, "out/pt/"))
    assert (cfg.base_model, cfg.lora_weights, cfg.output_dir) == ("llama/", ["out/pt/"], "out/pt-merged")
    # what is printed is exactly what parses
    assert shlex.split(shlex.join(after_finetune(ft, "out/run 1"))) == after_finetune(ft, "out/run 1")


def test_demo_prints_a_command_that_parses():
    from lorakit.demo.config import DemoConfig
    from lorakit.demo.run import chat_command

    cfg = parse(chat_command(DemoConfig(), "outputs/demo/adapter"))
    assert cfg.lora_weights == ["outputs/demo/adapter"] and cfg.instruction.startswith("Convert this date")
