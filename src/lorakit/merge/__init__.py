"""Streaming LoRA merge over safetensors shards (bounded memory), to HF safetensors or Meta pth.

Entry points: `lorakit.merge.run.merge_model` (library) and `run_merge` (the `lorakit merge` verb).
"""
