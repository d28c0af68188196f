"""The one generation engine every front end (CLI, batch file, web page, API server) uses.

- `generate_batch(model, tokenizer, prompts, params)`: plain batched generation (training/eval code).
- `Engine`: a `ModelSession` (model + adapters + prompt template, loaded once; session.py) served by a
  batching worker with streaming (runner.py).
"""

from lorakit.generate.batch import generate_batch, run_batch
from lorakit.generate.params import GenerationParams, Request
from lorakit.generate.runner import Engine, TextStream
from lorakit.generate.session import ModelSession, PromptTooLongError, UnknownModelError

__all__ = ["Engine", "GenerationParams", "ModelSession", "PromptTooLongError", "Request", "TextStream",
           "UnknownModelError", "generate_batch", "run_batch"]
