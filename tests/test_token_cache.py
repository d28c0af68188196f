"""The pre-training token cache: the same tokens and blocks as the in-memory tokenization (read_text_documents
+ tokenize_documents + make_blocks), read again without tokenizing, rebuilt when an input changes, bad
records reported by file and line as before, and exact resume unaffected."""

from __future__ import annotations

import json
import logging
import shutil

import numpy as np
import pytest

from lorakit.data import read_text_documents
from lorakit.data import segments as segments_module
from lorakit.data.blocks import TokenBlocks
from lorakit.data.token_cache import load_or_build
from lorakit.errors import DataError, DataErrors
from lorakit.models import load_tokenizer
from lorakit.train.finetune import split_validation
from lorakit.train.pretrain import make_blocks, tokenize_documents


@pytest.fixture(scope="module")
def corpus(data_dir, tmp_path_factory):
    """A folder with a .txt (blank lines, CRLF, non-ASCII) and a .jsonl of `text` records: ~60 KB."""
    root = tmp_path_factory.mktemp("corpus") / "docs"
    root.mkdir()
    wiki = (data_dir / "wiki_demo.txt").read_text(encoding="utf-8").splitlines()[:150]
    (root / "a.txt").write_text("\r\n".join(wiki[:100]) + "\n\n  \nlast line without newline", encoding="utf-8")
    zh = json.loads((data_dir / "alpaca_zh_demo.json").read_text())[:60]
    (root / "b.jsonl").write_text("\n".join(json.dumps({"text": r["output"]}, ensure_ascii=False) for r in zh)
                                  + "\n\n", encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    return load_tokenizer(tiny_model_dir, add_pad_token=False)


def _build(corpus, tok, tiny_model_dir, cache_dir, workers=2):
    return load_or_build(str(corpus), tok, tiny_model_dir, cache_dir, workers, show_progress=False)


def test_same_tokens_and_blocks_as_in_memory(corpus, tok, tiny_model_dir, tmp_path):
    expected = tokenize_documents(read_text_documents(corpus), tok, show_progress=False)
    segments = segments_module.plan_segments(segments_module.text_files(corpus), 2)
    assert len(segments) >= 8  # the parallel path is exercised, with cuts inside both files
    for workers in (1, 2):
        cache = _build(corpus, tok, tiny_model_dir, tmp_path / f"w{workers}", workers)
        assert isinstance(cache.tokens, np.memmap) and cache.tokens.dtype == np.uint16  # 16000-token vocabulary
        assert cache.tokens.tolist() == list(expected)
    blocks, reference = TokenBlocks(cache.tokens, 64), make_blocks(expected, 64)
    assert len(blocks) == len(reference) > 100
    for i in (0, 1, len(blocks) // 2, len(blocks) - 1):
        assert np.shares_memory(blocks.view(i), cache.tokens)  # a view into the memory map, not a copy
        item = blocks[i]
        assert item["input_ids"].tolist() == item["labels"].tolist() == reference[i]["input_ids"]
        assert item["attention_mask"].tolist() == reference[i]["attention_mask"]
    # the validation split holds out the same blocks, in the same order, as finetune's split_validation
    train, val = blocks.split(5, seed=3)
    ref_train, ref_val = split_validation(reference, 5, 3)
    assert [val[i]["input_ids"].tolist() for i in range(5)] == [b["input_ids"] for b in ref_val]
    assert len(train) == len(ref_train) and train[7]["input_ids"].tolist() == ref_train[7]["input_ids"]


def test_hit_reads_without_tokenizing_and_changes_rebuild(corpus, tok, tiny_model_dir, tmp_path, monkeypatch,
                                                          caplog):
    data = tmp_path / "docs"
    shutil.copytree(corpus, data)
    cache_dir = tmp_path / "cache"
    with caplog.at_level(logging.INFO, logger="lorakit"):
        first = _build(data, tok, tiny_model_dir, cache_dir)
    assert "token cache miss" in caplog.text and "tokens/s" in caplog.text
    calls = []
    real = segments_module.tokenize_segments

    def counting(*args, **kw):
        calls.append(1)
        return real(*args, **kw)

    monkeypatch.setattr("lorakit.data.token_cache.tokenize_segments", counting)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="lorakit"):
        again = _build(data, tok, tiny_model_dir, cache_dir)
    assert not calls and "token cache hit" in caplog.text and "nothing to tokenize" in caplog.text
    assert again.folder == first.folder and again.tokens.tolist() == first.tokens.tolist()

    # a changed data file (same size: only its content and time differ) is tokenized again
    text = (data / "a.txt").read_text(encoding="utf-8")
    (data / "a.txt").write_text(text.replace("the", "teh", 1), encoding="utf-8")
    changed = _build(data, tok, tiny_model_dir, cache_dir)
    assert len(calls) == 1 and changed.folder != first.folder
    # another tokenizer (ChatML tokens added, EOS <|im_end|>) is tokenized again
    from tiny_models import make_tiny_llama

    chat_dir = make_tiny_llama(tmp_path / "chat", chat=True)
    chat_tok = load_tokenizer(chat_dir, add_pad_token=False)
    chat = _build(data, chat_tok, chat_dir, cache_dir)
    assert len(calls) == 2 and chat.folder not in (first.folder, changed.folder)
    assert chat.tokens[-1] == chat_tok.eos_token_id != tok.eos_token_id
    # an added file too
    (data / "c.txt").write_text("one more document\n", encoding="utf-8")
    _build(data, tok, tiny_model_dir, cache_dir)
    assert len(calls) == 3
    assert not [p for p in cache_dir.iterdir() if p.name.startswith(".")]  # no temporary folders left


def test_bad_records_are_reported_by_file_and_line_as_before(tmp_path, tok, tiny_model_dir):
    good = json.dumps({"text": "a document of some length " * 20})
    lines = [good] * 300
    lines[40], lines[250] = '{"text": 5}', "{broken"
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    assert len(segments_module.plan_segments([path], 2)) > 4  # the errors sit in different segments
    with pytest.raises(DataErrors) as before:
        read_text_documents(path)
    with pytest.raises(DataErrors) as now:
        _build(path, tok, tiny_model_dir, tmp_path / "cache")
    assert str(now.value) == str(before.value) and ":41:" in str(now.value) and ":251:" in str(now.value)
    txt = tmp_path / "bad.txt"
    txt.write_bytes(b"fine line\n" * 2000 + b"caf\xe9\n")
    with pytest.raises(DataError) as before_txt:
        read_text_documents(txt)
    with pytest.raises(DataError) as now_txt:
        _build(txt, tok, tiny_model_dir, tmp_path / "cache")
    assert str(now_txt.value) == str(before_txt.value) and ":2001:" in str(now_txt.value)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    with pytest.raises(DataError, match="no non-empty documents"):
        _build(empty, tok, tiny_model_dir, tmp_path / "cache")
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())


def test_pretrain_reuses_the_cache_and_resumes_exactly(corpus, tiny_model_dir, tmp_path, caplog):
    """An uninterrupted 4-step run and a run resumed from its step-2 checkpoint end with the same adapter;
    the second run reads the token cache the first one built (another block size: the same tokens)."""
    from safetensors.torch import load_file

    from lorakit.train.pretrain import pretrain
    from lorakit.train.pretrain_config import PretrainConfig

    def cfg(out, **kw):
        options = dict(base_model=str(tiny_model_dir), data_path=str(corpus), output_dir=str(out), block_size=64,
                       batch_size=4, micro_batch_size=2, max_steps=4, warmup_steps=0, learning_rate=1e-2,
                       precision="fp32", modules_to_save=[], logging_steps=1, save_steps=2, lora_dropout=0.0,
                       data_cache_dir=str(tmp_path / "cache"), preprocessing_num_workers=2)
        return PretrainConfig(**{**options, **kw})

    whole = tmp_path / "whole"
    pretrain(cfg(whole))
    resumed = tmp_path / "resumed"
    shutil.copytree(whole / "checkpoint-2", resumed / "checkpoint-2")
    with caplog.at_level(logging.INFO, logger="lorakit"):
        pretrain(cfg(resumed, resume_from_checkpoint="last"))
    assert "token cache hit" in caplog.text
    a, b = load_file(whole / "adapter_model.safetensors"), load_file(resumed / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(b[k].numpy(), a[k].numpy(), rtol=1e-5, atol=1e-7)
    losses = lambda out: [r["loss"] for r in map(json.loads, (out / "train_log.jsonl").read_text().splitlines())  # noqa: E731
                          if "loss" in r]
    steps = [r["step"] for r in map(json.loads, (resumed / "train_log.jsonl").read_text().splitlines()) if "loss" in r]
    assert steps == [3, 4]  # it did resume: steps 1-2 came from the checkpoint
    assert losses(resumed) == pytest.approx(losses(whole)[-2:], rel=1e-6)
    assert len(list((tmp_path / "cache").iterdir())) == 1


def test_an_empty_folder_is_one_clear_error(tmp_path, tok, tiny_model_dir):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no non-empty documents"):
        _build(tmp_path / "empty", tok, tiny_model_dir, tmp_path / "cache")
