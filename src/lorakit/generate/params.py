"""What one generation asks for (`GenerationParams`) and carries back (`Request`), shared by every
front end and by both batch runners (batch.py: fixed batches through HF `generate`; continuous.py).
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from lorakit.errors import ConfigError


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



def sampling_params(opts: Any) -> GenerationParams:
    """Validated GenerationParams from a verb's SamplingOptions (lorakit.options) flags."""
    return GenerationParams.from_fields(opts, stop=list(opts.stop))


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
