"""The one generation engine every front end (CLI, batch, web page, API server) uses."""

from lorakit.generate.engine import GenerationParams, generate_batch

__all__ = ["GenerationParams", "generate_batch"]
