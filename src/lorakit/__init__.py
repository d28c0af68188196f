"""lorakit: LoRA instruction tuning, vocabulary extension, merge and export for LLaMA-family models."""

__version__ = "0.1.0"
