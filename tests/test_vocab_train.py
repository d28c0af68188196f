"""vocab train: LLaMA-style SentencePiece settings, sampling, atomic output, clear errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import sentencepiece as spm

from lorakit.vocab.config import VocabTrainConfig
from lorakit.vocab.merge import load_proto
from lorakit.vocab.train import sample_sentences, train_sentencepiece


@pytest.fixture(scope="module")
def zh_model(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("spm") / "zh.model"
    cfg = VocabTrainConfig(input=[str(data_dir / "alpaca_zh_demo.json")], vocab_size=3000, output=str(out),
                           max_sentences=1500)
    summary = train_sentencepiece(cfg, show_progress=False)
    return out, summary


def test_llama_style_settings(zh_model):
    out, summary = zh_model
    proto = load_proto(out)
    spec, norm = proto.trainer_spec, proto.normalizer_spec
    assert spec.model_type == 2 and spec.byte_fallback and spec.split_digits  # BPE
    assert (spec.unk_id, spec.bos_id, spec.eos_id, spec.pad_id) == (0, 1, 2, -1)
    assert norm.name == "identity" and norm.add_dummy_prefix and not norm.remove_extra_whitespaces
    assert len(proto.pieces) == 3000 == summary["pieces"]
    assert [p.piece for p in proto.pieces[:3]] == ["<unk>", "<s>", "</s>"]
    assert sum(p.type == 6 for p in proto.pieces) == 256  # byte pieces
    assert summary["sentences"] == 1500 < summary["lines_seen"]
    sp = spm.SentencePieceProcessor(model_file=str(out))
    assert [sp.id_to_piece(i) for i in sp.encode("12345")][-5:] == list("12345")  # split digits
    for text in ("中文分词测试：你好，世界！", "mixed 中英文 text 😀 with an emoji"):
        assert sp.decode(sp.encode(text)) == text
    assert sp.unk_id() not in sp.encode("😀")  # byte fallback, no <unk>
    assert out.with_suffix(".vocab").read_text().splitlines()[3].split("\t")[0] == "<0x00>"
    assert not list(out.parent.glob(".*tmp"))  # written through a temp file, renamed


def test_sample_sentences_is_uniform_and_reproducible():
    lines = [f"line {i}" for i in range(1000)]
    a, seen = sample_sentences(iter(lines), 100, seed=1)
    b, _ = sample_sentences(iter(lines), 100, seed=1)
    c, _ = sample_sentences(iter(lines), 100, seed=2)
    assert seen == 1000 and len(a) == 100 and a == b and a != c
    assert a == sorted(a, key=lambda s: int(s.split()[1]))  # input order kept
    assert sample_sentences(iter(lines), 0, 1) == (lines, 1000)
    # every line is as likely to be kept: the mean kept index is near the middle
    kept = [int(s.split()[1]) for seed in range(20) for s in sample_sentences(iter(lines), 100, seed)[0]]
    assert 450 < sum(kept) / len(kept) < 550


def test_cli_errors_are_clear(data_dir, tmp_path):
    def run(*args):
        return subprocess.run([sys.executable, "-m", "lorakit", "vocab", "train", *args], capture_output=True,
                              text=True, timeout=120)

    text = tmp_path / "tiny.txt"
    text.write_text("just a few words\nand a second line\n")
    r = run("--input", str(text), "--vocab-size", "5000", "--output", str(tmp_path / "t.model"))
    assert r.returncode == 2 and "Vocabulary size" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "t.model").exists()
    r = run("--input", str(text), "--vocab-size", "500", "--output", str(tmp_path / "t.bin"))
    assert r.returncode == 2 and "must end with .model" in r.stderr
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "fine"}) + "\n" + json.dumps({"txt": "oops"}) + "\n")
    r = run("--input", str(bad), "--vocab-size", "500", "--output", str(tmp_path / "b.model"))
    assert r.returncode == 2 and f"{bad}:2" in r.stderr


def test_long_lines_are_split_not_dropped():
    import random

    from lorakit.vocab.train import split_long_line

    rng = random.Random(0)
    for _ in range(300):
        words = ["".join(rng.choice("abc中文é") for _ in range(rng.randint(1, 30)))
                 + rng.choice(["", " ", ". ", "。", "! "]) for _ in range(rng.randint(1, 200))]
        line, limit = "".join(words), rng.randint(8, 300)
        chunks = split_long_line(line, limit)
        assert all(0 < len(c.encode("utf-8")) <= limit for c in chunks)
        assert "".join(chunks).replace(" ", "") == line.replace(" ", "")  # only spaces at cuts are lost
    text = "First sentence. Second one! 第三句。第四句？" * 3
    assert split_long_line(text, 40)[:2] == ["First sentence. Second one! 第三句。",
                                             "第四句？First sentence. Second one!"]
    assert split_long_line("short", 40) == ["short"]
