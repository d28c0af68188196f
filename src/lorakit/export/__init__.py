"""`lorakit export`: GGUF (native writer) and Meta pth, verified layer by layer (checkpoint.layerwise)."""
