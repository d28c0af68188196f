"""`lorakit eval`: masked loss / perplexity of a model (+ adapters) on a data file, and exact match."""

from __future__ import annotations

import json
import math

import torch

from lorakit.data import IGNORE_INDEX, read_examples, tokenize_examples
from lorakit.data.collators import make_collator
from lorakit.generate import GenerationParams, generate_batch
from lorakit.models import load_model_and_tokenizer
from lorakit.precision import resolve_precision
from lorakit.prompts import get_prompter
from lorakit.train.config import EvalConfig
from lorakit.train.eval_result import EvalResult


@torch.inference_mode()
def masked_loss(model, tokenizer, features: list[dict], micro_batch_size: int = 8) -> tuple[float, int]:
    """Mean cross-entropy over all label tokens (not averaged per batch first); returns (loss, tokens)."""
    collate = make_collator(tokenizer, padding_free=False)
    total, count = 0.0, 0
    model.eval()
    for i in range(0, len(features), micro_batch_size):
        batch = collate([dict(f) for f in features[i: i + micro_batch_size]])
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
        labels = batch["labels"][:, 1:]
        losses = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), labels,
                                                   ignore_index=IGNORE_INDEX, reduction="sum")
        total += float(losses)
        count += int((labels != IGNORE_INDEX).sum())
    return total / max(count, 1), count


def greedy_responses(model, tokenizer, prompter, examples, max_new_tokens: int, batch_size: int = 8) -> list[str]:
    """The model's greedy response to each example's prompt (everything before its last assistant turn)."""
    responses: list[str] = []
    params = GenerationParams(max_new_tokens=max_new_tokens, stop=prompter.stop_strings)
    for i in range(0, len(examples), batch_size):
        chunk = examples[i: i + batch_size]
        prompts = [prompter.chat_prompt(ex.messages[:-1]) for ex in chunk]
        # chat templates spell out their special tokens; alpaca templates rely on the tokenizer's BOS
        outputs = generate_batch(model, tokenizer, prompts, params, add_special_tokens=prompter.kind != "chat")
        responses.extend(prompter.get_response(o) for o in outputs)
    return responses


def exact_match(model, tokenizer, prompter, examples, max_new_tokens: int, batch_size: int = 8) -> float:
    """Share of examples whose greedy response equals the reference output (whitespace-trimmed)."""
    responses = greedy_responses(model, tokenizer, prompter, examples, max_new_tokens, batch_size)
    hits = sum(r.strip() == ex.messages[-1]["content"].strip() for r, ex in zip(responses, examples, strict=True))
    return hits / max(len(examples), 1)


def evaluate(cfg: EvalConfig) -> EvalResult:
    """Score `cfg`'s model (+ adapters merged) on its data: mean token cross-entropy; returns an EvalResult."""
    if cfg.backend == "llamacpp":
        from lorakit.train.evaluate_llamacpp import evaluate_llamacpp

        return evaluate_llamacpp(cfg)
    precision = resolve_precision(cfg.precision)
    examples, _ = read_examples(cfg.data_path, skip_invalid=cfg.skip_invalid)  # data problems before loading
    model, tokenizer = load_model_and_tokenizer(cfg.base_model, cfg.tokenizer, cfg.lora_weights,
                                                dtype=precision, merge=True, quantization=cfg)
    prompter = get_prompter(cfg.prompt_template, tokenizer)
    if cfg.limit:
        examples = examples[: cfg.limit]
    features = tokenize_examples(examples, prompter, tokenizer, cfg.cutoff_len, cfg.train_on_inputs,
                                 cfg.add_eos_token)
    loss, tokens = masked_loss(model, tokenizer, features, cfg.micro_batch_size)
    result = EvalResult(len(features), tokens, loss, math.exp(min(loss, 50)))
    if cfg.exact_match:
        result.exact_match = exact_match(model, tokenizer, prompter, examples, cfg.max_new_tokens,
                                         cfg.micro_batch_size)
    return result


def run_eval(cfg: EvalConfig) -> int:
    """The `lorakit eval` verb: evaluate and print the result as JSON; returns the exit code."""
    print(json.dumps(evaluate(cfg).__dict__))
    return 0
