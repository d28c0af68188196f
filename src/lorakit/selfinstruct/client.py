"""An async chat client over the official `openai` package, with our own retry policy.

The `openai` client's built-in retries are turned off (`max_retries=0`) so that every retry is counted
and logged here: 408/409/429/5xx answers, timeouts and connection errors are retried with exponential
backoff and jitter, or after exactly the delay the server asks for in `Retry-After`/`retry-after-ms`.
Other errors (400, 401, 403, 404, ...) stop the run with a clear message. The API key is never logged;
server messages are scrubbed of it before they are shown.
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import random
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

from lorakit.errors import LorakitError

log = logging.getLogger("lorakit")
MAX_RETRY_AFTER = 600.0  # seconds; a longer server request is capped (and logged)
MAX_BACKOFF = 60.0


class RequestFailed(LorakitError):
    """A request failed for good (non-retryable answer, or retries exhausted)."""


@dataclass
class Reply:
    """One chat completion: its text (None: no content), token usage and finish reason."""

    text: str | None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str | None = None


def parse_retry_after(headers: Any) -> float | None:
    """Seconds asked for by `retry-after-ms` or `Retry-After` (seconds or an HTTP date), or None."""
    if headers is None:
        return None
    for name, scale in (("retry-after-ms", 0.001), ("retry-after", 1.0)):
        value = headers.get(name)
        if value is None:
            continue
        try:
            seconds = float(value) * scale
        except ValueError:
            if name == "retry-after-ms":
                continue
            try:
                seconds = email.utils.parsedate_to_datetime(value).timestamp() - time.time()
            except (TypeError, ValueError, IndexError, OverflowError):
                continue
        if seconds != seconds:  # NaN
            continue
        return max(0.0, seconds)
    return None


class ChatClient:
    """`await client.complete(messages)` -> Reply, retrying transient failures; counts in `retries`."""

    def __init__(self, api_base: str, model: str, api_key: str, *, timeout: float = 120.0, max_retries: int = 5,
                 backoff: float = 1.0, temperature: float = 1.0, max_tokens: int = 2048,
                 rng: random.Random | None = None):
        from openai import AsyncOpenAI

        self._client = AsyncOpenAI(base_url=api_base, api_key=api_key, timeout=timeout, max_retries=0)
        self._secret = api_key
        self.api_base, self.model = api_base, model
        self.max_retries, self.backoff = max_retries, backoff
        self.temperature, self.max_tokens = temperature, max_tokens
        self.rng = rng or random.Random()
        self.retries: Counter[str] = Counter()  # reason -> count ("429", "5xx", "timeout", "connection", ...)

    def _scrub(self, text: str) -> str:
        return text.replace(self._secret, "***") if len(self._secret) >= 6 else text

    def _classify(self, exc: Exception) -> tuple[str | None, float | None, str]:
        """(retry reason or None if not retryable, server-requested delay, message)."""
        import openai

        if isinstance(exc, openai.APITimeoutError):  # subclass of APIConnectionError: test it first
            return "timeout", None, "timed out"
        if isinstance(exc, openai.APIConnectionError):
            return "connection", None, f"connection error ({exc.__cause__ or exc})"
        if isinstance(exc, openai.APIStatusError):
            status = exc.status_code
            message = f"HTTP {status}: {getattr(exc, 'message', exc)}"
            delay = parse_retry_after(exc.response.headers)
            if status == 429:
                return "429", delay, message
            if status >= 500:
                return "5xx", delay, message
            if status in (408, 409):
                return str(status), delay, message
            return None, None, message
        return None, None, f"{type(exc).__name__}: {exc}"

    async def complete(self, messages: list[dict[str, str]]) -> Reply:
        import openai

        attempt = 0
        while True:
            try:
                response = await self._client.chat.completions.create(
                    model=self.model, messages=messages, temperature=self.temperature,  # type: ignore[arg-type]
                    max_tokens=self.max_tokens)
            except openai.OpenAIError as exc:
                reason, delay, message = self._classify(exc)
                message = self._scrub(message)
                if reason is None:
                    hint = " (check the API key and --api-key-env)" if "401" in message[:9] else ""
                    raise RequestFailed(f"{self.api_base} refused the request: {message}{hint}") from None
                if attempt >= self.max_retries:
                    raise RequestFailed(f"{self.api_base}: giving up after {attempt} retries; last error: "
                                        f"{message}") from None
                if delay is None:
                    delay = min(self.backoff * 2 ** attempt, MAX_BACKOFF) * self.rng.uniform(0.75, 1.0)
                elif delay > MAX_RETRY_AFTER:
                    log.warning("server asked to wait %.0f s; waiting %.0f s", delay, MAX_RETRY_AFTER)
                    delay = MAX_RETRY_AFTER
                self.retries[reason] += 1
                attempt += 1
                log.debug("retry %d/%d in %.2f s after %s", attempt, self.max_retries, delay, message)
                await asyncio.sleep(delay)
                continue
            return _to_reply(response)

    async def close(self) -> None:
        await self._client.close()


def _to_reply(response: Any) -> Reply:
    """Extract text and usage defensively: compatible servers leave out fields or return odd shapes."""
    usage = getattr(response, "usage", None)
    prompt_tokens = int(getattr(usage, "prompt_tokens", 0) or 0)
    completion_tokens = int(getattr(usage, "completion_tokens", 0) or 0)
    choices = getattr(response, "choices", None) or []
    if not choices:
        return Reply(None, prompt_tokens, completion_tokens)
    choice = choices[0]
    message = getattr(choice, "message", None)
    text = getattr(message, "content", None)
    return Reply(text if isinstance(text, str) else None, prompt_tokens, completion_tokens,
                 getattr(choice, "finish_reason", None))
