"""A table-driven fuzz suite of damaged inputs: every verb that reads files x every file it reads x every
kind of damage. Each case asserts exit 2, an error naming the damaged file, no traceback, no output
and no partial file left behind, and inputs unchanged.

The CLI runs in this process (lorakit.cli.main) so that each case costs milliseconds: the checks of
models/validate.py and friends fail before torch loads anything. `test_real_processes` proves the real
exit status and stderr of a few cases in subprocesses.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from lorakit.cli import main

MODEL_VERBS = ("finetune", "pretrain", "eval", "generate", "infer", "serve", "webui", "merge", "export")
ADAPTER_VERBS = ("eval", "generate", "infer", "serve", "webui", "merge")
JSON_DAMAGES = ("missing", "empty", "trunc-8", "trunc-half", "trunc-end", "random", "wrong-type", "wrong-value")
BINARY_DAMAGES = ("missing", "empty", "trunc-8", "trunc-half", "trunc-end", "random", "wrong-shape")


@dataclass(frozen=True)
class Case:
    verb: str
    input: str  # a key of INPUTS
    damage: str

    @property
    def id(self) -> str:
        return f"{self.verb.replace(' ', '-')}:{self.input}:{self.damage}"


# input name -> (file in the workspace, damages that apply)
INPUTS: dict[str, tuple[str, tuple[str, ...]]] = {
    "config": ("model/config.json", JSON_DAMAGES),
    "weights": ("model/model.safetensors", BINARY_DAMAGES),
    "tokenizer.json": ("model/tokenizer.json", JSON_DAMAGES),
    "tokenizer_config": ("model/tokenizer_config.json", ("empty", "trunc-8", "trunc-half", "trunc-end", "random",
                                                         "wrong-type")),
    "index": ("sharded/model.safetensors.index.json", JSON_DAMAGES),
    "shard": ("sharded/model-00002-of-00002.safetensors", BINARY_DAMAGES),
    "gguf": ("model.gguf", ("missing", "empty", "trunc-8", "trunc-half", "trunc-end", "random")),
    "tokenizer.model": ("tokenizer.model", ("missing", "empty", "trunc-8", "trunc-half", "trunc-end", "random")),
    "adapter_config": ("adapter/adapter_config.json", JSON_DAMAGES),
    "adapter_weights": ("adapter/adapter_model.safetensors", BINARY_DAMAGES),
    "data": ("data.json", JSON_DAMAGES),
    "text": ("text.jsonl", JSON_DAMAGES),
    "yaml": ("config.yaml", ("missing", "empty", "random", "wrong-type", "wrong-value")),
    "extra.model": ("extra.model", ("missing", "empty", "trunc-8", "trunc-half", "random")),
    "text.txt": ("text.txt", ("missing", "random")),
}
# a wrong value of the right JSON type, per input (the YAML's is per verb, below)
WRONG_VALUE: dict[str, Callable[[dict | list], None]] = {
    "config": lambda d: d.update(hidden_size="64"),
    "tokenizer.json": lambda d: d.update(model=5),
    "index": lambda d: d.update(weight_map=[]),
    "adapter_config": lambda d: d.update(r="x"),
    "data": lambda d: d[0].update(instruction=5),
}
YAML_WRONG_VALUE = {"finetune": "cutoff_len", "pretrain": "block_size", "eval": "cutoff_len",
                    "generate": "max_new_tokens", "infer": "max_new_tokens", "serve": "port", "webui": "port",
                    "merge": "dtype", "export": "outtype", "vocab stats": "max_lines", "vocab merge":
                    "max_sample_lines", "vocab train": "vocab_size"}


def build_cases() -> list[Case]:
    cases: list[Case] = []
    for verb in MODEL_VERBS:
        for name in ("config", "weights", "tokenizer.json", "tokenizer_config", "index", "shard", "gguf"):
            for damage in INPUTS[name][1]:
                if name == "tokenizer.json" and damage == "missing" and verb in ("merge", "export"):
                    continue  # a model without a tokenizer merges/exports without one (with a warning)
                cases.append(Case(verb, name, damage))
        if verb != "export":  # --tokenizer tokenizer.model
            cases += [Case(verb, "tokenizer.model", d) for d in INPUTS["tokenizer.model"][1]]
    for verb in ADAPTER_VERBS:
        cases += [Case(verb, name, d) for name in ("adapter_config", "adapter_weights") for d in INPUTS[name][1]]
    for verb in ("finetune", "eval", "infer"):
        cases += [Case(verb, "data", d) for d in INPUTS["data"][1]]
    cases += [Case("pretrain", "text", d) for d in INPUTS["text"][1] if d != "wrong-value"]
    cases += [Case(verb, "yaml", d) for verb in YAML_WRONG_VALUE for d in INPUTS["yaml"][1]]
    cases += [Case("vocab stats", "tokenizer.model", d) for d in INPUTS["tokenizer.model"][1]]
    cases += [Case("vocab stats", "text.txt", d) for d in INPUTS["text.txt"][1]]
    cases += [Case("vocab merge", "tokenizer.model", d) for d in INPUTS["tokenizer.model"][1]]
    cases += [Case("vocab merge", "extra.model", d) for d in INPUTS["extra.model"][1]]
    cases += [Case("vocab train", "text.txt", d) for d in INPUTS["text.txt"][1]]
    return cases


CASES = build_cases()


# ---- the workspace: a tiny model (single file and sharded), its GGUF, an adapter, data, configs -------
@pytest.fixture(scope="module")
def ws(tmp_path_factory, data_dir) -> Path:
    import torch
    from safetensors.torch import load_file, save_file

    from lorakit.export.gguf_writer import write_gguf
    from tiny_models import make_tiny_adapter, make_tiny_llama

    root = tmp_path_factory.mktemp("bad-files")
    model = make_tiny_llama(root / "model", hidden_size=16, layers=2, heads=2, kv_heads=1, intermediate_size=32)
    make_tiny_adapter(model, root / "adapter", r=2)
    shutil.copytree(model, root / "sharded")
    tensors = load_file(root / "sharded" / "model.safetensors")
    (root / "sharded" / "model.safetensors").unlink()
    names = sorted(tensors)
    weight_map = {}
    for i, part in enumerate((names[: len(names) // 2], names[len(names) // 2:]), start=1):
        fname = f"model-{i:05d}-of-00002.safetensors"
        save_file({n: tensors[n].contiguous() for n in part}, root / "sharded" / fname, metadata={"format": "pt"})
        weight_map.update({n: fname for n in part})
    (root / "sharded" / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": sum(t.numel() * 4 for t in tensors.values())}, "weight_map": weight_map}))
    write_gguf(model, root / "model.gguf", "f32")
    shutil.copy(data_dir / "llama_style_bpe_16k.model", root / "tokenizer.model")
    shutil.copy(data_dir / "llama_style_bpe_16k.model", root / "extra.model")
    records = json.loads((data_dir / "alpaca_en_demo.json").read_text())[:8]
    (root / "data.json").write_text(json.dumps(records, indent=1))
    (root / "text.jsonl").write_text("".join(json.dumps({"text": r["output"]}) + "\n" for r in records))
    (root / "text.txt").write_text("".join(r["output"].replace("\n", " ") + "\n" for r in records))
    torch.manual_seed(0)
    return root


def verb_args(verb: str, ws: Path, case: Case) -> list[str]:
    """The verb's options, reading the damaged input (and good copies of everything else)."""
    out = ws / "out"
    base = {"index": ws / "sharded", "shard": ws / "sharded", "gguf": ws / "model.gguf"}.get(case.input, ws / "model")
    tok = ["--tokenizer", str(ws / "tokenizer.model")] if case.input == "tokenizer.model" else []
    adapter = str(ws / "adapter")
    args: dict[str, list] = {
        "finetune": ["--base-model", base, "--data-path", ws / "data.json", "--output-dir", out / "ft", "--nproc", "1",
                     "--val-set-size", "0", *tok],
        "pretrain": ["--base-model", base, "--data-path", ws / "text.jsonl", "--output-dir", out / "pt", "--nproc",
                     "1", *tok],
        "eval": ["--base-model", base, "--lora-weights", adapter, "--data-path", ws / "data.json", *tok],
        "generate": ["--base-model", base, "--lora-weights", adapter, "--instruction", "hi", "--max-new-tokens",
                     "2", *tok],
        "infer": ["--base-model", base, "--lora-weights", adapter, "--data-file", ws / "data.json", "--output",
                  out / "infer.jsonl", *tok],
        "serve": ["--base-model", base, "--lora-weights", adapter, *tok],
        "webui": ["--base-model", base, "--lora-weights", adapter, *tok],
        "merge": ["--base-model", base, "--lora-model", adapter, "--output-dir", out / "merged", "--no-verify", *tok],
        "export": ["--model", base, "--format", "gguf", "--output", out / "m.gguf", "--no-verify"],
        "vocab stats": ["--tokenizer", ws / "tokenizer.model", "--text", ws / "text.txt"],
        "vocab merge": ["--base-tokenizer", ws / "tokenizer.model", "--extra-sp-model", ws / "extra.model",
                        "--output-dir", out / "vm"],
        "vocab train": ["--input", ws / "text.txt", "--vocab-size", "300", "--output", out / "v.model"],
    }
    return [str(a) for a in args[verb]]


def yaml_for(verb: str, ws: Path, case: Case) -> str:
    """The verb's options as a YAML config (for the YAML cases, run as `lorakit VERB config.yaml`)."""
    import yaml

    args = verb_args(verb, ws, case)
    lists = {"lora_weights", "lora_model", "text", "input"} | ({"tokenizer"} if verb == "vocab stats" else set())
    values: dict[str, object] = {}
    i = 0
    while i < len(args):
        key = args[i][2:].replace("-", "_")
        if key.startswith("no_"):
            values[key[3:]], i = False, i + 1
        else:
            values[key], i = ([args[i + 1]] if key in lists else args[i + 1]), i + 2
    return yaml.safe_dump(values)


def damage_bytes(case: Case, data: bytes, path: Path) -> bytes | None:
    """The damaged content of `path` (None: delete it)."""
    d = case.damage
    if d == "missing":
        return None
    if d == "empty":
        return b""
    if d == "trunc-8":
        return data[:8]
    if d == "trunc-half":
        return data[: len(data) // 2]
    if d == "trunc-end":
        return data.rstrip()[:-1]
    if d == "random":
        rng = random.Random(case.id)
        return bytes([0xFF]) + rng.randbytes(max(len(data), 64) - 1)  # 0xFF: never valid UTF-8
    if d == "wrong-type":
        return b"- a list\n- not a mapping\n" if path.suffix == ".yaml" else (
            b'"a string, not an object"\n' if case.input in ("data", "text") else b"[1, 2, 3]\n")
    if d == "wrong-value":
        if case.input == "yaml":
            return data + f"{YAML_WRONG_VALUE[case.verb]}: not-a-valid-value\n".encode()  # the last one counts
        obj = json.loads(data)
        WRONG_VALUE[case.input](obj)
        return json.dumps(obj).encode()
    if d == "wrong-shape":
        return _wrong_shape(data)
    raise AssertionError(d)


def _wrong_shape(data: bytes) -> bytes:
    """The same safetensors file with one 2-D tensor one column wider (a consistent file, a wrong shape)."""
    import torch
    from safetensors.torch import load, save

    tensors = load(data)
    name = next(n for n in sorted(tensors) if tensors[n].dim() == 2 and ("proj" in n or "lora_A" in n))
    t = tensors[name]
    tensors[name] = torch.cat([t, t[:, :1]], dim=1).contiguous()
    return save(tensors)


def snapshot(ws: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(ws)): (p.stat().st_size, p.stat().st_mtime_ns) for p in ws.rglob("*")
            if p.is_file() and p.relative_to(ws).parts[0] not in ("out", "cache")}


def run_in_process(argv: list[str], capsys) -> tuple[int, str]:
    capsys.readouterr()
    try:
        main(argv)
        code = 0
    except SystemExit as e:
        code = int(e.code or 0)
    return code, capsys.readouterr().err


@pytest.fixture(scope="module")
def parser():
    """The CLI's parser, built once: building it (17 verbs' flags) costs more than a case."""
    from lorakit.cli import build_parser

    return build_parser()


@pytest.fixture(autouse=True)
def _no_servers(monkeypatch, ws, parser):
    """A case that got past validation must fail loudly instead of starting a server or a web page."""
    import uvicorn

    def started(*a, **k):
        raise AssertionError("a server was started: the damaged file was not detected")

    monkeypatch.setattr("lorakit.cli.build_parser", lambda: parser)
    monkeypatch.setattr(uvicorn, "run", started)
    monkeypatch.setattr("lorakit.serve.webui.build_demo", started)
    monkeypatch.setenv("LORAKIT_CACHE", str(ws / "cache"))  # GGUF conversions and crash logs would go here
    monkeypatch.delenv("LORAKIT_DEBUG", raising=False)


def test_case_table_is_large():
    print(f"\n{len(CASES)} damaged-file cases over {len({c.verb for c in CASES})} verbs, "
          f"{len({c.input for c in CASES})} inputs, {len({c.damage for c in CASES})} kinds of damage")
    assert len(CASES) >= 200
    assert {c.verb for c in CASES} >= set(MODEL_VERBS) | {"vocab stats", "vocab merge", "vocab train"}


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_damaged_file(case: Case, ws: Path, capsys):
    path = ws / INPUTS[case.input][0]
    if case.input == "yaml":
        path.write_text(yaml_for(case.verb, ws, case))
    original, stat = path.read_bytes(), path.stat()
    damaged = damage_bytes(case, original, path)
    if damaged is None:
        path.unlink()
    else:
        path.write_bytes(damaged)
    try:
        before = snapshot(ws)
        argv = [*case.verb.split(), str(path)] if case.input == "yaml" else \
            [*case.verb.split(), *verb_args(case.verb, ws, case)]
        code, err = run_in_process(argv, capsys)
        assert code == 2, f"exit {code}:\n{err}"
        assert "Traceback" not in err and "error:" in err, err
        lines = [line for line in err[err.index("error:"):].splitlines() if line.strip()]  # after progress bars
        named = str(path) in err or (str(path.parent) in err and path.name in err)
        assert named, f"the error does not name {path}:\n{err}"
        if case.input not in ("data", "text"):  # record errors list a few records on lines of their own
            assert len(lines) == 1, err
        out = ws / "out"
        assert not out.exists() or not any(out.iterdir()), sorted(out.rglob("*"))  # no output, no partial
        cache = ws / "cache"
        assert not cache.exists() or not any(cache.rglob("*")), sorted(cache.rglob("*"))
        assert snapshot(ws) == before  # inputs unchanged, nothing written beside them
        if damaged is not None:
            assert path.read_bytes() == damaged
    finally:
        path.write_bytes(original)
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
        if (ws / "out").exists():
            shutil.rmtree(ws / "out")


@pytest.mark.parametrize("case", [Case("merge", "weights", "trunc-half"), Case("generate", "gguf", "random"),
                                  Case("finetune", "yaml", "wrong-type")], ids=lambda c: c.id)
def test_real_processes(case: Case, ws: Path, tmp_path: Path):
    """The same checks in a real `python -m lorakit` process: exit status 2, one line on stderr."""
    path = ws / INPUTS[case.input][0]
    if case.input == "yaml":
        path.write_text(yaml_for(case.verb, ws, case))
    original, stat = path.read_bytes(), path.stat()
    path.write_bytes(damage_bytes(case, original, path) or b"")
    try:
        argv = [str(path)] if case.input == "yaml" else verb_args(case.verb, ws, case)
        env = dict(os.environ, LORAKIT_CACHE=str(tmp_path / "cache"),
                   PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
        r = subprocess.run([sys.executable, "-m", "lorakit", *case.verb.split(), *argv], env=env,
                           capture_output=True, text=True, timeout=300)
        lines = [line for line in r.stderr.splitlines() if line.strip()]
        assert r.returncode == 2, r.stderr
        assert len(lines) == 1 and lines[0].startswith("error:") and str(path) in lines[0], r.stderr
        assert not (ws / "out").exists()
    finally:
        path.write_bytes(original)
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
