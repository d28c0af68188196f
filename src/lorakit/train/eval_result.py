"""What `lorakit eval` reports, whichever back-end computed it (evaluate.py, evaluate_llamacpp.py)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class EvalResult:
    """Examples and tokens scored, mean token loss, perplexity, and exact match when generation was asked for."""

    examples: int
    tokens: int
    loss: float
    perplexity: float
    exact_match: float | None = None
