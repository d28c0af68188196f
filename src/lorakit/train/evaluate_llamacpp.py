"""`lorakit eval --backend llamacpp`: the same masked loss / perplexity, computed from llama.cpp's logits.

The model is a GGUF as llama.cpp runs it: `--base-model x.gguf` is used as it is (a q4_k_m file is
evaluated with its quantized weights), an HF folder or alias is written once as an f32 GGUF (cached),
and adapters are applied as GGUF LoRA adapters. Tokenization and label masks are lorakit's, as for
the torch back-end, so the two report comparable numbers. A `.txt` data file is scored as raw text
(perplexity over consecutive windows), which is how `benchmarks/gguf_quality.py` compares GGUF types.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lorakit.errors import ConfigError

IGNORE = -100


def token_nll(logits: Any, targets: Sequence[int]) -> tuple[float, int]:
    """Summed negative log-likelihood of `targets` under `logits` [n, vocab] (numpy, row i predicts
    targets[i]); targets equal to -100 are skipped. Returns (sum, count)."""
    import torch

    t = torch.tensor(list(targets), dtype=torch.long)
    keep = t != IGNORE
    if not bool(keep.any()):
        return 0.0, 0
    lp = torch.log_softmax(torch.from_numpy(logits).float(), dim=-1)
    picked = lp[keep.nonzero().squeeze(1), t[keep]]
    return float(-picked.sum()), int(keep.sum())


def text_windows(ids: Sequence[int], window: int, limit: int = 0) -> list[list[int]]:
    """Consecutive non-overlapping windows of `window` tokens (the last partial one dropped)."""
    out = [list(ids[i:i + window]) for i in range(0, len(ids) - window + 1, window)]
    return out[:limit] if limit else out


def gguf_for(base_model: str, adapters: Sequence[str]) -> tuple[Path, dict[str, Path], Any]:
    """(model GGUF, {name: adapter GGUF}, tokenizer) for an eval run on llama.cpp."""
    from lorakit.export.gguf_cache import cached_adapter_gguf, cached_model_gguf
    from lorakit.models import adapter_tokenizer_dir, load_tokenizer, resolve_adapter_dir, resolve_model_dir

    dirs = [resolve_adapter_dir(a) for a in adapters]
    given = Path(base_model).expanduser()
    if given.is_file() and given.suffix == ".gguf" and not dirs:
        tok = load_tokenizer(given.parent, given, add_pad_token=False)
        return given, {}, tok
    base_dir = resolve_model_dir(base_model)
    tok = load_tokenizer(base_dir, adapter_tokenizer_dir(dirs), add_pad_token=False)
    # a .gguf base is used as it is (adapters were trained on its dequantized weights)
    gguf = given if given.is_file() and given.suffix == ".gguf" else cached_model_gguf(base_dir, "f32")
    return gguf, {f"a{i}": cached_adapter_gguf(d, base_dir, "f32") for i, d in enumerate(dirs)}, tok


def llamacpp_masked_loss(gguf: Path, adapters: dict[str, Path], features: list[dict[str, Any]]) -> tuple[float, int]:
    """Mean cross-entropy over every label token of `features` (input_ids/labels lists), by llama.cpp."""
    from lorakit.models.llamacpp import LlamaCppModel

    longest = max(len(f["input_ids"]) for f in features)
    total, count = 0.0, 0
    with LlamaCppModel(gguf, adapters, n_ctx=max(longest, 64), n_batch=max(longest, 32)) as model:
        model.use_adapters(list(adapters))
        for f in features:
            logits = model.sequence_logits(f["input_ids"])
            nll, n = token_nll(logits[:-1], f["labels"][1:])
            total, count = total + nll, count + n
    return total / max(count, 1), count


def llamacpp_text_loss(gguf: Path, adapters: dict[str, Path], windows: list[list[int]]) -> tuple[float, int]:
    """Mean next-token cross-entropy over raw-text windows (every token after the first of a window)."""
    return llamacpp_masked_loss(gguf, adapters, [{"input_ids": w, "labels": w} for w in windows])


def evaluate_llamacpp(cfg: Any) -> Any:
    """`evaluate` (train/evaluate.py) on llama.cpp: returns an EvalResult."""
    from lorakit.train.eval_result import EvalResult

    if cfg.exact_match:
        raise ConfigError("--exact-match is not available with --backend llamacpp; generate the answers with "
                          "`lorakit infer --backend llamacpp` or evaluate with --backend torch")
    gguf, adapters, tok = gguf_for(cfg.base_model, cfg.lora_weights)
    if Path(cfg.data_path).suffix == ".txt":
        from lorakit.data import read_text_documents

        ids: list[int] = []
        for doc in read_text_documents(cfg.data_path):
            ids += tok(doc, add_special_tokens=False)["input_ids"]
        windows = text_windows(ids, cfg.cutoff_len, cfg.limit)
        if not windows:
            raise ConfigError(f"{cfg.data_path}: shorter than one window of --cutoff-len {cfg.cutoff_len} tokens")
        loss, tokens = llamacpp_text_loss(gguf, adapters, windows)
        return EvalResult(len(windows), tokens, loss, math.exp(min(loss, 50)))
    from lorakit.data import read_examples, tokenize_examples
    from lorakit.models import ensure_pad_token
    from lorakit.prompts import get_prompter

    ensure_pad_token(tok)
    prompter = get_prompter(cfg.prompt_template, tok)
    examples, _ = read_examples(cfg.data_path, skip_invalid=cfg.skip_invalid)
    if cfg.limit:
        examples = examples[: cfg.limit]
    features = tokenize_examples(examples, prompter, tok, cfg.cutoff_len, cfg.train_on_inputs, cfg.add_eos_token)
    loss, tokens = llamacpp_masked_loss(gguf, adapters, features)
    return EvalResult(len(features), tokens, loss, math.exp(min(loss, 50)))
