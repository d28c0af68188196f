"""File formats read and written by more than one verb, below models/ and every verb group.

- `safetensors_io`: a sharded safetensors checkpoint read lazily (one tensor at a time), written by
  a streaming writer whose peak memory is one tensor; dtype names; `param_count`.

It imports nothing from lorakit but `errors`, so `models/` and every verb may build on it.
"""
