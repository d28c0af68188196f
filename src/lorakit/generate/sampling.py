"""Per-row sampling and per-row stopping for one batched `model.generate` call.

Requests batched together may each want different sampling settings, seeds, stop strings and lengths.
HF `generate` applies one setting to the whole batch, so the engine runs it greedy (`do_sample=False`)
and plugs in two hooks that work row by row (why: docs/design.md#per-row-sampling-hooks-instead-of-hfs-sampling):

- `RowSampler` (a LogitsProcessor): repetition penalty, temperature, top-k, top-p and a per-request
  `torch.Generator`; a sampled row's scores become one-hot (0 at the drawn token, -inf elsewhere), so
  generate's argmax picks exactly that token. Greedy rows pass through (argmax of the penalised scores).
  A seeded request therefore draws the same tokens alone or inside any batch.
- `RowTracker` (a StoppingCriteria): generate calls it after appending each step's tokens, with
  `input_ids` (batch, length). It hands each row's new token to its `TokenStream` (incremental decoding,
  stop strings, max tokens, cancellation) and returns which rows are done, so finished rows stop
  independently. It is the per-step hook that both sees every new token and can stop a row, which a
  `BaseStreamer` (called after the stop decision) cannot; streaming consumers get text from it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch
from transformers import LogitsProcessor, StoppingCriteria

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from lorakit.generate.params import GenerationParams


def make_generator(seed: int | None) -> torch.Generator:
    """A CPU generator for one request: seeded if asked, else seeded from the global torch RNG."""
    g = torch.Generator()
    g.manual_seed(int(seed) if seed is not None else int(torch.randint(0, 2**62, (1,)).item()))
    return g


def sample_row(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
               generator: torch.Generator) -> int:
    """Draw one token id from `logits` (vocab,) after temperature, top-k and top-p (nucleus) filtering."""
    logits = logits.float() / temperature
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # drop a token when the mass of the tokens strictly before it already reaches top_p (keeps >= 1)
        drop = (torch.cumsum(probs, dim=-1) - probs) >= top_p
        logits = logits.scatter(0, order[drop], float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator).item())


class RowSampler(LogitsProcessor):
    """Per-row penalties and sampling (see module doc). `starts[i]`: first real (unpadded) column.

    The generated tokens (for presence/frequency penalties) are the last `generated[i]` columns of a row,
    or, with `prompt_width`, every column after it (one fixed batch, as in `run_batch`)."""

    def __init__(self, params: Sequence[GenerationParams], starts: Sequence[int],
                 generators: Sequence[torch.Generator | None] | None = None, *,
                 generated: Sequence[int] | None = None, prompt_width: int | None = None):
        self.params = list(params)
        self.starts = list(starts)
        self.generated = list(generated) if generated is not None else None
        self.prompt_width = prompt_width
        self.generators = list(generators) if generators is not None else [
            make_generator(p.seed) if p.temperature > 0 else None for p in self.params]

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        """input_ids (batch, length), scores (batch, vocab) -> processed scores (batch, vocab)."""
        scores = scores.float()
        for i, p in enumerate(self.params):
            if p.repetition_penalty != 1.0:
                # CTRL-style penalty, as HF's RepetitionPenaltyLogitsProcessor, over the row's real tokens
                seen = input_ids[i, self.starts[i]:]
                s = scores[i].gather(0, seen)
                s = torch.where(s < 0, s * p.repetition_penalty, s / p.repetition_penalty)
                scores[i].scatter_(0, seen, s)
            if p.presence_penalty or p.frequency_penalty:
                self._penalize_generated(i, p, input_ids, scores)
            generator = self.generators[i]
            if generator is not None:
                token = sample_row(scores[i], p.temperature, p.top_k, p.top_p, generator)
                scores[i].fill_(float("-inf"))
                scores[i, token] = 0.0
        return scores

    def _penalize_generated(self, i: int, p: GenerationParams, input_ids: torch.Tensor, scores: torch.Tensor) -> None:
        """OpenAI's penalties over row i's generated tokens: score -= frequency * count + presence * (count > 0)."""
        if self.generated is not None:
            n = self.generated[i]
        else:
            n = input_ids.shape[1] - (self.prompt_width if self.prompt_width is not None else input_ids.shape[1])
        if n <= 0:
            return
        vocab = scores.shape[1]
        tokens = input_ids[i, -n:]
        counts = torch.bincount(tokens[tokens < vocab], minlength=vocab).to(scores.dtype)
        scores[i] -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(scores.dtype)


class TokenStream:
    """One request's generated tokens -> text, with stop strings, a token limit and cancellation.

    `push(token_id)` returns True when the request is finished. New text goes to `on_text` as soon as it
    is certain: text that could still become a stop string, or an incomplete UTF-8 character, is held
    back. `finish_reason`: "stop" (EOS / end-of-turn / stop string), "length" or "cancelled".
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, params: GenerationParams, stop_ids: Sequence[int],
                 on_text: Callable[[str], None] | None = None, cancelled: threading.Event | None = None):
        self.tokenizer = tokenizer
        self.max_new_tokens = params.max_new_tokens
        self.stop = [s for s in params.stop if s]
        self.stop_ids = set(stop_ids)
        self.on_text = on_text
        self.cancelled = cancelled or threading.Event()
        self.tokens: list[int] = []
        self.text = ""
        self.emitted = 0
        self.finish_reason: str | None = None

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def _emit(self, upto: int) -> None:
        if upto > self.emitted:
            chunk, self.emitted = self.text[self.emitted:upto], upto
            if self.on_text is not None:
                self.on_text(chunk)

    def _held_back(self, text: str) -> int:
        """Characters at the end of `text` that might be the start of a stop string."""
        hold = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(text)), hold, -1):
                if text.endswith(s[:k]):
                    hold = k
                    break
        return hold

    def push(self, token_id: int) -> bool:
        if self.done:
            return True
        if self.cancelled.is_set():
            return self.finish("cancelled")
        if token_id in self.stop_ids:
            return self.finish("stop")
        self.tokens.append(token_id)
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        self.text = text
        cut = min((i for i in (text.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.text = text[:cut]
            return self.finish("stop")
        if len(self.tokens) >= self.max_new_tokens:
            return self.finish("length")
        safe = len(text) - self._held_back(text)
        while safe > self.emitted and text[safe - 1] == "\ufffd":  # a multi-byte character not complete yet
            safe -= 1
        self._emit(safe)
        return False

    def finish(self, reason: str) -> bool:
        if not self.done:
            self.finish_reason = reason
            if reason != "cancelled":
                self._emit(len(self.text))
        return True


class RowTracker(StoppingCriteria):
    """Feeds each row's newest token to its TokenStream; returns (batch,) bool: which rows are done."""

    def __init__(self, streams: Sequence[TokenStream], prompt_width: int):
        self.streams = list(streams)
        self.prompt_width = prompt_width

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor | None = None,
                 **kwargs) -> torch.BoolTensor:
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        if input_ids.shape[1] <= self.prompt_width:
            return done
        last = input_ids[:, -1].tolist()
        for i, stream in enumerate(self.streams):
            done[i] = stream.push(last[i])
        return done
