"""Options of `lorakit serve` and `lorakit webui` (no torch import: these build the CLI flags)."""

from __future__ import annotations

from dataclasses import dataclass

from lorakit.config import opt
from lorakit.errors import ConfigError
from lorakit.generate.config import EngineOptions, SamplingOptions
from lorakit.generate.params import sampling_params


def _check_port(port: int) -> None:
    if not 0 <= port <= 65535:
        raise ConfigError(f"--port {port}: must be 0..65535")


@dataclass
class ServeConfig(EngineOptions):
    """`lorakit serve`: adapters stay separate by default so that each is selectable by name."""

    merge: bool = opt(False, "merge the adapter(s) into the weights (faster; then only the merged model is "
                             "served); by default adapters stay separate, each selectable as a model name")
    host: str = opt("127.0.0.1", "address to bind (127.0.0.1: this machine only)")
    port: int = opt(8000, "TCP port")
    api_key: str | None = opt(None, "require 'Authorization: Bearer KEY' (default: no key; also read from "
                                    "$LORAKIT_API_KEY)")
    max_concurrency: int = opt(16, "most requests generated together in one batch (more wait in the queue)")
    max_tokens_limit: int = opt(2048, "largest max_tokens a request may ask for")
    default_max_tokens: int = opt(256, "max_tokens when a request gives none")
    gather_ms: float = opt(20.0, "how long the batcher waits for more requests to join a batch")

    def validate(self) -> None:
        self.adapter_specs()
        _check_port(self.port)
        if self.max_concurrency < 1:
            raise ConfigError("--max-concurrency must be >= 1")


@dataclass
class WebuiConfig(EngineOptions, SamplingOptions):
    """`lorakit webui`: the sampling options are the sliders' starting values."""

    host: str = opt("127.0.0.1", "address to bind (127.0.0.1: this machine only)")
    port: int = opt(7860, "TCP port")
    share: bool = opt(False, "ask Gradio for a public share link (off by default: nothing leaves this machine)")

    def validate(self) -> None:
        self.adapter_specs()
        sampling_params(self)
        _check_port(self.port)
