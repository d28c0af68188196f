"""`lorakit data preview`: show examples exactly as the trainer will see them."""

from __future__ import annotations

import json
import sys

from lorakit.data.config import PreviewConfig
from lorakit.data.readers import read_examples
from lorakit.data.tokenize import IGNORE_INDEX, tokenize_example
from lorakit.models import load_tokenizer, resolve_model_dir
from lorakit.prompts import get_prompter


def _split_spans(ids: list[int], labels: list[int]) -> list[tuple[bool, list[int]]]:
    """Consecutive runs of (trained?, token ids)."""
    spans: list[tuple[bool, list[int]]] = []
    for token, label in zip(ids, labels, strict=True):
        trained = label != IGNORE_INDEX
        if spans and spans[-1][0] == trained:
            spans[-1][1].append(token)
        else:
            spans.append((trained, [token]))
    return spans


def run_preview(cfg: PreviewConfig) -> int:
    """The `lorakit preview` verb: print tokenized examples with their label masks; returns the exit code."""
    tokenizer = load_tokenizer(resolve_model_dir(cfg.base_model), cfg.tokenizer)
    prompter = get_prompter(cfg.prompt_template, tokenizer)
    examples, skipped = read_examples(cfg.data_path, skip_invalid=cfg.skip_invalid)
    out = sys.stdout
    for ex in examples[: cfg.num]:
        feats = tokenize_example(ex, prompter, tokenizer, cfg.cutoff_len, cfg.train_on_inputs, cfg.add_eos_token)
        if cfg.json:
            record = {"where": ex.where, "input_ids": feats["input_ids"], "labels": feats["labels"]}
            out.write(json.dumps(record) + "\n")
            continue
        n_trained = sum(label != IGNORE_INDEX for label in feats["labels"])
        out.write(f"=== {ex.where}: {len(feats['input_ids'])} tokens, {n_trained} trained\n")
        for trained, span in _split_spans(feats["input_ids"], feats["labels"]):
            tag = "LABEL" if trained else "MASKED"
            out.write(f"--- [{tag}] ({len(span)} tokens)\n{tokenizer.decode(span)}\n")
    if skipped:
        print(f"skipped {len(skipped)} invalid record(s)", file=sys.stderr)
    return 0
