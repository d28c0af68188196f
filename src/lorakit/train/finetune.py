"""`lorakit finetune`: read and validate data, tokenize with masks (once, into the token cache), load the base,
train LoRA, save."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from lorakit.data.example_cache import load_or_build
from lorakit.data.holdout import held_out
from lorakit.models import (
    check_vocab,
    ensure_pad_token,
    load_model,
    load_tokenizer,
    resolve_model_dir,
    tokenizer_source,
)
from lorakit.precision import resolve_precision, weights_dtype
from lorakit.prompts import get_prompter
from lorakit.train.config import FinetuneConfig
from lorakit.train.engine import train
from lorakit.train.summary import TrainSummary

log = logging.getLogger("lorakit")
Features = dict[str, list[int]]


def split_validation(features: Sequence[Features], val_set_size: int, seed: int) -> tuple[list, list]:
    """Shuffle with `seed` and hold out `val_set_size` examples (alpaca-lora's train_test_split)."""
    held = held_out(len(features), val_set_size, seed)
    skip = set(held)
    return [f for i, f in enumerate(features) if i not in skip], [features[i] for i in held]


def tokenized_examples(cfg: FinetuneConfig, tokenizer, prompter, model_dir: Path):
    """(train, validation) datasets: the examples tokenized in parallel into the on-disk cache
    (data/example_cache.py) the first time, memory-mapped afterwards; or, with --streaming, tokenized while
    training (data/streaming.py) and no validation set."""
    if cfg.streaming:
        from lorakit.data.streaming import StreamedExamples

        log.info("streaming %s: examples are tokenized while training, in file order", cfg.data_path)
        return StreamedExamples(cfg.data_path, tokenizer, prompter, cfg.cutoff_len, cfg.train_on_inputs,
                                cfg.add_eos_token, cfg.skip_invalid), None
    source = tokenizer_source(model_dir, cfg.tokenizer)
    cache = load_or_build(cfg.data_path, tokenizer, source, prompter, cfg.cache_dir(), cfg.workers(),
                          cfg.cutoff_len, cfg.train_on_inputs, cfg.add_eos_token, cfg.skip_invalid)
    train_set, val_set = cache.split(cfg.val_set_size, cfg.seed)
    log.info("%d training / %d validation examples, template %r", len(train_set), len(val_set or ()),
             prompter.name)
    return train_set, val_set


def finetune(cfg: FinetuneConfig) -> TrainSummary:
    """Read and tokenize `cfg.data_path`, train a LoRA adapter into `cfg.output_dir`; returns the TrainSummary."""
    precision = resolve_precision(cfg.precision)
    model_dir = resolve_model_dir(cfg.base_model)
    tokenizer = load_tokenizer(model_dir, cfg.tokenizer, add_pad_token=False)
    pad_added = ensure_pad_token(tokenizer)
    prompter = get_prompter(cfg.prompt_template, tokenizer)
    # All data problems surface before the (slow) model load.
    train_set, val_set = tokenized_examples(cfg, tokenizer, prompter, model_dir)

    model = load_model(model_dir, weights_dtype(precision), quantization=cfg)
    check_vocab(tokenizer, model, allow_resize=pad_added)
    if pad_added:  # a new <pad> row must be trained and saved with the adapter
        for name in ("embed_tokens", "lm_head"):
            if name not in cfg.modules_to_save:
                cfg.modules_to_save.append(name)
    return train(cfg, model, tokenizer, train_set, val_set or None)
