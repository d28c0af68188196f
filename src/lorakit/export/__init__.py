"""Exports (GGUF, Meta pth), the shared tensor layouts, and logit round-trip verification."""
