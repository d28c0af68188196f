"""`lorakit finetune`: read and validate data, tokenize with masks, load the base, train LoRA, save."""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence

from lorakit.data import read_examples, tokenize_examples
from lorakit.errors import ConfigError
from lorakit.models import check_vocab, ensure_pad_token, load_model, load_tokenizer, resolve_model_dir
from lorakit.precision import resolve_precision, weights_dtype
from lorakit.prompts import get_prompter
from lorakit.train.config import FinetuneConfig
from lorakit.train.engine import train
from lorakit.train.summary import TrainSummary

log = logging.getLogger("lorakit")
Features = dict[str, list[int]]


def split_validation(features: Sequence[Features], val_set_size: int, seed: int) -> tuple[list, list]:
    """Shuffle with `seed` and hold out `val_set_size` examples (alpaca-lora's train_test_split)."""
    if val_set_size <= 0:
        return list(features), []
    if val_set_size >= len(features):
        raise ConfigError(f"--val-set-size {val_set_size} leaves no training data ({len(features)} examples); "
                          f"use e.g. --val-set-size {max(1, len(features) // 10)} or 0")
    order = list(range(len(features)))
    random.Random(seed).shuffle(order)
    held = set(order[:val_set_size])
    return [f for i, f in enumerate(features) if i not in held], [features[i] for i in order[:val_set_size]]


def finetune(cfg: FinetuneConfig) -> TrainSummary:
    """Read and tokenize `cfg.data_path`, train a LoRA adapter into `cfg.output_dir`; returns the TrainSummary."""
    precision = resolve_precision(cfg.precision)
    model_dir = resolve_model_dir(cfg.base_model)
    # All data problems surface before the (slow) tokenizer and model loads.
    examples, skipped = read_examples(cfg.data_path, skip_invalid=cfg.skip_invalid)
    if skipped:
        log.warning("skipped %d invalid record(s); first: %s", len(skipped), skipped[0])
    tokenizer = load_tokenizer(model_dir, cfg.tokenizer, add_pad_token=False)
    pad_added = ensure_pad_token(tokenizer)
    prompter = get_prompter(cfg.prompt_template, tokenizer)
    features = tokenize_examples(examples, prompter, tokenizer, cfg.cutoff_len, cfg.train_on_inputs,
                                 cfg.add_eos_token)
    if len(features) < len(examples):
        log.warning("dropped %d example(s) whose response was cut off entirely at --cutoff-len %d",
                    len(examples) - len(features), cfg.cutoff_len)
    train_set, val_set = split_validation(features, cfg.val_set_size, cfg.seed)
    log.info("%d training / %d validation examples, template %r", len(train_set), len(val_set), prompter.name)

    model = load_model(model_dir, weights_dtype(precision), quantization=cfg)
    check_vocab(tokenizer, model, allow_resize=pad_added)
    if pad_added:  # a new <pad> row must be trained and saved with the adapter
        for name in ("embed_tokens", "lm_head"):
            if name not in cfg.modules_to_save:
                cfg.modules_to_save.append(name)
    return train(cfg, model, tokenizer, train_set, val_set or None)
