"""The family registry, table-driven: a tiny random model per family (built as transformers builds
them, SmolLM2's tokenizer) through the name layout, merge, GGUF export (read back by gguf and run by
llama.cpp) and the other verbs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lorakit.errors import MismatchError
from lorakit.models.families import BY_NAME, FAMILIES, family_of_config, family_of_dir
from tiny_models import FAMILY_CASES, make_tiny_family

CASE_FAMILY = {"llama2": "llama", "llama3": "llama", "mistral": "mistral", "qwen2": "qwen2", "qwen3": "qwen3",
               "gemma3": "gemma3"}


@pytest.fixture(scope="session")
def tiny_family(tmp_path_factory):
    """case -> folder of a tiny random model of that family (built once per session, on first use)."""
    root = tmp_path_factory.mktemp("families")
    built: dict[str, Path] = {}

    def get(case: str) -> Path:
        if case not in built:
            built[case] = make_tiny_family(root / case, case, root / "tokenizer", seed=FAMILY_CASES.index(case))
        return built[case]

    return get


# ------------------------------------------------------------------------------------------- registry


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_gguf_names_are_llama_cpps(family):
    """Every GGUF name in the registry is the one gguf-py's own HF -> GGUF map gives for that architecture."""
    import gguf

    arch = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == family.gguf_arch)
    name_map = gguf.get_tensor_name_map(arch, 4)
    for rule in family.rules:
        hf = rule.hf.format(3)
        suffix = "." + hf.rsplit(".", 1)[1]
        expected = name_map.get_name(hf, try_suffixes=(".weight", ".bias"))
        assert expected is not None, f"gguf-py has no {family.gguf_arch} tensor for {hf}"
        assert rule.gguf.format(3) == expected or rule.gguf.format(3) == expected + suffix, (hf, rule.gguf)


@pytest.mark.parametrize("case", FAMILY_CASES)
def test_tiny_model_tensors_are_exactly_the_family_layout(tiny_family, case):
    from lorakit.merge.safetensors_io import SafetensorsFolder

    folder = tiny_family(case)
    family = family_of_dir(folder)
    assert family.name == CASE_FAMILY[case]
    names = SafetensorsFolder(folder).names
    family.check_names(names, "tiny")  # every tensor known
    used = {family.map_hf(n).rule for n in names}
    config = json.loads((folder / "config.json").read_text())
    unused = {r.hf for r in family.rules if r not in used}
    assert unused <= ({"lm_head.weight"} if config.get("tie_word_embeddings") else set())
    # the LLaMA layout alone refuses the extra tensors (biases, q/k norms, Gemma's norms)
    extra = BY_NAME["llama"].unknown_names(names)
    assert bool(extra) == (family.name in ("qwen2", "qwen3", "gemma3"))


def test_unknown_family_is_refused_in_one_line():
    with pytest.raises(MismatchError, match="not a supported model family"):
        family_of_config({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}, "x")


def test_permutation_only_for_llama_layout_families():
    assert {f.name for f in FAMILIES if f.permute_qk} == {"llama", "mistral"}
    assert {f.name for f in FAMILIES if f.meta_pth} == {"llama", "mistral"}
