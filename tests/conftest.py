"""Shared fixtures: tiny random LLaMA models (built here, a few MB) and the path to the data shipped in data/."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from tiny_models import CHATML_TEMPLATE, DATA_DIR, FAMILY_CASES, make_tiny_family, make_tiny_llama  # noqa: E402

__all__ = ["CHATML_TEMPLATE", "ROOT", "DATA_DIR", "make_tiny_llama"]


@pytest.fixture(scope="session")
def data_dir() -> Path:
    assert DATA_DIR.is_dir(), f"the repository's data folder is missing: {DATA_DIR}"
    return DATA_DIR


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A 2-layer GQA LLaMA (hidden 64) with the shared LLaMA-style 16k SentencePiece tokenizer."""
    return make_tiny_llama(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def tiny_alpaca_json(data_dir, tmp_path_factory) -> Path:
    """The first 64 shared English alpaca examples, as a .json array."""
    import json

    records = json.loads((data_dir / "alpaca_en_demo.json").read_text())[:64]
    path = tmp_path_factory.mktemp("data") / "alpaca64.json"
    path.write_text(json.dumps(records, ensure_ascii=False, indent=1))
    return path


@pytest.fixture(scope="session")
def tiny_family(tmp_path_factory):
    """case -> folder of a tiny random model of that family (tiny_models.FAMILY_CASES; built once per
    session, on first use; tests must not modify it)."""
    root = tmp_path_factory.mktemp("families")
    built: dict[str, Path] = {}

    def get(case: str) -> Path:
        if case not in built:
            built[case] = make_tiny_family(root / case, case, root / "tokenizer", seed=FAMILY_CASES.index(case))
        return built[case]

    return get


def pytest_terminal_summary(terminalreporter):
    """Print the size of the damaged-file fuzz suite (tests/test_bad_files.py) when it ran."""
    reports = [r for key in ("passed", "failed") for r in terminalreporter.stats.get(key, [])
               if "test_bad_files.py::test_damaged_file[" in getattr(r, "nodeid", "") and r.when == "call"]
    if reports:
        failed = sum(r.failed for r in reports)
        terminalreporter.write_line(f"damaged-file fuzz suite: {len(reports)} cases, {failed} failed")
