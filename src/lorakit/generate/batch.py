"""Fixed batches through HF `generate`: `run_batch` and the plain `generate_batch`.

`run_batch` runs one left-padded batch of requests through HF `generate`, with per-row sampling and
stopping (see sampling.py). The `Engine` (runner.py) uses it for fixed batches and beam search;
`generate_batch` is the plain function the training/eval code calls.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

from lorakit.generate.params import GenerationParams, Request

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger("lorakit")


def stop_token_ids(tokenizer: PreTrainedTokenizerBase, stop: Sequence[str], model: PreTrainedModel | None = None
                   ) -> list[int]:
    """EOS (tokenizer's and the model's generation config's) plus stop strings that are single tokens."""
    ids: list[int] = []
    cfg_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for token_id in [tokenizer.eos_token_id, *(cfg_eos if isinstance(cfg_eos, list) else [cfg_eos])]:
        if isinstance(token_id, int) and token_id not in ids:
            ids.append(token_id)
    for s in stop:
        token_id = tokenizer.convert_tokens_to_ids(s) if s else None
        if isinstance(token_id, int) and token_id != tokenizer.unk_token_id and token_id not in ids:
            ids.append(token_id)
    return ids


def run_batch(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, requests: Sequence[Request]) -> None:
    """Generate for `requests` (equal `batch_key`) as one left-padded batch; fills in each request's result.

    Sampled/greedy batches stream token by token through each request's `on_text`; beam search
    delivers its text when the search ends. Does not call `Request._finish` (the caller does).
    """
    import torch
    from transformers import GenerationConfig, LogitsProcessorList, StoppingCriteriaList

    from lorakit.generate.sampling import RowSampler, RowTracker, TokenStream

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    width = max(len(r.prompt_ids) for r in requests)
    input_ids = torch.full((len(requests), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(requests), width), dtype=torch.long)
    for i, r in enumerate(requests):  # left padding: every row's next token is at the same column
        input_ids[i, width - len(r.prompt_ids):] = torch.tensor(r.prompt_ids, dtype=torch.long)
        attention_mask[i, width - len(r.prompt_ids):] = 1
    stops = sorted({s for r in requests for s in r.params.stop})
    stop_ids = stop_token_ids(tokenizer, stops, model)
    eos_ids = set(stop_token_ids(tokenizer, [], model))
    streams = [TokenStream(tokenizer, r.params, [t for t in stop_ids if not (r.params.ignore_eos and t in eos_ids)],
                           r.on_text, r.cancelled) for r in requests]
    if any(r.params.ignore_eos for r in requests):  # rows stop on their own (RowTracker); none at the batch level
        # an id past the vocabulary (never generated) keeps HF from substituting the model's EOS for []
        never = int(model.get_output_embeddings().weight.shape[0])
        stop_ids = [t for t in stop_ids if t not in eos_ids] or [never]
    p0 = requests[0].params
    beams = p0.num_beams > 1
    config = GenerationConfig(max_new_tokens=max(r.params.max_new_tokens for r in requests), num_beams=p0.num_beams,
                              do_sample=beams and p0.temperature > 0, pad_token_id=pad_id, eos_token_id=stop_ids,
                              use_cache=True)
    if beams:
        if p0.temperature > 0:
            config.update(temperature=p0.temperature, top_p=p0.top_p, top_k=p0.top_k or None)
        config.update(repetition_penalty=p0.repetition_penalty, early_stopping=True)
        hooks = {"stopping_criteria": StoppingCriteriaList([_AllCancelled(requests)])}
        if p0.seed is not None:
            torch.manual_seed(p0.seed)
    else:
        # explicit neutral values: HF fills unset fields from the model's generation_config, and a default
        # repetition_penalty there would be applied on top of RowSampler's per-row one
        config.update(repetition_penalty=1.0, no_repeat_ngram_size=0)
        sampler = RowSampler([r.params for r in requests], [width - len(r.prompt_ids) for r in requests],
                             prompt_width=width)
        hooks = {"logits_processor": LogitsProcessorList([sampler]),
                 "stopping_criteria": StoppingCriteriaList([RowTracker(streams, width)])}
    with torch.inference_mode():
        out = model.generate(input_ids=input_ids.to(model.device), attention_mask=attention_mask.to(model.device),
                             generation_config=config, **hooks)
    for i, (r, stream) in enumerate(zip(requests, streams, strict=True)):
        if beams:
            for token_id in out[i, width:].tolist():
                if stream.push(token_id):
                    break
        if not stream.done:
            stream.finish("cancelled" if r.cancelled.is_set() else "length")
        r.text, r.completion_tokens, r.finish_reason = stream.text, len(stream.tokens), stream.finish_reason


class _AllCancelled:
    """Stopping criterion for beam search: stop only when every request of the batch went away."""

    def __init__(self, requests: Sequence[Request]):
        self.requests = requests

    def __call__(self, input_ids, scores=None, **kwargs):
        import torch

        stop = all(r.cancelled.is_set() for r in self.requests)
        return torch.full((input_ids.shape[0],), stop, dtype=torch.bool, device=input_ids.device)


def generate_batch(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: list[str],
                   params: GenerationParams | None = None, add_special_tokens: bool = True) -> list[str]:
    """Generate a completion for each prompt (one left-padded batch); returns only the new text."""
    params = (params or GenerationParams()).validate()
    requests = [Request(list(tokenizer(p, add_special_tokens=add_special_tokens)["input_ids"]), params)
                for p in prompts]
    if params.seed is not None and params.num_beams == 1:
        # one seed for the call, different (reproducible) streams per prompt
        requests = [Request(r.prompt_ids, _with_seed(params, params.seed + i)) for i, r in enumerate(requests)]
    if requests:
        run_batch(model, tokenizer, requests)
    return [r.text for r in requests]


def _with_seed(params: GenerationParams, seed: int) -> GenerationParams:
    from dataclasses import replace

    return replace(params, seed=seed)
