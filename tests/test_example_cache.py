"""finetune's example cache (data/example_cache.py) and streaming (data/streaming.py): the same features as
the in-memory path (read_examples + tokenize_examples + split_validation) from JSON, JSONL and parquet, with
1 and 2 workers; a second run tokenizes nothing; each option that changes tokens re-tokenizes; bad records
are reported by file and line (parquet: row) as before; streaming yields the cached examples in order."""

from __future__ import annotations

import json
import logging
import os
import shutil
from itertools import islice

import numpy as np
import pytest

from lorakit.data import example_cache as cache_module
from lorakit.data import read_examples, read_text_documents, tokenize_examples
from lorakit.data.blocks import TokenBlocks
from lorakit.data.example_cache import ExampleCache, load_or_build
from lorakit.data.streaming import StreamedBlocks, StreamedExamples
from lorakit.errors import DataError, DataErrors
from lorakit.models import ensure_pad_token, load_tokenizer
from lorakit.prompts import get_prompter
from lorakit.train.finetune import split_validation


@pytest.fixture(scope="module")
def records(data_dir):
    """80 alpaca records and 20 multi-turn chats (chat records need --prompt-template chat)."""
    return json.loads((data_dir / "alpaca_en_demo.json").read_text())[:80]


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    t = load_tokenizer(tiny_model_dir, add_pad_token=False)
    ensure_pad_token(t)
    return t


def write(folder, records, kind):
    folder.mkdir(parents=True, exist_ok=True)
    if kind == "json":
        (folder / "d.json").write_text(json.dumps(records, indent=1))
    elif kind == "jsonl":
        (folder / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(records), folder / "d.parquet", row_group_size=16)
    return next(folder.iterdir())


def build(path, tok, model_dir, cache_dir, template="alpaca", workers=2, **kw):
    prompter = get_prompter(template, tok)
    return load_or_build(str(path), tok, model_dir, prompter, cache_dir, workers, show_progress=False, **kw)


def features(cache):
    return [cache[i] for i in range(len(cache))]


@pytest.mark.parametrize("kind", ["json", "jsonl", "parquet"])
def test_same_features_as_in_memory(kind, records, tok, tiny_model_dir, tmp_path):
    path = write(tmp_path / "data", records, kind)
    reference_records = json.dumps(records)
    (tmp_path / "ref.json").write_text(reference_records)
    examples, _ = read_examples(tmp_path / "ref.json")
    for train_on_inputs in (True, False):
        expected = tokenize_examples(examples, get_prompter("alpaca", tok), tok, 64, train_on_inputs)
        assert train_on_inputs or len(expected) < len(examples)  # responses cut off entirely: dropped as before
        for workers in (1, 2):
            cache = build(path, tok, tiny_model_dir, tmp_path / f"c{workers}", workers=workers, cutoff_len=64,
                          train_on_inputs=train_on_inputs)
            assert isinstance(cache.ids, np.memmap) and cache.ids.dtype == np.uint16
            assert features(cache) == expected
            assert cache.lengths.tolist() == [len(f["input_ids"]) for f in expected]
    train, val = cache.split(7, seed=5)
    ref_train, ref_val = split_validation(expected, 7, 5)
    assert features(val) == ref_val and features(train) == ref_train


def test_chat_template_and_workers_agree(records, tmp_path):
    from tiny_models import make_tiny_llama

    chat_dir = make_tiny_llama(tmp_path / "chat", chat=True)
    tok = load_tokenizer(chat_dir, add_pad_token=False)
    chats = [{"messages": [{"role": "user", "content": r["instruction"]}, {"role": "assistant", "content": "ok"},
                           {"role": "user", "content": "and?"}, {"role": "assistant", "content": r["output"]}]}
             for r in records[:30]]
    path = write(tmp_path / "data", chats, "jsonl")
    examples, _ = read_examples(path)
    expected = tokenize_examples(examples, get_prompter("chat", tok), tok, 128, False)
    for workers in (1, 2):
        cache = build(path, tok, chat_dir, tmp_path / f"c{workers}", "chat", workers, cutoff_len=128,
                      train_on_inputs=False)
        assert features(cache) == expected


def test_hit_tokenizes_nothing_and_each_key_part_rebuilds(records, tok, tiny_model_dir, tmp_path, monkeypatch,
                                                           caplog):
    path = write(tmp_path / "data", records, "json")
    cache_dir = tmp_path / "cache"
    with caplog.at_level(logging.INFO, logger="lorakit"):
        first = build(path, tok, tiny_model_dir, cache_dir)
    assert "token cache miss" in caplog.text and "examples/s" in caplog.text
    calls = []
    real = cache_module.tokenize_in_workers
    monkeypatch.setattr(cache_module, "tokenize_in_workers", lambda *a, **k: calls.append(1) or real(*a, **k))
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="lorakit"):
        again = build(path, tok, tiny_model_dir, cache_dir, workers=1)  # the worker count is not in the key
    assert not calls and "token cache hit" in caplog.text and "nothing to tokenize" in caplog.text
    assert again.folder == first.folder and features(again) == features(first)
    assert again.split(5, 1)[1] is not None and not calls  # the split picks from the cache: no rebuild

    folders = {first.folder}

    def rebuilt(cache):
        assert cache.folder not in folders and len(calls) == len(folders)
        folders.add(cache.folder)

    rebuilt(build(path, tok, tiny_model_dir, cache_dir, template="alpaca_short"))
    rebuilt(build(path, tok, tiny_model_dir, cache_dir, cutoff_len=100))
    rebuilt(build(path, tok, tiny_model_dir, cache_dir, train_on_inputs=False))
    rebuilt(build(path, tok, tiny_model_dir, cache_dir, add_eos_token=False))
    rebuilt(build(path, tok, tiny_model_dir, cache_dir, skip_invalid=True))
    template = tmp_path / "mine.json"  # a template file: its content is in the key, not only its name
    template.write_text(json.dumps({"prompt_input": "{instruction} {input}\n", "prompt_no_input": "{instruction}\n",
                                    "response_split": "\n"}))
    rebuilt(build(path, tok, tiny_model_dir, cache_dir, template=str(template)))
    template.write_text(json.dumps({"prompt_input": "Q: {instruction} {input}\nA:", "prompt_no_input":
                                    "Q: {instruction}\nA:", "response_split": "A:"}))
    rebuilt(build(path, tok, tiny_model_dir, cache_dir, template=str(template)))
    from tiny_models import make_tiny_llama

    chat_dir = make_tiny_llama(tmp_path / "chat", chat=True)  # another tokenizer (ChatML tokens, EOS <|im_end|>)
    rebuilt(build(path, load_tokenizer(chat_dir, add_pad_token=False), chat_dir, cache_dir))
    stat = path.stat()
    path.write_text(path.read_text().replace("the", "teh", 1))  # same size, other content and time
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # even with the old mtime (content hash)
    rebuilt(build(path, tok, tiny_model_dir, cache_dir))
    write(tmp_path / "data", records[:3], "jsonl")  # a second file in the folder
    rebuilt(build(tmp_path / "data", tok, tiny_model_dir, cache_dir))
    assert not [p for p in cache_dir.iterdir() if p.name.startswith(".")]  # no temporary folders left


def test_bad_records_are_reported_as_before(records, tok, tiny_model_dir, tmp_path, caplog):
    bad = [dict(r) for r in records]
    bad[10]["output"], bad[70] = "", {"instruction": "x", "output": 5}
    for kind in ("json", "jsonl"):
        path = write(tmp_path / kind, bad, kind)
        with pytest.raises(DataErrors) as before:
            read_examples(path)
        with pytest.raises(DataErrors) as now:
            build(path, tok, tiny_model_dir, tmp_path / "cache")
        assert str(now.value) == str(before.value)
    assert not (tmp_path / "cache").exists()  # nothing half-written
    bad[70] = {**records[70], "instruction": None}  # a parquet column has one type: a null instead
    path = write(tmp_path / "parquet", bad, "parquet")
    with pytest.raises(DataErrors) as now:
        build(path, tok, tiny_model_dir, tmp_path / "cache")
    assert str(now.value).splitlines()[1:3] == [f"{path} row 11: field 'output': must not be empty",
                                                f"{path} row 71: field 'instruction': must be a string, got NoneType"]
    with pytest.raises(DataErrors) as before:
        read_examples(path)  # eval and preview read parquet too, with the same errors
    assert str(before.value) == str(now.value)
    with caplog.at_level(logging.WARNING, logger="lorakit"):
        cache = build(path, tok, tiny_model_dir, tmp_path / "cache", skip_invalid=True)
    assert cache.meta["skipped"] == 2 and f"{path} row 11" in caplog.text
    (tmp_path / "junk.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(DataErrors, match="junk.parquet: not a readable parquet file"):
        build(tmp_path / "junk.parquet", tok, tiny_model_dir, tmp_path / "cache")
    cut = tmp_path / "cut.parquet"
    cut.write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # a truncated download
    with pytest.raises(DataErrors, match="cut.parquet: not a readable parquet file"):
        build(cut, tok, tiny_model_dir, tmp_path / "cache")
    assert not [p for p in (tmp_path / "cache").iterdir() if p.name.startswith(".")]
    with pytest.raises(DataError, match="no such data file"):
        build(tmp_path / "missing.jsonl", tok, tiny_model_dir, tmp_path / "cache")


def test_streaming_yields_the_cached_examples_in_order(records, tok, tiny_model_dir, tmp_path):
    path = write(tmp_path / "data", records, "parquet")
    cache = build(path, tok, tiny_model_dir, tmp_path / "cache", cutoff_len=48)
    streamed = StreamedExamples(str(path), tok, get_prompter("alpaca", tok), cutoff_len=48)
    n = len(cache)
    assert list(islice(streamed, 2 * n + 3)) == 2 * features(cache) + features(cache)[:3]  # pass after pass
    (tmp_path / "long.jsonl").write_text(json.dumps({"instruction": "x " * 60, "output": "y"}) + "\n")
    with pytest.raises(DataError, match="nothing to train on"):  # all cut off: an error, not an endless loop
        next(iter(StreamedExamples(str(tmp_path / "long.jsonl"), tok, get_prompter("alpaca", tok), 16, False)))


def test_streamed_blocks_are_the_cached_blocks(data_dir, tok, tiny_model_dir, tmp_path):
    from lorakit.data.token_cache import load_or_build as load_corpus

    folder = tmp_path / "docs"
    folder.mkdir()
    shutil.copy(data_dir / "wiki_demo.txt", folder / "a.txt")
    (folder / "b.jsonl").write_text("".join(json.dumps({"text": t}) + "\n"
                                            for t in read_text_documents(data_dir / "wiki_demo.txt")[:40]))
    corpus = load_corpus(str(folder), tok, tiny_model_dir, tmp_path / "cache", 2, show_progress=False)
    blocks = TokenBlocks(corpus.tokens, 64)
    streamed = [b["input_ids"].tolist() for b in islice(StreamedBlocks(str(folder), tok, 64), len(blocks) + 1)]
    assert len(blocks) > 50
    assert streamed == [blocks[i]["input_ids"].tolist() for i in [*range(len(blocks)), 0]]
    (folder / "b.jsonl").write_text('{"text": "fine"}\n{"text": 3}\n')
    with pytest.raises(DataError, match=r"b.jsonl:2: field 'text'"):
        list(StreamedBlocks(str(folder), tok, 64))


def test_entry_complete_only_when_sizes_match(records, tok, tiny_model_dir, tmp_path):
    cache = build(write(tmp_path / "data", records, "jsonl"), tok, tiny_model_dir, tmp_path / "cache")
    assert ExampleCache.complete(cache.folder)
    with open(cache.folder / "label_mask.bin", "r+b") as f:
        f.truncate(10)
    assert not ExampleCache.complete(cache.folder)


def test_cli_second_run_reads_the_cache_and_streaming_options(tiny_model_dir, tiny_alpaca_json, tmp_path, caplog,
                                                              capsys, monkeypatch):
    from cli_helpers import run_cli

    args = ["finetune", "--base-model", tiny_model_dir, "--data-path", tiny_alpaca_json, "--cutoff-len", "64",
            "--micro-batch-size", "4", "--batch-size", "4", "--precision", "fp32", "--max-steps", "1", "--nproc", "1",
            "--data-cache-dir", tmp_path / "cache", "--preprocessing-num-workers", "2"]
    with caplog.at_level(logging.INFO, logger="lorakit"):
        assert run_cli(*args, "--val-set-size", "4", "--output-dir", tmp_path / "a") == 0
    assert "token cache miss" in caplog.text and "2 workers" in caplog.text
    calls = []
    real = cache_module.tokenize_in_workers
    monkeypatch.setattr(cache_module, "tokenize_in_workers", lambda *a, **k: calls.append(1) or real(*a, **k))
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="lorakit"):  # another split and seed: the same tokens
        assert run_cli(*args, "--val-set-size", "8", "--seed", "3", "--output-dir", tmp_path / "b") == 0
    assert not calls and "token cache hit" in caplog.text and "nothing to tokenize" in caplog.text
    assert "56 training / 8 validation examples" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="lorakit"):
        assert run_cli(*args, "--val-set-size", "0", "--no-train-on-inputs", "--output-dir", tmp_path / "c") == 0
    assert calls == [1] and "token cache miss" in caplog.text

    at = args.index("--max-steps")
    streaming = args[:at] + args[at + 2:] + ["--streaming"]
    assert run_cli(*streaming, "--output-dir", tmp_path / "d") == 2
    assert "--streaming needs --max-steps" in capsys.readouterr().err
    assert run_cli(*streaming, "--max-steps", "1", "--output-dir", tmp_path / "d") == 2  # default val set 2000
    assert "--streaming holds out no validation set: pass --val-set-size 0" in capsys.readouterr().err
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="lorakit"):
        assert run_cli(*streaming, "--max-steps", "1", "--val-set-size", "0", "--output-dir", tmp_path / "d") == 0
    assert "examples are tokenized while training" in caplog.text and calls == [1]
    assert (tmp_path / "d" / "adapter_model.safetensors").is_file()


def test_partials_of_killed_builds_are_removed(records, tok, tiny_model_dir, tmp_path, caplog):
    import subprocess
    import sys

    from lorakit.leftovers import host_tag

    path = write(tmp_path / "data", records, "jsonl")
    folder = build(path, tok, tiny_model_dir, tmp_path / "cache").folder
    shutil.rmtree(folder)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = folder.parent / f".{folder.name}.partial-{dead.pid}@{host_tag()}-x1"  # a build killed with SIGKILL
    stale.mkdir()
    (stale / "input_ids.bin").write_bytes(bytes(5000))
    with caplog.at_level(logging.WARNING, logger="lorakit"):
        assert build(path, tok, tiny_model_dir, tmp_path / "cache").folder == folder
    assert not stale.exists() and "removed 1 partial output(s)" in caplog.text
