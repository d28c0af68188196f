"""The one generation engine every front end (CLI, batch file, web page, API server) uses.

- `generate_batch(model, tokenizer, prompts, params)`: plain batched generation (training/eval code).
- `Engine`: model + adapters + prompt template loaded once, a batching worker, streaming.
"""

from lorakit.generate.batch import generate_batch, run_batch
from lorakit.generate.params import GenerationParams, Request
from lorakit.generate.runner import Engine, PromptTooLongError, TextStream, UnknownModelError

__all__ = ["Engine", "GenerationParams", "PromptTooLongError", "Request", "TextStream", "UnknownModelError",
           "generate_batch", "run_batch"]
