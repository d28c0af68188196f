"""An importance matrix for llama.cpp's quantizer, computed with torch on the Hugging Face model.

What llama.cpp's `llama-imatrix` collects, per weight matrix W of the transformer blocks (`blk.*`; the
output head only on request there, never here): over every token of the calibration text, the sum of
the squared input activations per input column of W (`in_sum2`, [in]) and the number of tokens
(`counts`). The quantizer weighs each column's rounding error by in_sum2 / counts. Here forward
pre-hooks on the HF linear layers see the same inputs (the q/k row permutation of the GGUF acts on
output rows, so input columns keep HF's order). The text is cut into chunks of `chunk_size` tokens,
each evaluated from an empty context, as llama-imatrix does (with BOS first when the tokenizer adds one).

The file is llama.cpp's GGUF imatrix format: `general.type = imatrix`, `imatrix.datasets`,
`imatrix.chunk_count`, `imatrix.chunk_size`, and per weight `<gguf name>.in_sum2` (F32, [1, in]) and
`<gguf name>.counts` (F32, [1, 1]) (`export/quantize.py: read_imatrix` reads it back).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lorakit.errors import ConfigError

if TYPE_CHECKING:
    import numpy as np

log = logging.getLogger("lorakit")


@dataclass
class ImatrixSummary:
    tensors: int
    chunks: int
    tokens: int


def calibration_chunks(tokenizer: Any, data: Path, chunk_size: int, max_chunks: int) -> list[list[int]]:
    """Token chunks [chunk_size] of the text in `data` (.txt: a document a line; .jsonl: `text`), documents
    joined in order; the last partial chunk is dropped. BOS starts each chunk when the tokenizer adds one."""
    from lorakit.data import read_text_documents

    bos = tokenizer.bos_token_id
    probe = tokenizer("a")["input_ids"]
    add_bos = bos is not None and bool(probe) and probe[0] == bos
    body = chunk_size - 1 if add_bos else chunk_size
    ids: list[int] = []
    for doc in read_text_documents(data):
        ids += tokenizer(doc, add_special_tokens=False)["input_ids"]
        if len(ids) >= body * max_chunks:
            break
    chunks = [([bos] if add_bos else []) + ids[i: i + body] for i in range(0, len(ids) - body + 1, body)]
    chunks = chunks[:max_chunks]
    if not chunks:
        raise ConfigError(f"--imatrix-data {data}: fewer than {chunk_size} tokens of text")
    return chunks


def collect(model: Any, family: Any, chunks: list[list[int]]) -> dict[str, tuple[np.ndarray, int]]:
    """{GGUF weight name: (sum over tokens of x**2 per input column [in] (float64), tokens)} for every linear
    layer of the blocks, from forward pre-hooks while `model` runs each chunk."""
    import torch

    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    handles = []

    def hook_for(name: str):
        def hook(module: Any, args: tuple) -> None:
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            sums[name] = sums.get(name, 0) + x.pow(2).sum(0)
            counts[name] = counts.get(name, 0) + x.shape[0]
        return hook

    for module_name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        gguf_name = family.gguf_name(module_name + ".weight")
        if gguf_name is not None and gguf_name.startswith("blk."):
            handles.append(module.register_forward_pre_hook(hook_for(gguf_name)))
    try:
        with torch.inference_mode():
            for chunk in chunks:
                model(input_ids=torch.tensor([chunk]), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return {name: (sums[name].numpy(), counts[name]) for name in sorted(sums)}


def write_imatrix(stats: dict[str, tuple[np.ndarray, int]], out: Path, datasets: list[str], chunk_size: int,
                  chunk_count: int) -> None:
    """Write `stats` ({GGUF weight name: (in_sum2 [in], tokens)}) as llama.cpp's GGUF imatrix at `out`."""
    import numpy as np
    from gguf import GGUFWriter

    w = GGUFWriter(str(out), arch="")
    w.kv_data[0].pop("general.architecture", None)  # llama-imatrix's files carry no architecture
    w.add_type("imatrix")
    w.add_array("imatrix.datasets", datasets)
    w.add_uint32("imatrix.chunk_count", chunk_count)
    w.add_uint32("imatrix.chunk_size", chunk_size)
    for name, (in_sum2, count) in stats.items():
        w.add_tensor(name + ".in_sum2", np.asarray(in_sum2, dtype=np.float32).reshape(1, -1))
        w.add_tensor(name + ".counts", np.array([[count]], dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def compute_imatrix(model_dir: Path, data: Path, out: Path, chunk_size: int = 512, max_chunks: int = 100
                    ) -> ImatrixSummary:
    """The importance matrix of the HF model `model_dir` on the text `data`, written to `out` (the caller
    renames it into place). fp32 forward passes, one chunk at a time."""
    from lorakit.models import load_model, load_tokenizer
    from lorakit.models.families import family_of_dir

    if not Path(data).is_file():
        raise ConfigError(f"--imatrix-data {data}: no such file")
    family = family_of_dir(model_dir)
    tokenizer = load_tokenizer(model_dir, add_pad_token=False)
    chunks = calibration_chunks(tokenizer, Path(data), chunk_size, max_chunks)
    model = load_model(model_dir, "float32").eval()
    stats = collect(model, family, chunks)
    del model
    write_imatrix(stats, out, [Path(data).name], chunk_size, len(chunks))
    tokens = len(chunks) * chunk_size
    log.info("importance matrix: %d weights, %d chunks x %d tokens of %s", len(stats), len(chunks), chunk_size,
             Path(data).name)
    return ImatrixSummary(len(stats), len(chunks), tokens)
