"""`Engine`: a model loaded once, plus a background worker that batches concurrent requests.

Dynamic batching: one worker thread owns the model. When idle, it takes the first queued request and
waits a few milliseconds (`gather_ms`, restarting with each arrival) so a burst is prefilled together.
With `continuous` (the default) it then decodes a running batch step by step, and requests that arrive
meanwhile join it at the next step while finished ones leave (see continuous.py); without it, fixed
batches run through HF `generate` one after another (`run_batch`, also used for beam search). Requests
with different adapters take turns. Each request streams text through its callbacks; cancelling a
request (client gone) ends its row at the next token.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lorakit.errors import LorakitError
from lorakit.generate.engine import GenerationParams, Request, run_batch
from lorakit.generate.loading import choose_template, resolve_dtype

if TYPE_CHECKING:
    from lorakit.generate.config import EngineOptions
    from lorakit.prompts import ChatPrompter, Prompter

log = logging.getLogger("lorakit")
_DONE = object()


class PromptTooLongError(LorakitError):
    """The prompt plus the requested new tokens do not fit the model's context."""


class UnknownModelError(LorakitError):
    """A request named a model/adapter the engine does not serve."""


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


class Engine:
    """A loaded model + tokenizer + prompter, served by one batching worker thread."""

    def __init__(self, model: Any, tokenizer: Any, prompter: Prompter | ChatPrompter, *, base_name: str = "base",
                 adapter_names: Sequence[str] = (), merged_name: str | None = None, max_batch_size: int = 16,
                 gather_ms: float = 20.0, continuous: bool = True):
        self.model, self.tokenizer, self.prompter = model, tokenizer, prompter
        self.base_name = base_name
        self.adapter_names = list(adapter_names)  # selectable (unmerged) adapters
        self.merged_name = merged_name            # set when adapters were merged into the weights
        self.max_batch_size = max_batch_size
        self.gather_s = gather_ms / 1000
        self.continuous = continuous  # continuous batching in the worker (else fixed batches)
        self.context_length = int(getattr(model.config, "max_position_embeddings", 0) or 0) or None
        self._queue: queue.Queue[Request | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        # A new thread's OpenMP team does not inherit torch.set_num_threads (measured: the worker ran
        # single-threaded); the worker sets the creating thread's count so both paths compute alike.
        self.num_threads = _torch_threads()
        self.batches_run = 0  # statistics: how many generate calls, and their sizes
        self.batch_sizes: list[int] = []

    # ---- loading -----------------------------------------------------------------------------------
    @classmethod
    def load(cls, opts: EngineOptions, merge: bool | None = None, **kwargs: Any) -> Engine:
        """Load base model, adapters (merged or selectable), tokenizer and prompt template once."""
        from lorakit.models import load_model_and_tokenizer, resolve_adapter_dir
        from lorakit.models.quantize import merge_allowed
        from lorakit.prompts import get_prompter

        specs = opts.adapter_specs()
        merge = merge_allowed(opts, opts.merge if merge is None else merge, len(specs))  # not into 4/8-bit weights
        dirs = [resolve_adapter_dir(p) for _, p in specs]
        model, tokenizer = load_model_and_tokenizer(opts.base_model, opts.tokenizer, [str(d) for d in dirs],
                                                    dtype=resolve_dtype(opts.precision), merge=merge,
                                                    names=[n for n, _ in specs], quantization=opts)
        template = choose_template(opts.prompt_template, tokenizer, dirs)
        prompter = get_prompter(template, tokenizer)
        import torch

        from lorakit.generate.cpu_inference import optimize_for_cpu

        if torch.cuda.is_available() and not getattr(model, "is_quantized", False):  # quantized: placed at load
            model = model.cuda()
        model.eval()
        optimized = optimize_for_cpu(model)  # bf16 on CPU: fused, prepacked layers (~2x faster decoding)
        base_name = opts.base_model if "/" not in opts.base_model else Path(opts.base_model).name
        names = [n for n, _ in specs]
        log.info("engine: %s%s, template %r, %s%s", base_name,
                 f" + {', '.join(names)} ({'merged' if merge else 'separate'})" if names else "",
                 prompter.name, next(model.parameters()).dtype, f" ({optimized})" if optimized else "")
        return cls(model, tokenizer, prompter, base_name=base_name,
                   adapter_names=[] if merge else names,
                   merged_name="+".join(names) if merge and names else None, **kwargs)

    # ---- models and prompts ----------------------------------------------------------------------
    @property
    def model_names(self) -> list[str]:
        """What the server lists: the merged model, or the base and each selectable adapter."""
        if self.merged_name:
            return [self.merged_name]
        return [self.base_name, *self.adapter_names]

    @property
    def default_model(self) -> str:
        return self.merged_name or (self.adapter_names[0] if self.adapter_names else self.base_name)

    def resolve_model(self, name: str | None) -> str | None:
        """Model name -> adapter to activate (None: the weights as loaded, i.e. base or merged)."""
        name = name or self.default_model
        if name in self.adapter_names:
            return name
        if name in (self.merged_name, self.base_name) and (self.merged_name is None or name == self.merged_name):
            return None
        raise UnknownModelError(f"model {name!r} is not served here; available: {', '.join(self.model_names)}")

    def encode(self, prompt: str, special: bool | None = None) -> list[int]:
        """Token ids of a prompt. By default BOS etc. are added except for chat-template prompts, which
        carry their own special tokens; raw completions pass `special=True`."""
        special = self.prompter.kind != "chat" if special is None else special
        return list(self.tokenizer(prompt, add_special_tokens=special)["input_ids"])

    def instruction_ids(self, instruction: str, input: str | None = None) -> list[int]:  # noqa: A002
        return self.encode(self.prompter.generate_prompt(instruction, input or None))

    def chat_ids(self, messages: list[dict[str, str]]) -> list[int]:
        return self.encode(self.prompter.chat_prompt(messages))

    @property
    def template_stops(self) -> list[str]:
        """The chat template's end-of-turn; for alpaca-style templates the start of a next section
        ("\n### Instruction:"), where an under-trained model tends to go on with an invented exchange."""
        stops = list(self.prompter.stop_strings)
        template = getattr(self.prompter, "template", None)
        if template is not None:
            head = template.prompt_no_input.split("{instruction}")[0].rstrip()
            if head:
                stops.append("\n" + head.splitlines()[-1])
        return stops

    def with_template_stops(self, params: GenerationParams) -> GenerationParams:
        from dataclasses import replace

        return replace(params, stop=list(dict.fromkeys([*params.stop, *self.template_stops])))

    def check_length(self, prompt_ids: Sequence[int], params: GenerationParams) -> None:
        if self.context_length and len(prompt_ids) + params.max_new_tokens > self.context_length:
            raise PromptTooLongError(
                f"prompt of {len(prompt_ids)} tokens + max_new_tokens {params.max_new_tokens} exceeds the "
                f"model's context of {self.context_length} tokens")

    # ---- running ---------------------------------------------------------------------------------
    def _run(self, requests: list[Request]) -> None:
        self.batches_run += 1
        self.batch_sizes.append(len(requests))
        with self._adapter_context(requests[0].adapter):
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

    def _adapter_context(self, adapter: str | None) -> Any:
        """Activate `adapter` on an unmerged PeftModel (None: the base weights) for one model call."""
        if not (hasattr(self.model, "disable_adapter") and hasattr(self.model, "set_adapter")):
            return contextlib.nullcontext()
        if adapter is None:
            return self.model.disable_adapter()
        self.model.set_adapter(adapter)
        return contextlib.nullcontext()

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
            while True:  # whatever else arrived meanwhile
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    running.fail_all(None)
                    for r in pending:
                        r.finish_reason = "cancelled"
                        r._finish()
                    return
                pending.append(item)
            for r in [r for r in pending if r.cancelled.is_set()]:
                pending.remove(r)
                r.finish_reason = "cancelled"
                r._finish()
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
                        with self._adapter_context(adapter):
                            running.add(admit)
                        self.batches_run += 1
                        self.batch_sizes.append(len(running))
                    if running:
                        with self._adapter_context(adapter):
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

