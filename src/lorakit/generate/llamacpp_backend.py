"""The llama.cpp back-end: `Engine`'s interface (submit, stream, complete, generate_many, prompts, model names)
over a GGUF run by llama.cpp, with LoRA adapters applied at run time as GGUF adapters.

What stays in lorakit, shared with the torch back-end: the tokenizer (prompt ids are identical), prompt
templates, stop handling and streaming (`TokenStream`), and sampling (`RowSampler` on llama.cpp's logits:
the same temperature / top-k / top-p / penalties / seeded generators, so a seeded request draws the same
way under both back-ends). llama.cpp computes the logits: every running request is one sequence of
one shared KV cache, and each step decodes all of them in one batch (continuous batching as in
llama.cpp's server: prompts of newly admitted requests are prefilled between steps).
"""

from __future__ import annotations

import logging
import queue
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from lorakit.errors import ConfigError
from lorakit.generate.batch import stop_token_ids
from lorakit.generate.params import GenerationParams, Request
from lorakit.generate.runner import Engine

log = logging.getLogger("lorakit")
BEAM_SEARCH_NOTE = "beam search (--num-beams > 1) is not available with --backend llamacpp; use --backend torch"


@dataclass
class _Row:
    request: Request
    stream: Any  # TokenStream
    seq: int
    tokens: list[int]  # prompt + generated: positions 0..len-1 are (or will be) in the KV cache
    sampler: Any | None  # RowSampler for sampled/penalised rows, None for plain greedy
    next: int = -1


class _Shim:
    """What `Engine` reads from a model: its config (context length) and generation config (EOS ids)."""

    def __init__(self, n_ctx: int, generation_config: Any = None):
        self.config = type("Config", (), {"max_position_embeddings": n_ctx})()
        self.generation_config = generation_config


class LlamaCppBatch:
    """Requests being decoded by llama.cpp; `add` prefills and admits, `step` advances every row by one token."""

    def __init__(self, runner: Any, tokenizer: Any, shim: _Shim, on_finish: Callable[[Request], None]):
        self.runner, self.tokenizer, self.shim, self.on_finish = runner, tokenizer, shim, on_finish
        self.eos_ids = set(stop_token_ids(tokenizer, [], shim))
        self.rows: list[_Row] = []
        self.free = list(range(runner.n_seq))

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def requests(self) -> list[Request]:
        return [r.request for r in self.rows]

    def fits(self, request: Request, admitted: Sequence[Request] = ()) -> bool:
        """A free sequence, and KV cells for its whole prompt + max_new_tokens beside the running rows' (and
        those of `admitted`, requests about to be added with it)."""
        others = [r.request for r in self.rows] + list(admitted)
        reserved = sum(len(r.prompt_ids) + r.params.max_new_tokens for r in others)
        need = len(request.prompt_ids) + request.params.max_new_tokens
        return len(self.free) > len(admitted) and (reserved + need <= self.runner.n_ctx or not others)

    def _row(self, r: Request) -> _Row:
        from lorakit.generate.sampling import RowSampler, TokenStream, make_generator

        p = r.params
        stops = [t for t in stop_token_ids(self.tokenizer, p.stop, self.shim)
                 if not (p.ignore_eos and t in self.eos_ids)]
        plain = p.temperature == 0 and p.repetition_penalty == 1.0 and not (p.presence_penalty or p.frequency_penalty)
        sampler = None if plain else RowSampler(
            [p], [0], [make_generator(p.seed) if p.temperature > 0 else None], generated=[0])
        stream = TokenStream(self.tokenizer, p, stops, r.on_text, r.cancelled)
        return _Row(r, stream, self.free.pop(0), list(r.prompt_ids), sampler)

    def _pick(self, row: _Row, out: int) -> int:
        import numpy as np

        logits = self.runner.logits(out)
        if row.sampler is None:
            return int(np.argmax(logits))
        import torch

        row.sampler.generated = [len(row.stream.tokens)]
        scores = row.sampler(torch.tensor([row.tokens]), torch.from_numpy(np.array(logits))[None])
        return int(scores[0].argmax())

    def add(self, requests: Sequence[Request]) -> None:
        """Prefill the requests' prompts together (one sequence each, packed into decodes of at most n_batch
        tokens: fewer, larger llama_decode calls when several requests arrive at once) and pick each one's
        first token right after the decode that computed its last prompt position."""
        entries: list[tuple[int, int, int, bool]] = []
        ends: list[_Row] = []  # the row of each entry that wants logits, in order
        for r in requests:
            row = self._row(r)
            self.runner.forget(row.seq)
            self.rows.append(row)
            n = len(row.tokens)
            entries += [(t, j, row.seq, j == n - 1) for j, t in enumerate(row.tokens)]
            ends.append(row)
        chunk, done = self.runner.n_batch, 0
        for start in range(0, len(entries), chunk):
            outs = self.runner.decode(entries[start:start + chunk])
            for out in outs:  # logits are valid until the next decode: pick now
                row = ends[done]
                row.next = self._pick(row, out)
                self._push(row)
                done += 1
        self._prune()

    def step(self) -> None:
        outs = self.runner.decode([(row.next, len(row.tokens), row.seq, True) for row in self.rows])
        for row, out in zip(list(self.rows), outs, strict=True):
            row.tokens.append(row.next)
            row.next = self._pick(row, out)
            self._push(row)
        self._prune()

    def _push(self, row: _Row) -> None:
        row.stream.push(row.next)

    def _prune(self) -> None:
        for row in [r for r in self.rows if r.stream.done]:
            self._end(row, None)

    def _end(self, row: _Row, error: BaseException | None) -> None:
        r, s = row.request, row.stream
        r.error = error
        r.text, r.completion_tokens, r.finish_reason = s.text, len(s.tokens), s.finish_reason or "cancelled"
        self.rows.remove(row)
        self.runner.forget(row.seq)
        self.free.append(row.seq)
        self.on_finish(r)

    def fail_all(self, error: BaseException | None) -> None:
        for row in list(self.rows):
            self._end(row, error)


class LlamaCppEngine(Engine):
    """`Engine` on llama.cpp (see the module docstring). Built by `LlamaCppEngine.load` (llamacpp_load.py)."""

    def __init__(self, runner: Any, tokenizer: Any, prompter: Any, *, merged: Sequence[str] = (),
                 context_length: int | None = None, generation_config: Any = None, **kwargs: Any):
        self.shim = _Shim(context_length or runner.n_ctx, generation_config)
        kwargs.pop("continuous", None)
        super().__init__(self.shim, tokenizer, prompter, **kwargs)
        self.runner = runner
        self.merged = list(merged)  # adapters always applied (the --merge equivalent)

    def _adapters_for(self, adapter: str | None) -> list[str]:
        return [*self.merged, *([adapter] if adapter else [])]

    def submit(self, prompt_ids: Sequence[int], params: GenerationParams, adapter: str | None = None,
               on_text: Callable[[str], None] | None = None,
               on_done: Callable[[Request], None] | None = None) -> Request:
        if params.num_beams > 1:
            raise ConfigError(BEAM_SEARCH_NOTE)
        return super().submit(prompt_ids, params, adapter, on_text, on_done)

    def generate_many(self, prompt_ids, params: GenerationParams, batch_size: int = 8, adapter: str | None = None):
        if params.num_beams > 1:
            raise ConfigError(BEAM_SEARCH_NOTE)
        return super().generate_many(prompt_ids, params, batch_size, adapter)

    def _run(self, requests: list[Request]) -> None:
        """A fixed group of requests (batch files), decoded together until all are done; the caller
        finishes them."""
        self.batches_run += 1
        self.batch_sizes.append(len(requests))
        self.runner.use_adapters(self._adapters_for(requests[0].adapter))
        batch = LlamaCppBatch(self.runner, self.tokenizer, self.shim, lambda r: None)
        waiting = list(requests)
        try:
            while waiting or batch:
                admitted: list[Request] = []
                while waiting and batch.fits(waiting[0], admitted):
                    admitted.append(waiting.pop(0))
                if admitted:
                    batch.add(admitted)
                if batch:
                    batch.step()
        except BaseException as e:
            batch.fail_all(e)
            raise

    def _worker(self) -> None:
        pending: list[Request] = []
        try:
            self._loop(pending)
        except BaseException as e:  # noqa: BLE001 - a broken worker must not leave clients waiting forever
            log.exception("the llama.cpp worker stopped")
            while True:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is not None:
                    pending.append(item)
            for r in pending:
                if not r.finished.is_set():
                    r.error = e
                    r._finish()

    def _loop(self, pending: list[Request]) -> None:
        """Continuous batching: arrivals join the running batch between steps; adapters take turns."""
        batch = LlamaCppBatch(self.runner, self.tokenizer, self.shim, lambda r: r._finish())
        adapter: str | None = None
        while True:
            if not batch and not pending:
                first = self._queue.get()
                if first is None:
                    return
                pending.extend(self._gather(first))
            if not self._take_arrivals(pending, batch):
                return
            if not batch and pending:
                adapter = pending[0].adapter
            admit = [r for r in pending if r.adapter == adapter]
            with self._lock:
                try:
                    self.runner.use_adapters(self._adapters_for(adapter))
                    admitted: list[Request] = []
                    for r in admit:  # each admission reserves its KV cells
                        if len(batch) + len(admitted) >= min(self.max_batch_size, self.runner.n_seq) or \
                                not batch.fits(r, admitted):
                            break
                        pending.remove(r)
                        admitted.append(r)
                    if admitted:
                        batch.add(admitted)  # their prompts prefilled together
                        self.batches_run += 1
                        self.batch_sizes.append(len(batch))
                    if batch:
                        batch.step()
                except Exception as e:  # noqa: BLE001 (reported to each request's owner)
                    log.exception("generation failed")
                    batch.fail_all(e)

    def close(self) -> None:
        super().close()
        if self._thread is None or not self._thread.is_alive():
            self.runner.close()

