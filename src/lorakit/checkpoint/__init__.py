"""Writing a whole model checkpoint and checking it, shared by `merge` and `export` (below both).

- `output`: output folders/files written atomically; the tokenizer files that go with a model.
- `pth`: Meta's `consolidated.NN.pth` + `params.json` layout, written and read back.
- `verify`: logits of a written model against a reference, with tolerances per weight type.

It builds on `models/` (tensor-name layouts, loading) and `formats/`; no verb group is imported here.
"""
