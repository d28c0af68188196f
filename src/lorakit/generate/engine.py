"""Batched generation with left padding."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


@dataclass
class GenerationParams:
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0
    num_beams: int = 1
    repetition_penalty: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None


def generate_batch(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: list[str],
                   params: GenerationParams | None = None, add_special_tokens: bool = True) -> list[str]:
    """Generate a completion for each prompt (left-padded batch); returns only the new text."""
    import torch

    params = params or GenerationParams()
    if params.seed is not None:
        torch.manual_seed(params.seed)
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=add_special_tokens)
    finally:
        tokenizer.padding_side = side
    sample = params.temperature > 0
    kwargs = dict(max_new_tokens=params.max_new_tokens, do_sample=sample, num_beams=params.num_beams,
                  repetition_penalty=params.repetition_penalty, pad_token_id=tokenizer.pad_token_id,
                  eos_token_id=_stop_ids(tokenizer, params.stop))
    if sample:
        kwargs.update(temperature=params.temperature, top_p=params.top_p, top_k=params.top_k or None)
    with torch.inference_mode():
        out = model.generate(**batch.to(model.device), **kwargs)
    texts = tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    return [_cut_at_stop(t, params.stop) for t in texts]


def _stop_ids(tokenizer: PreTrainedTokenizerBase, stop: list[str]) -> list[int]:
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    for s in stop:
        token_id = tokenizer.convert_tokens_to_ids(s)
        if isinstance(token_id, int) and token_id != tokenizer.unk_token_id and token_id not in ids:
            ids.append(token_id)
    return ids


def _cut_at_stop(text: str, stop: list[str]) -> str:
    for s in stop:
        if s and s in text:
            text = text[: text.index(s)]
    return text
