"""`lorakit export`: GGUF (native writer) and Meta pth, verified by logits (checkpoint.verify)."""
