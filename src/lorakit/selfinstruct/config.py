"""Options of `lorakit self-instruct` (no heavy imports: `lorakit --help` stays fast)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from lorakit.config import opt
from lorakit.errors import ConfigError


@dataclass
class SelfInstructConfig:
    """Options of `lorakit self-instruct`."""

    api_base: str = opt(help="OpenAI-compatible endpoint, e.g. https://api.openai.com/v1 or http://127.0.0.1:8000/v1")
    model: str = opt(help="model name sent to the endpoint")
    num_examples: int = opt(help="stop when the output file holds exactly this many kept examples")
    output: str = opt(help="JSONL file of alpaca records (instruction, input, output); appended to and resumed")
    language: Literal["zh", "en"] = opt("en", "language of the built-in prompt, topics and task types")
    seed_tasks: str | None = opt(None, "seed tasks (.json/.jsonl alpaca records, or Self-Instruct records with "
                                       "'instances'): shown as examples in each request instead of topics")
    topics: str | None = opt(None, "text file with one topic per line (replaces the built-in topics)")
    per_request: int = opt(8, "tasks asked for in each request")
    concurrency: int = opt(4, "requests in flight at once")
    temperature: float = opt(1.0, "sampling temperature")
    max_tokens: int = opt(2048, "maximum tokens per reply (a reply cut short still yields its complete items)")
    max_retries: int = opt(5, "retries per request on 429, 5xx, timeouts and connection errors before giving up")
    backoff: float = opt(1.0, "first retry delay in seconds (doubles each retry, with jitter) when the server "
                              "sends no Retry-After")
    timeout: float = opt(120.0, "seconds to wait for one reply")
    similarity_threshold: float = opt(0.7, "drop an example whose instruction+input has a ROUGE-L F1 above this with "
                                           "an already kept one (1.0 keeps all but exact duplicates)")
    max_requests: int = opt(0, "stop after this many requests even if fewer than --num-examples were kept "
                               "(0: 5 x the requests N examples need, at least 20)")
    api_key_env: str = opt("OPENAI_API_KEY", "environment variable holding the API key (never printed)")
    seed: int | None = opt(None, "random seed for topic/task-type/seed-task sampling")

    def validate(self) -> None:
        if not self.api_base.startswith(("http://", "https://")):
            raise ConfigError(f"--api-base must be an http(s) URL, got {self.api_base!r}")
        checks = [(self.num_examples >= 1, "--num-examples must be at least 1"),
                  (self.per_request >= 1, "--per-request must be at least 1"),
                  (self.concurrency >= 1, "--concurrency must be at least 1"),
                  (self.max_retries >= 0, "--max-retries must be 0 or more"),
                  (self.timeout > 0, "--timeout must be positive"),
                  (self.backoff >= 0, "--backoff must be 0 or more"),
                  (self.max_tokens >= 1, "--max-tokens must be at least 1"),
                  (self.max_requests >= 0, "--max-requests must be 0 or more"),
                  (0.0 < self.similarity_threshold <= 1.0, "--similarity-threshold must be in (0, 1]"),
                  (0.0 <= self.temperature <= 2.0, "--temperature must be in [0, 2]"),
                  (bool(self.output), "--output must not be empty")]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)

    def request_budget(self) -> int:
        """The most requests one run makes (`--max-requests`, or a default proportional to N/K)."""
        if self.max_requests:
            return self.max_requests
        return max(20, 5 * -(-self.num_examples // self.per_request))
