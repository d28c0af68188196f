"""Shared fixtures: tiny random LLaMA models (built here, a few MB) and paths to the shared data."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from tiny_models import CHATML_TEMPLATE, SHARED_DATA, make_tiny_llama  # noqa: E402

__all__ = ["CHATML_TEMPLATE", "ROOT", "SHARED_DATA", "make_tiny_llama"]


@pytest.fixture(scope="session")
def shared_data() -> Path:
    assert SHARED_DATA.is_dir(), f"shared data not found at {SHARED_DATA} (set LORAKIT_SHARED_DATA)"
    return SHARED_DATA


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A 2-layer GQA LLaMA (hidden 64) with the shared LLaMA-style 16k SentencePiece tokenizer."""
    return make_tiny_llama(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def tiny_alpaca_json(shared_data, tmp_path_factory) -> Path:
    """The first 64 shared English alpaca examples, as a .json array."""
    import json

    records = json.loads((shared_data / "alpaca_en_demo.json").read_text())[:64]
    path = tmp_path_factory.mktemp("data") / "alpaca64.json"
    path.write_text(json.dumps(records, ensure_ascii=False, indent=1))
    return path
