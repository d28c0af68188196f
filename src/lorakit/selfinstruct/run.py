"""`lorakit self-instruct`: ask an OpenAI-compatible endpoint for tasks until N good ones are kept.

Flow: open the output (repair, count, prime de-duplication) -> C workers each loop {build prompt,
request with retries, parse, validate with `lorakit.data.parse_record`, de-duplicate, append} -> stop
at exactly N kept examples (or when the request budget is spent) -> print a summary.

All bookkeeping happens on the event loop's single thread between awaits, so "check the count, write,
count" is atomic: concurrent replies can never push the file past N.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from lorakit.data import parse_record
from lorakit.errors import ConfigError, DataError
from lorakit.selfinstruct.client import ChatClient, Reply
from lorakit.selfinstruct.config import SelfInstructConfig
from lorakit.selfinstruct.dedup import DuplicateFilter
from lorakit.selfinstruct.parse import normalize_item, parse_reply
from lorakit.selfinstruct.prompts import PromptBuilder, load_seed_tasks, load_topics
from lorakit.selfinstruct.writer import ResumableJsonlWriter

log = logging.getLogger("lorakit")
DROP_REASONS = ("malformed", "missing_field", "duplicate", "similar")


@dataclass
class Stats:
    """Counts of a self-instruct run: target, existing records, requests, retries and what was kept or dropped."""

    target: int = 0
    existing: int = 0  # valid records already in the output when the run started
    repaired_bytes: int = 0  # partial last line cut off on start
    requests: int = 0  # replies received (after retries)
    retries: Counter = field(default_factory=Counter)  # reason -> count
    unparseable: int = 0  # replies holding no JSON array/object
    truncated: int = 0  # replies cut by max_tokens (finish_reason == "length")
    items: int = 0  # candidate items found in replies
    kept: int = 0  # appended in this run
    dropped: Counter = field(default_factory=Counter)  # reason -> count
    surplus: int = 0  # valid-looking items left unused once N was reached
    prompt_tokens: int = 0
    completion_tokens: int = 0
    seconds: float = 0.0
    budget_exhausted: bool = False

    @property
    def total(self) -> int:
        return self.existing + self.kept

    def as_dict(self) -> dict[str, Any]:
        return {"target": self.target, "existing": self.existing, "kept": self.kept, "total": self.total,
                "requests": self.requests, "retries": dict(self.retries), "unparseable": self.unparseable,
                "truncated": self.truncated, "items": self.items,
                "dropped": {r: self.dropped[r] for r in DROP_REASONS}, "surplus": self.surplus,
                "prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "repaired_bytes": self.repaired_bytes, "budget_exhausted": self.budget_exhausted}

    def summary(self, output: str) -> str:
        retry = ", ".join(f"{k}: {v}" for k, v in sorted(self.retries.items())) or "none"
        drops = ", ".join(f"{r}: {self.dropped[r]}" for r in DROP_REASONS)
        return "\n".join([
            f"self-instruct: {output} holds {self.total} of {self.target} examples "
            f"({self.existing} before this run + {self.kept} new)",
            f"  requests: {self.requests} (unparseable replies: {self.unparseable}, truncated: {self.truncated})",
            f"  retries: {sum(self.retries.values())} ({retry})",
            f"  items: {self.items}, kept: {self.kept}, dropped: {sum(self.dropped.values())} ({drops}), "
            f"unused after reaching N: {self.surplus}",
            f"  tokens: {self.prompt_tokens} prompt + {self.completion_tokens} completion = "
            f"{self.prompt_tokens + self.completion_tokens}",
            f"  time: {self.seconds:.1f} s",
        ])


def task_text(record: dict[str, Any]) -> str:
    """What near-duplicates are judged on: the instruction and its input (the same task, asked again)."""
    return f"{record.get('instruction', '')}\n{record.get('input', '') or ''}"


def validate_item(item: Any) -> tuple[dict[str, str] | None, str | None]:
    """(alpaca record, None) or (None, drop reason). Uses the training data's own validator."""
    item = normalize_item(item)
    if not isinstance(item, dict):
        return None, "malformed"
    record = {k: item[k] for k in ("instruction", "input", "output") if item.get(k) is not None}
    if "instruction" not in record or "output" not in record:
        return None, "missing_field"
    try:
        ex = parse_record(record)
    except DataError as e:
        return None, "missing_field" if e.reason in ("missing", "must not be empty") else "malformed"
    return {"instruction": (ex.instruction or "").strip(), "input": (ex.input or "").strip(),
            "output": (ex.output or "").strip()}, None


class _Generator:
    def __init__(self, cfg: SelfInstructConfig, client: ChatClient, builder: PromptBuilder,
                 writer: ResumableJsonlWriter, dedup: DuplicateFilter, stats: Stats, progress: Any):
        self.cfg, self.client, self.builder = cfg, client, builder
        self.writer, self.dedup, self.stats, self.progress = writer, dedup, stats, progress
        self.started = 0
        self.budget = cfg.request_budget()

    def done(self) -> bool:
        return self.stats.total >= self.cfg.num_examples

    async def worker(self) -> None:
        while not self.done():
            if self.started >= self.budget:
                self.stats.budget_exhausted = True
                return
            self.started += 1
            reply = await self.client.complete(self.builder.messages())
            self.handle(reply)

    def handle(self, reply: Reply) -> None:
        st = self.stats
        st.requests += 1
        st.prompt_tokens += reply.prompt_tokens
        st.completion_tokens += reply.completion_tokens
        st.truncated += reply.finish_reason == "length"
        parsed = parse_reply(reply.text)
        if not parsed.found:
            st.unparseable += 1
            log.debug("reply %d holds no JSON: %.200r", st.requests, reply.text)
        st.items += len(parsed.items) + parsed.malformed
        st.dropped["malformed"] += parsed.malformed
        for raw in parsed.items:
            if self.done():
                st.surplus += 1
                continue
            record, reason = validate_item(raw)
            if record is not None:
                text = task_text(record)
                reason = self.dedup.check(text)
                if reason is None:
                    self.writer.append(record)
                    self.dedup.add(text)
                    st.kept += 1
                    if self.progress is not None:
                        self.progress.update(1)
                    continue
            st.dropped[reason] += 1
        if self.progress is not None:
            self.progress.set_postfix(kept=st.kept, req=st.requests, dropped=sum(st.dropped.values()),
                                      unparseable=st.unparseable, retries=sum(self.client.retries.values()),
                                      refresh=False)

    async def run(self) -> None:
        tasks = [asyncio.create_task(self.worker()) for _ in range(self.cfg.concurrency)]
        try:
            pending = set(tasks)
            while pending:
                finished, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for task in finished:
                    task.result()  # re-raise a worker's failure (e.g. retries exhausted)
                if self.done():
                    break
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self.stats.retries = Counter(self.client.retries)
            await self.client.close()


def generate(cfg: SelfInstructConfig, api_key: str, *, progress: bool = True) -> Stats:
    """Run self-instruct to completion and return the statistics (raises `LorakitError` on failure).

    On failure the statistics so far are attached to the exception as `.stats`.
    """
    topics = load_topics(cfg.topics) if cfg.topics else None
    seeds = load_seed_tasks(cfg.seed_tasks) if cfg.seed_tasks else None
    stats = Stats(target=cfg.num_examples)
    start = time.monotonic()
    dedup = DuplicateFilter(cfg.similarity_threshold)
    for seed in seeds or []:  # generated copies of the seed tasks are duplicates too
        dedup.add(task_text(seed.as_dict()))
    writer = ResumableJsonlWriter(cfg.output)
    existing = writer.open()
    try:
        stats.existing, stats.repaired_bytes = len(existing), writer.repaired_bytes
        for record in existing:
            dedup.add(task_text(record))
        if stats.total >= cfg.num_examples:
            log.info("%s already holds %d examples (asked for %d): nothing to do", cfg.output, stats.total,
                     cfg.num_examples)
            return stats
        rng = random.Random(cfg.seed)
        builder = PromptBuilder(cfg.language, cfg.per_request, topics=topics, seed_tasks=seeds,
                                seed=rng.randrange(2**32))
        client = ChatClient(cfg.api_base, cfg.model, api_key, timeout=cfg.timeout, max_retries=cfg.max_retries,
                            backoff=cfg.backoff, temperature=cfg.temperature, max_tokens=cfg.max_tokens,
                            rng=random.Random(rng.randrange(2**32)))
        bar = _progress_bar(cfg, stats) if progress else None
        try:
            asyncio.run(_Generator(cfg, client, builder, writer, dedup, stats, bar).run())
        except BaseException as e:
            e.stats = stats  # type: ignore[attr-defined]
            raise
        finally:
            if bar is not None:
                bar.close()
        return stats
    finally:
        stats.seconds = time.monotonic() - start
        writer.close()


def _progress_bar(cfg: SelfInstructConfig, stats: Stats) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=cfg.num_examples, initial=stats.existing, desc="self-instruct", unit="ex",
                file=sys.stderr, dynamic_ncols=True)


class _RedactFilter(logging.Filter):
    """Replaces the API key in any log record (ours, openai's, httpx's) by ***."""

    def __init__(self, secret: str):
        super().__init__()
        self.secret = secret

    def filter(self, record: logging.LogRecord) -> bool:
        if len(self.secret) < 6:  # a placeholder such as EMPTY, not a secret worth rewriting logs for
            return True
        message = record.getMessage()
        if self.secret in message:
            record.msg, record.args = message.replace(self.secret, "***"), None
        return True


def _api_key(cfg: SelfInstructConfig) -> str:
    key = os.environ.get(cfg.api_key_env, "")
    if key:
        return key
    if cfg.api_key_env != "OPENAI_API_KEY":
        raise ConfigError(f"environment variable {cfg.api_key_env} (--api-key-env) is not set")
    log.warning("OPENAI_API_KEY is not set: sending a placeholder key (enough for most local servers)")
    return "EMPTY"


# HTTP client libraries log every request at INFO: that would bury the progress bar.
_CHATTY_LOGGERS = ("httpx", "httpx2", "httpcore", "openai")


def run_self_instruct(cfg: SelfInstructConfig) -> int:
    """The `lorakit self-instruct` verb: generate tasks until the target count; returns the exit code."""
    key = _api_key(cfg)
    handlers = logging.getLogger().handlers
    redact = _RedactFilter(key)
    for handler in handlers:
        handler.addFilter(redact)
    quiet = [lg for lg in map(logging.getLogger, _CHATTY_LOGGERS) if lg.level == logging.NOTSET]
    if log.getEffectiveLevel() > logging.DEBUG:
        for logger in quiet:
            logger.setLevel(logging.WARNING)
    try:
        try:
            stats = generate(cfg, key)
        except Exception as e:
            partial = getattr(e, "stats", None)
            if partial is not None:
                print(partial.summary(cfg.output))
            raise
        print(stats.summary(cfg.output))
        if stats.total < cfg.num_examples:
            print(f"stopped after {cfg.request_budget()} requests (--max-requests) with {stats.total} of "
                  f"{cfg.num_examples} examples; run again to continue")
            return 1
        return 0
    finally:
        for handler in handlers:
            handler.removeFilter(redact)
        for logger in quiet:
            logger.setLevel(logging.NOTSET)
