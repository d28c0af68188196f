"""The one generation engine every front end (CLI, batch file, web page, API server) uses.

`run_batch` is the core: one left-padded batch of requests through HF `generate`, with per-row
sampling and stopping (see `sampling.py`). `Engine` holds a loaded model, tokenizer and prompter and
adds a background worker (dynamic batching: requests that arrive while the model is busy, or together,
run as one batch) with streaming (`stream`, `submit`) on top. `generate_batch` is the plain function
the training/eval code calls.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from lorakit.errors import ConfigError

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger("lorakit")


@dataclass
class GenerationParams:
    """Sampling settings of one request. temperature 0 = greedy; top_k 0 = off; top_p 1 = off."""

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    num_beams: int = 1
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0   # OpenAI's: subtracted once from each token already generated
    frequency_penalty: float = 0.0  # OpenAI's: subtracted per occurrence in the generated tokens
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    ignore_eos: bool = False  # keep going past EOS (benchmarks: fixed-length outputs)

    @classmethod
    def from_fields(cls, source: object, **overrides) -> GenerationParams:
        """Validated params from any object with sampling attributes of the same names (CLI options,
        an API request body); `overrides` for what the source names or shapes differently."""
        shared = {f.name: getattr(source, f.name) for f in dataclasses.fields(cls)
                  if f.name not in overrides and hasattr(source, f.name)}
        return cls(**shared, **overrides).validate()

    def validate(self) -> GenerationParams:
        checks = [(self.max_new_tokens >= 1, "max_new_tokens must be >= 1"),
                  (self.temperature >= 0, "temperature must be >= 0"),
                  (0 < self.top_p <= 1, "top_p must be in (0, 1]"),
                  (self.top_k >= 0, "top_k must be >= 0"),
                  (self.num_beams >= 1, "num_beams must be >= 1"),
                  (self.repetition_penalty > 0, "repetition_penalty must be > 0"),
                  (self.num_beams == 1 or not (self.presence_penalty or self.frequency_penalty),
                   "presence/frequency penalties apply to sampling and greedy decoding, not beam search")]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        return self

    def batch_key(self) -> tuple:
        """Requests with equal keys can share one `generate` call: any greedy/sampled mix can (per-row
        hooks); beam search needs identical settings."""
        if self.num_beams == 1:
            return (1,)
        return (self.num_beams, self.temperature, self.top_p, self.top_k, self.repetition_penalty,
                self.max_new_tokens)


@dataclass
class Request:
    """One generation job and, when finished, its result. `on_text` gets text chunks as they are certain."""

    prompt_ids: list[int]
    params: GenerationParams
    adapter: str | None = None
    on_text: Callable[[str], None] | None = None
    on_done: Callable[[Request], None] | None = None
    cancelled: threading.Event = field(default_factory=threading.Event)
    finished: threading.Event = field(default_factory=threading.Event)
    text: str = ""
    completion_tokens: int = 0
    finish_reason: str | None = None
    error: BaseException | None = None

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    def cancel(self) -> None:
        self.cancelled.set()

    def _finish(self) -> None:
        self.finished.set()
        if self.on_done is not None:
            self.on_done(self)


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
