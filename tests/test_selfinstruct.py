"""Unit tests of the self-instruct pieces: reply parsing, validation, de-duplication, writer, prompts."""

from __future__ import annotations

import email.utils
import json
import random
import time

import pytest

from lorakit.errors import ConfigError, DataError, DataErrors, LorakitError
from lorakit.selfinstruct.client import parse_retry_after
from lorakit.selfinstruct.config import SelfInstructConfig
from lorakit.selfinstruct.dedup import DuplicateFilter, lcs_length, rouge_l, tokenize
from lorakit.selfinstruct.parse import normalize_item, parse_reply
from lorakit.selfinstruct.prompts import TASK_TYPES, TOPICS, PromptBuilder, load_seed_tasks, load_topics
from lorakit.selfinstruct.run import task_text, validate_item
from lorakit.selfinstruct.writer import ResumableJsonlWriter

GOOD = {"instruction": "Add the numbers", "input": "2 and 3", "output": "5"}
GOOD2 = {"instruction": "Name a fruit", "input": "", "output": "Apple"}


@pytest.mark.parametrize("text, n_items, malformed, found", [
    (json.dumps([GOOD, GOOD2]), 2, 0, True),
    ("Sure!\n```json\n" + json.dumps([GOOD, GOOD2], indent=2) + "\n```\nAnything else?", 2, 0, True),
    ("```\n" + json.dumps([GOOD]) + "\n```", 1, 0, True),
    ("Here you are [see below]:\n" + json.dumps([GOOD, GOOD2]) + "\nThanks", 2, 0, True),
    (json.dumps({"tasks": [GOOD, GOOD2]}), 2, 0, True),
    (json.dumps(GOOD), 1, 0, True),
    (json.dumps(GOOD) + "\n" + json.dumps(GOOD2), 2, 0, True),
    # broken item (trailing comma), a string, then a good one
    ("[" + json.dumps(GOOD) + ', {"instruction": "x", "output": "y",}, "oops", ' + json.dumps(GOOD2) + "]", 3, 1, True),
    # truncated by max_tokens
    ("[" + json.dumps(GOOD) + ', {"instruction": "Write a po', 1, 1, True),
    ("```json\n[" + json.dumps(GOOD) + ', {"instruction": "Write a po', 1, 1, True),
    ("I cannot do that.", 0, 0, False),
    ("", 0, 0, False),
    (None, 0, 0, False),
    ("Numbers [1, 2, 3] only", 0, 0, False),
])
def test_parse_reply(text, n_items, malformed, found):
    parsed = parse_reply(text)
    assert (len(parsed.items), parsed.malformed, parsed.found) == (n_items, malformed, found)
    if n_items:
        assert parsed.items[0] == GOOD or parsed.items[0] == json.loads(json.dumps(GOOD))


@pytest.mark.parametrize("raw, expect", [
    (GOOD, (GOOD, None)),
    ({"instruction": " Name a fruit ", "output": "Apple\n"}, (GOOD2, None)),
    ({"Instruction": "Name a fruit", "Input": "<noinput>", "Output": "Apple"}, (GOOD2, None)),
    ({"指令": "Name a fruit", "输入": "无", "输出": "Apple"}, (GOOD2, None)),
    ({"instruction": "Name a fruit", "input": None, "output": "Apple"}, (GOOD2, None)),
    ({"instruction": "Name a fruit"}, (None, "missing_field")),
    ({"output": "Apple"}, (None, "missing_field")),
    ({"instruction": "  ", "output": "Apple"}, (None, "missing_field")),
    ({"instruction": "Name a fruit", "output": ""}, (None, "missing_field")),
    ({"instruction": "Name a fruit", "output": ["Apple"]}, (None, "malformed")),
    ({"instruction": "Name a fruit", "input": {"a": 1}, "output": "Apple"}, (None, "malformed")),
    ("just a string", (None, "malformed")),
    (42, (None, "malformed")),
])
def test_validate_item(raw, expect):
    assert validate_item(raw) == expect


def test_normalize_keeps_unknown_keys_and_first_alias():
    assert normalize_item({"instruction": "a", "task": "b", "output": "c", "id": 3}) == {
        "instruction": "a", "output": "c", "id": 3, "input": ""}


def test_tokenize_and_rouge():
    assert tokenize("Write a 诗, about Café-au-lait x2!") == ["write", "a", "诗", "about", "café", "au", "lait", "x2"]
    assert rouge_l("the cat sat on the mat", "The cat, on the mat.") == pytest.approx(2 * 5 / 11)
    assert rouge_l("写一首关于秋天的诗", "写一首关于春天的诗") == pytest.approx(2 * 8 / 18)
    assert rouge_l("", "anything") == 0.0


def _dp_lcs(a, b):
    """Reference: the textbook O(len(a) * len(b)) dynamic programme."""
    table = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i, x in enumerate(a):
        for j, y in enumerate(b):
            table[i + 1][j + 1] = table[i][j] + 1 if x == y else max(table[i][j + 1], table[i + 1][j])
    return table[-1][-1]


def test_bit_parallel_lcs_matches_dp():
    rng = random.Random(0)
    for _ in range(2000):
        a = [rng.randrange(6) for _ in range(rng.randrange(0, 40))]
        b = [rng.randrange(6) for _ in range(rng.randrange(0, 40))]
        assert lcs_length(a, b) == _dp_lcs(a, b)
    long_a = [rng.randrange(50) for _ in range(300)]
    long_b = [rng.randrange(50) for _ in range(250)]
    assert lcs_length(long_a, long_b) == _dp_lcs(long_a, long_b)


@pytest.mark.parametrize("threshold", [0.5, 0.7, 0.9, 1.0])
def test_duplicate_filter_matches_naive_all_pairs(threshold):
    """Keep/drop decisions equal a brute-force comparison with every kept text (DP ROUGE-L)."""
    rng = random.Random(int(threshold * 10))
    vocab = [f"w{i}" for i in range(40)] + list("天地人和山水风")
    texts: list[str] = []
    for _ in range(300):
        if texts and rng.random() < 0.5:  # a mutated copy of an earlier text
            words = rng.choice(texts).split()
            for _ in range(rng.randrange(0, 4)):
                op = rng.randrange(3)
                if op == 0 and words:
                    words.pop(rng.randrange(len(words)))
                elif op == 1:
                    words.insert(rng.randrange(len(words) + 1), rng.choice(vocab))
                elif words:
                    words[rng.randrange(len(words))] = rng.choice(vocab)
            texts.append(" ".join(words).upper() if rng.random() < 0.1 else " ".join(words))
        else:
            texts.append(" ".join(rng.choice(vocab) for _ in range(rng.randrange(1, 15))))
    texts += ["!!!", "!!!", "?"]  # no tokens: only exact text duplicates
    filt = DuplicateFilter(threshold)
    kept: list[list[str]] = []
    kept_raw: set[str] = set()
    decisions = {"duplicate": 0, "similar": 0, None: 0}
    for text in texts:
        toks = tokenize(text)
        if not toks:
            expected = "duplicate" if text.strip() in kept_raw else None
        elif any(toks == k for k in kept):
            expected = "duplicate"
        elif threshold < 1.0 and any(2 * _dp_lcs(toks, k) / (len(toks) + len(k)) > threshold for k in kept):
            expected = "similar"
        else:
            expected = None
        got = filt.check(text)
        assert got == expected, text
        decisions[got] += 1
        if got is None:
            filt.add(text)
            if toks:
                kept.append(toks)
            else:
                kept_raw.add(text.strip())
    assert decisions[None] > 20 and decisions["duplicate"] > 5
    assert (decisions["similar"] > 5) == (threshold < 1.0)
    assert len(filt) == len(kept)


def test_task_text_separates_same_instruction_different_input():
    filt = DuplicateFilter(0.7)
    a = {"instruction": "Translate the following sentence into French", "input": "I like green tea with milk"}
    b = {"instruction": "Translate the following sentence into French",
         "input": "The train to Lyon leaves at noon tomorrow"}
    filt.add(task_text(a))
    assert filt.check(task_text(b)) is None
    assert filt.check(task_text(dict(a, output="x"))) == "duplicate"


def test_writer_repairs_partial_last_line(tmp_path):
    path = tmp_path / "out.jsonl"
    good = (json.dumps(GOOD) + "\n" + json.dumps(GOOD2) + "\n").encode()
    path.write_bytes(good + b'{"instruction": "hal')
    with ResumableJsonlWriter(path) as w:
        assert w.open() == [GOOD, GOOD2] and w.repaired_bytes == len(b'{"instruction": "hal')
        assert path.read_bytes() == good
        w.append({"instruction": "新的", "input": "", "output": "好"})
    assert path.read_bytes() == good + '{"instruction": "新的", "input": "", "output": "好"}\n'.encode()
    # a whole record whose newline was lost is kept and completed
    path.write_bytes(good + json.dumps(GOOD).encode())
    with ResumableJsonlWriter(path) as w:
        assert len(w.open()) == 3 and w.repaired_bytes == 0
    assert path.read_bytes() == good + json.dumps(GOOD).encode() + b"\n"
    # a new file is created (with its folder)
    fresh = tmp_path / "sub" / "new.jsonl"
    with ResumableJsonlWriter(fresh) as w:
        assert w.open() == []
        w.append(GOOD)
    assert fresh.read_text() == json.dumps(GOOD) + "\n"


def test_writer_refuses_invalid_lines_and_a_second_writer(tmp_path):
    path = tmp_path / "out.jsonl"
    path.write_text(json.dumps(GOOD) + "\nnot json\n" + json.dumps({"instruction": "x"}) + "\n")
    with pytest.raises(LorakitError, match=r"2 invalid line\(s\)") as info:
        ResumableJsonlWriter(path).open()
    assert f"{path}:2" in str(info.value) and f"{path}:3: field 'output'" in str(info.value)
    ok = tmp_path / "ok.jsonl"
    with ResumableJsonlWriter(ok) as first:
        first.open()
        with pytest.raises(LorakitError, match="another process"):
            ResumableJsonlWriter(ok).open()
    with ResumableJsonlWriter(ok) as again:  # released on close
        assert again.open() == []


def test_prompts_builtin_and_files(tmp_path):
    for lang in ("en", "zh"):
        assert len(TOPICS[lang]) >= 40 and len(TASK_TYPES[lang]) >= 20
        assert len(set(TOPICS[lang])) == len(TOPICS[lang])
    en = PromptBuilder("en", 7, seed=1)
    prompts = [en.build() for _ in range(5)]
    assert all("7" in p and "JSON array" in p and "instruction" in p for p in prompts)
    assert len(set(prompts)) > 1  # topics and task types are sampled per request
    assert PromptBuilder("en", 7, seed=1).build() == prompts[0]  # reproducible with a seed
    zh = PromptBuilder("zh", 5, seed=2).build()
    assert "5" in zh and "JSON" in zh and any(t in zh for t in TOPICS["zh"])
    topics = tmp_path / "topics.txt"
    topics.write_text("quantum knitting\n\n  underwater chess  \n")
    assert load_topics(topics) == ["quantum knitting", "underwater chess"]
    custom = PromptBuilder("en", 3, topics=load_topics(topics), seed=0).build()
    assert "quantum knitting" in custom and "underwater chess" in custom
    (tmp_path / "empty.txt").write_text("\n")
    with pytest.raises(DataError, match="no topics"):
        load_topics(tmp_path / "empty.txt")


def test_seed_tasks(tmp_path):
    seeds = tmp_path / "seeds.jsonl"
    seeds.write_text(json.dumps(GOOD) + "\n" + json.dumps(
        {"id": "seed_task_1", "instruction": "Is this review positive?", "is_classification": True,
         "instances": [{"input": "Great film!", "output": "Yes"}]}) + "\n")
    tasks = load_seed_tasks(seeds)
    assert [t.as_dict() for t in tasks] == [GOOD, {"instruction": "Is this review positive?",
                                                   "input": "Great film!", "output": "Yes"}]
    prompt = PromptBuilder("en", 4, seed_tasks=tasks, seed=0).build()
    assert "Is this review positive?" in prompt and "Add the numbers" in prompt
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(GOOD) + "\n" + json.dumps({"instruction": "x", "instances": []}) + "\n{oops\n")
    with pytest.raises(DataErrors) as info:
        load_seed_tasks(bad)
    assert f"{bad}:2: field 'instances'" in str(info.value) and f"{bad}:3:" in str(info.value)


def test_parse_retry_after():
    assert parse_retry_after({"retry-after": "2"}) == 2.0
    assert parse_retry_after({"retry-after": "0.5"}) == 0.5
    assert parse_retry_after({"retry-after-ms": "250", "retry-after": "9"}) == 0.25
    date = email.utils.formatdate(time.time() + 30, usegmt=True)
    assert 27 <= parse_retry_after({"retry-after": date}) <= 31
    assert parse_retry_after({"retry-after": "soon"}) is None
    assert parse_retry_after({}) is None and parse_retry_after(None) is None


def test_config_checks_and_budget():
    cfg = SelfInstructConfig(api_base="http://127.0.0.1:1/v1", model="m", num_examples=95, output="o.jsonl")
    cfg.validate()
    assert cfg.request_budget() == 5 * 12  # ceil(95 / 8) requests at the default 8 per request
    assert SelfInstructConfig(api_base="http://h/v1", model="m", num_examples=3, output="o",
                              max_requests=7).request_budget() == 7
    assert SelfInstructConfig(api_base="http://h/v1", model="m", num_examples=3, output="o").request_budget() == 20
    with pytest.raises(ConfigError, match="--concurrency"):
        SelfInstructConfig(api_base="http://h/v1", model="m", num_examples=3, output="o", concurrency=0).validate()
