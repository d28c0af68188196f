"""`Engine`: a `ModelSession` (session.py) plus a background worker that batches concurrent requests.

Dynamic batching: one worker thread owns the model. When idle, it takes the first queued request and
waits a few milliseconds (`gather_ms`, restarting with each arrival) so a burst is prefilled together.
With `continuous` (the default) it then decodes a running batch step by step, and requests that arrive
meanwhile join it at the next step while finished ones leave (see continuous.py); without it, fixed
batches run through HF `generate` one after another (`run_batch`, also used for beam search). Requests
with different adapters take turns. Each request streams text through its callbacks; cancelling a
request (client gone) ends its row at the next token.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from lorakit.generate.batch import run_batch
from lorakit.generate.params import GenerationParams, Request
from lorakit.generate.session import ModelSession

if TYPE_CHECKING:
    from lorakit.prompts import ChatPrompter, Prompter

log = logging.getLogger("lorakit")
_DONE = object()


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


class Engine(ModelSession):
    """A loaded model + tokenizer + prompter (`ModelSession`), served by one batching worker thread."""

    def __init__(self, model: Any, tokenizer: Any, prompter: Prompter | ChatPrompter, *, base_name: str = "base",
                 adapter_names: Sequence[str] = (), merged_name: str | None = None, max_batch_size: int = 16,
                 gather_ms: float = 20.0, continuous: bool = True):
        super().__init__(model, tokenizer, prompter, base_name=base_name, adapter_names=adapter_names,
                         merged_name=merged_name)
        self.max_batch_size = max_batch_size
        self.gather_s = gather_ms / 1000
        self.continuous = continuous  # continuous batching in the worker (else fixed batches)
        self._queue: queue.Queue[Request | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        # A new thread's OpenMP team does not inherit torch.set_num_threads (docs/performance.md, "The worker
        # thread's thread count"); the worker sets the creating thread's count so both paths compute alike.
        self.num_threads = _torch_threads()
        self.batches_run = 0  # statistics: how many generate calls, and their sizes
        self.batch_sizes: list[int] = []

    # ---- running ---------------------------------------------------------------------------------
    def _run(self, requests: list[Request]) -> None:
        self.batches_run += 1
        self.batch_sizes.append(len(requests))
        with self.adapter_context(requests[0].adapter):
            run_batch(self.model, self.tokenizer, requests)

    def run_now(self, requests: list[Request]) -> None:
        """Run `requests` (one batch key and adapter) in the calling thread; marks them finished."""
        with self._lock:
            try:
                self._run(requests)
            except Exception as e:  # noqa: BLE001 (reported to each request's owner)
                log.exception("generation failed")
                for r in requests:
                    r.error = e
            finally:
                for r in requests:
                    r._finish()

    def submit(self, prompt_ids: Sequence[int], params: GenerationParams, adapter: str | None = None,
               on_text: Callable[[str], None] | None = None,
               on_done: Callable[[Request], None] | None = None) -> Request:
        """Queue a request for the worker (started on first use); returns it at once."""
        params = self.with_template_stops(params.validate())
        self.check_length(prompt_ids, params)
        req = Request(list(prompt_ids), params, adapter, on_text=on_text, on_done=on_done)
        self._ensure_worker()
        self._queue.put(req)
        return req

    def stream(self, prompt_ids: Sequence[int], params: GenerationParams, adapter: str | None = None) -> TextStream:
        """An iterator of text chunks; closing it (or dropping it) cancels the generation."""
        chunks: queue.Queue[Any] = queue.Queue()
        req = self.submit(prompt_ids, params, adapter, on_text=chunks.put, on_done=lambda r: chunks.put(_DONE))
        return TextStream(req, chunks)

    def complete(self, prompt_ids: Sequence[int], params: GenerationParams, adapter: str | None = None,
                 timeout: float | None = None) -> Request:
        req = self.submit(prompt_ids, params, adapter)
        if not req.finished.wait(timeout):
            req.cancel()
            raise TimeoutError("generation timed out")
        if req.error is not None:
            raise req.error
        return req

    def generate_many(self, prompt_ids: Sequence[Sequence[int]], params: GenerationParams, batch_size: int = 8,
                      adapter: str | None = None) -> Iterator[list[Request]]:
        """Batches of finished requests, in order, run in the calling thread (batch files)."""
        params = self.with_template_stops(params.validate())
        for start in range(0, len(prompt_ids), batch_size):
            reqs = [Request(list(ids), params, adapter) for ids in prompt_ids[start:start + batch_size]]
            for r in reqs:
                self.check_length(r.prompt_ids, params)
            if params.seed is not None:  # reproducible but distinct per record
                from dataclasses import replace

                for i, r in enumerate(reqs):
                    r.params = replace(params, seed=params.seed + start + i)
            self.run_now(reqs)
            for r in reqs:
                if r.error is not None:
                    raise r.error
            yield reqs

    def _ensure_worker(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._worker, name="lorakit-generate", daemon=True)
            self._thread.start()

    def _gather(self, first: Request) -> list[Request]:
        """The first request plus whatever arrives in a burst: the window restarts with each arrival
        (a client burst is spread out by connection handling), capped at 5x `gather_ms`."""
        batch = [first]
        start = time.monotonic()
        deadline = start + self.gather_s
        while len(batch) < self.max_batch_size:
            if len(batch) > 1:
                deadline = min(time.monotonic() + self.gather_s, start + 5 * self.gather_s)
            remaining = deadline - time.monotonic()
            try:
                item = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if item is None:
                self._queue.put(None)  # keep the shutdown signal for the loop
                break
            batch.append(item)
        return batch

    def _take_arrivals(self, pending: list[Request], running: Any) -> bool:
        """Move what else has arrived into `pending` and drop cancelled requests; False on shutdown (then
        the running batch is failed and the pending requests cancelled). Shared with the llama.cpp worker."""
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is None:
                running.fail_all(None)
                for r in pending:
                    r.finish_reason = "cancelled"
                    r._finish()
                return False
            pending.append(item)
        for r in [r for r in pending if r.cancelled.is_set()]:
            pending.remove(r)
            r.finish_reason = "cancelled"
            r._finish()
        return True

    def _worker(self) -> None:
        import torch

        torch.set_num_threads(self.num_threads)
        if self.continuous:
            self._continuous_worker()
        else:
            self._static_worker()

    def _continuous_worker(self) -> None:
        """Continuous batching (see continuous.py): arrivals join the running batch at the next step."""
        import torch

        from lorakit.generate.continuous import RunningBatch

        running = RunningBatch(self.model, self.tokenizer, lambda r: r._finish())
        adapter: str | None = None
        pending: list[Request] = []
        while True:
            if not running and not pending:
                first = self._queue.get()
                if first is None:
                    return
                pending.extend(self._gather(first))
            if not self._take_arrivals(pending, running):  # whatever else arrived meanwhile
                return
            if not running and pending:
                head = pending[0]
                if head.params.num_beams > 1:  # beam search: a fixed batch through HF generate
                    group = [r for r in pending if (r.adapter, r.params.batch_key()) ==
                             (head.adapter, head.params.batch_key())][: self.max_batch_size]
                    for r in group:
                        pending.remove(r)
                    self.run_now(group)
                    continue
                adapter = head.adapter
            room = self.max_batch_size - len(running)
            admit = [r for r in pending if r.params.num_beams == 1 and r.adapter == adapter][:max(room, 0)]
            with self._lock, torch.inference_mode():
                try:
                    if admit:
                        for r in admit:
                            pending.remove(r)
                        with self.adapter_context(adapter):
                            running.add(admit)
                        self.batches_run += 1
                        self.batch_sizes.append(len(running))
                    if running:
                        with self.adapter_context(adapter):
                            running.step()
                except Exception as e:  # noqa: BLE001 (reported to each request's owner)
                    log.exception("generation failed")
                    for r in admit:
                        if r not in running.requests and not r.finished.is_set():
                            r.error = e
                            r._finish()
                    running.fail_all(e)

    def _static_worker(self) -> None:
        """Fixed batches through HF generate: a batch runs to its end before the next starts."""
        while True:
            first = self._queue.get()
            if first is None:
                return
            groups: dict[tuple, list[Request]] = {}
            for r in self._gather(first):
                if r.cancelled.is_set():
                    r.finish_reason = "cancelled"
                    r._finish()
                    continue
                groups.setdefault((r.adapter, r.params.batch_key()), []).append(r)
            for group in groups.values():
                self.run_now(group)

    def close(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            self._queue.put(None)
            self._thread.join(timeout=30)


class TextStream:
    """Iterate text chunks of one request; `close()` cancels it. `request` holds the result at the end."""

    def __init__(self, request: Request, chunks: queue.Queue[Any]):
        self.request, self._chunks = request, chunks

    def __iter__(self) -> Iterator[str]:
        try:
            while True:
                item = self._chunks.get()
                if item is _DONE:
                    break
                yield item
        finally:
            self.close()
        if self.request.error is not None:
            raise self.request.error

    def close(self) -> None:
        if not self.request.finished.is_set():
            self.request.cancel()

    def __enter__(self) -> TextStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

