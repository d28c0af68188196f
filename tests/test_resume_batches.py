"""Exact resume mid-epoch, batch by batch: a run resumed from a checkpoint trains on exactly the micro-batches
an uninterrupted run trains on after that step (same examples, same order, same packing), for finetune from
the example cache (balanced padding-free order and the plain random sampler, checkpoints in the first and the
second epoch), for a streamed finetune, and for pretrain's blocks. And a streamed run's first batches are the
cache's examples (finetune) or blocks (pretrain) in file order."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import lorakit.train.engine as engine
from lorakit.data.example_cache import load_or_build
from lorakit.models import ensure_pad_token, load_tokenizer
from lorakit.prompts import get_prompter
from lorakit.train.config import FinetuneConfig
from lorakit.train.finetune import finetune
from lorakit.train.trainers import TokenCountingTrainer

# 24 examples, 8 per step (2 micro-batches of 4): 3 steps an epoch; checkpoints at 2 (epoch 0) and 4 (epoch 1)
STEPS, SAVE, N_EXAMPLES = 5, 2, 24


@pytest.fixture
def recorded(monkeypatch):
    """Output folder -> the input_ids of every micro-batch the trainer trained on there, in order (recorded
    where the Trainer counts a batch's tokens, once per micro-batch it trains on: the data loader itself
    fetches one batch ahead)."""
    runs: dict[str, list[list[int]]] = {}
    real = TokenCountingTrainer._track_num_input_tokens

    def track(self, inputs):
        runs.setdefault(Path(self.args.output_dir).name, []).append(inputs["input_ids"].flatten().tolist())
        return real(self, inputs)

    monkeypatch.setattr(TokenCountingTrainer, "_track_num_input_tokens", track)
    return runs


@pytest.fixture(scope="module")
def data24(tiny_alpaca_json, tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "d24.jsonl"
    records = json.loads(tiny_alpaca_json.read_text())[:N_EXAMPLES]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def config(model_dir, data, out, cache, **kw) -> FinetuneConfig:
    options = dict(base_model=str(model_dir), data_path=str(data), output_dir=str(out), cutoff_len=64,
                   batch_size=8, micro_batch_size=4, max_steps=STEPS, save_steps=SAVE, warmup_steps=0,
                   learning_rate=1e-3, precision="fp32", val_set_size=0, logging_steps=1, lora_dropout=0.1,
                   nproc="1", data_cache_dir=str(cache), preprocessing_num_workers=2, save_total_limit=5)
    cfg = FinetuneConfig(**{**options, **kw})
    cfg.validate()
    return cfg


def epochs(out) -> str:
    """Where the checkpoints fall: 'mid-epoch 0, mid-epoch 1' is what the tests want."""
    where = []
    for step in (SAVE, 2 * SAVE):
        epoch = json.loads((out / f"checkpoint-{step}" / "trainer_state.json").read_text())["epoch"]
        where.append(f"mid-epoch {int(epoch)}" if epoch != int(epoch) else f"end of epoch {int(epoch) - 1}")
    return ", ".join(where)


def whole_and_resumed(model_dir, data, tmp_path, recorded, **kw):
    """The uninterrupted run's micro-batches, and those of runs resumed from each checkpoint."""
    finetune(config(model_dir, data, tmp_path / "whole", tmp_path / "cache", **kw))
    whole = recorded["whole"]
    assert len(whole) == 2 * STEPS
    if not kw.get("streaming"):  # a streamed run is one endless epoch
        assert epochs(tmp_path / "whole") == "mid-epoch 0, mid-epoch 1"
    resumed = {}
    for step in (SAVE, 2 * SAVE):
        out = tmp_path / f"resumed-{step}"
        shutil.copytree(tmp_path / "whole" / f"checkpoint-{step}", out / f"checkpoint-{step}")
        finetune(config(model_dir, data, out, tmp_path / "cache", resume_from_checkpoint="last", **kw))
        resumed[step] = recorded[out.name]
    return whole, resumed


@pytest.mark.parametrize("padding_free", [True, False], ids=["balanced-packed", "random-padded"])
def test_finetune_resumes_with_the_same_next_batches(padding_free, tiny_model_dir, data24, tmp_path, recorded):
    whole, resumed = whole_and_resumed(tiny_model_dir, data24, tmp_path, recorded, padding_free=padding_free)
    assert whole[:4] != whole[6:10]  # a new order each epoch: the check can fail
    for step, batches in resumed.items():
        assert batches == whole[2 * step:], f"resumed from checkpoint-{step}"


def test_streamed_finetune_starts_in_file_order_and_resumes_exactly(tiny_model_dir, data24, tmp_path, recorded):
    tok = load_tokenizer(tiny_model_dir, add_pad_token=False)
    ensure_pad_token(tok)
    cache = load_or_build(str(data24), tok, tiny_model_dir, get_prompter("alpaca", tok), tmp_path / "c", 1,
                          cutoff_len=64, show_progress=False)
    collate = engine.make_collator(tok, padding_free=True)
    in_order = [cache[i % len(cache)] for i in range(4 * 2 * STEPS)]  # 40 examples: the 24, then 16 again
    expected = [collate(in_order[i:i + 4])["input_ids"].flatten().tolist() for i in range(0, len(in_order), 4)]
    whole, resumed = whole_and_resumed(tiny_model_dir, data24, tmp_path, recorded, streaming=True)
    assert whole == expected  # the cache's examples in file order, then the second pass from the start
    for step, batches in resumed.items():
        assert batches == whole[2 * step:], f"resumed from checkpoint-{step}"


def test_pretrain_resumes_with_the_same_next_batches(data_dir, tiny_model_dir, tmp_path, recorded):
    from lorakit.train.pretrain import pretrain
    from lorakit.train.pretrain_config import PretrainConfig

    tok = load_tokenizer(tiny_model_dir, add_pad_token=False)
    words = (data_dir / "wiki_demo.txt").read_text(encoding="utf-8").split()
    docs, tokens = [], 0
    while tokens < 12 * 64:  # 12 blocks of 64, 4 a step: checkpoint 2 (8 blocks) in epoch 0, 4 (16) in epoch 1
        docs.append(" ".join(words[10 * len(docs): 10 * (len(docs) + 1)]))  # < 64 tokens: 12 blocks exactly
        tokens += len(tok(docs[-1])["input_ids"]) + 1
    text = tmp_path / "wiki.txt"
    text.write_text("\n".join(docs))

    def cfg(out, **kw):
        c = PretrainConfig(base_model=str(tiny_model_dir), data_path=str(text), output_dir=str(out), block_size=64,
                           batch_size=4, micro_batch_size=2, max_steps=STEPS, save_steps=SAVE, warmup_steps=0,
                           learning_rate=1e-3, precision="fp32", modules_to_save=[], logging_steps=1, nproc="1",
                           data_cache_dir=str(tmp_path / "cache"), save_total_limit=5, **kw)
        c.validate()
        return c

    pretrain(cfg(tmp_path / "whole"))
    whole = recorded["whole"]
    assert len(whole) == 2 * STEPS and epochs(tmp_path / "whole") == "mid-epoch 0, mid-epoch 1"
    for step in (SAVE, 2 * SAVE):
        out = tmp_path / f"resumed-{step}"
        shutil.copytree(tmp_path / "whole" / f"checkpoint-{step}", out / f"checkpoint-{step}")
        pretrain(cfg(out, resume_from_checkpoint="last"))
        assert recorded[out.name] == whole[2 * step:], f"resumed from checkpoint-{step}"


def test_streamed_pretrain_trains_on_the_cached_blocks_in_order(data_dir, tiny_model_dir, tmp_path, recorded):
    from lorakit.data.blocks import TokenBlocks
    from lorakit.data.token_cache import load_or_build as load_corpus
    from lorakit.train.pretrain import pretrain
    from lorakit.train.pretrain_config import PretrainConfig

    text = tmp_path / "wiki.txt"
    text.write_text((data_dir / "wiki_demo.txt").read_text(encoding="utf-8")[:20000])
    cfg = PretrainConfig(base_model=str(tiny_model_dir), data_path=str(text), output_dir=str(tmp_path / "s"),
                         block_size=64, batch_size=4, micro_batch_size=2, max_steps=2, warmup_steps=0,
                         precision="fp32", modules_to_save=[], nproc="1", streaming=True, val_set_size=0)
    cfg.validate()
    pretrain(cfg)
    tok = load_tokenizer(tiny_model_dir, add_pad_token=False)
    blocks = TokenBlocks(load_corpus(str(text), tok, tiny_model_dir, tmp_path / "cache", 1, False).tokens, 64)
    assert recorded["s"] == [blocks[i]["input_ids"].tolist() + blocks[i + 1]["input_ids"].tolist()
                             for i in (0, 2, 4, 6)]
