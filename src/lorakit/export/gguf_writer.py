"""Write an HF folder of a supported family as a GGUF file llama.cpp runs, with the `gguf` package.

The family registry (`models/families.py`) gives the tensor names, whether q/k rows are permuted to
llama.cpp's interleaved rotary layout (LLaMA/Mistral), the norm shift (Gemma stores 1 + w) and the
family's GGUF keys (`gguf_metadata`). Tensors are streamed: the header (metadata + tensor infos) is
written from the safetensors headers, then each tensor is read, transformed, converted and written,
one at a time. Norms and biases stay F32 (as llama.cpp's converter does); `q8_0` falls back to F16 for
rows not divisible by the 32-element block. Tied embeddings are written once (llama.cpp reuses
`token_embd` when `output` is absent). Llama 3 RoPE scaling adds llama.cpp's `rope_freqs` tensor.
"""

from __future__ import annotations

import json
import logging
import math
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lorakit.errors import MismatchError
from lorakit.export.gguf_metadata import (
    add_general_keys,
    add_model_keys,
    check_gguf_config,
    pre_tokenizer_name,
    rope_factors,
)
from lorakit.formats.safetensors_io import SafetensorsFolder
from lorakit.models.families import family_of_config
from lorakit.models.layout import IGNORED_HF, hf_to_meta_rows, rotary_heads
from lorakit.precision import weight_type

if TYPE_CHECKING:
    import numpy as np
    import torch

log = logging.getLogger("lorakit")


def _ggml_type(dtype: str, shape: list[int]) -> Any:
    """The GGUF type of one tensor of `shape` written as `dtype` (precision.WEIGHT_TYPES)."""
    from gguf import GGMLQuantizationType as Q

    qtype = Q[weight_type(dtype).gguf]
    if len(shape) == 1:
        return Q.F32
    if qtype == Q.Q8_0 and shape[-1] % 32:
        return Q.F16
    return qtype


def _file_type(dtype: str) -> int:
    from gguf import LlamaFileType as F

    return F[weight_type(dtype).gguf_file_type]


def _encode(w: torch.Tensor, qtype: Any) -> np.ndarray:
    """Tensor -> the bytes GGUF stores for `qtype` (F32/F16 arrays, BF16/Q8_0 as uint8 rows)."""
    import torch
    from gguf import GGMLQuantizationType as Q
    from gguf.quants import quantize

    if qtype == Q.F32:
        return w.float().numpy()
    if qtype == Q.F16:
        return w.to(torch.float16).numpy()
    if qtype == Q.BF16:
        return w.to(torch.bfloat16).contiguous().view(torch.uint8).numpy()
    return quantize(w.float().numpy(), Q.Q8_0)


def _byte_shape(shape: list[int], qtype: Any) -> tuple[tuple[int, ...], Any]:
    import numpy as np
    from gguf import GGMLQuantizationType as Q
    from gguf.quants import quant_shape_to_byte_shape

    if qtype == Q.F32:
        return tuple(shape), np.float32
    if qtype == Q.F16:
        return tuple(shape), np.float16
    if qtype == Q.BF16:
        return (*shape[:-1], shape[-1] * 2), np.uint8
    return quant_shape_to_byte_shape(shape, qtype), np.uint8


# ---------------------------------------------------------------------------------------------- tokenizer


def add_tokenizer(writer: Any, model_dir: Path, vocab_rows: int, prefix_from_config: bool = False) -> None:
    """Tokenizer metadata: SentencePiece-style (`llama`: tokens, scores, types) or byte-level BPE
    (`gpt2`: tokens, types, merges, pre-tokenizer), special ids, add_bos/eos, chat template."""
    from gguf import TokenType

    from lorakit.models import load_tokenizer

    tok = load_tokenizer(model_dir, add_pad_token=False)
    n = len(tok)
    if n > vocab_rows:
        raise MismatchError(f"{model_dir}: the tokenizer has {n} tokens but the embeddings only {vocab_rows} rows")
    tj_path = model_dir / "tokenizer.json"
    tj = json.loads(tj_path.read_text()) if tj_path.is_file() else {}
    model = tj.get("model", {})
    byte_level = model.get("type") == "BPE" and not model.get("byte_fallback") and "ByteLevel" in json.dumps(
        tj.get("pre_tokenizer") or {})
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]

    tokens = tok.convert_ids_to_tokens(list(range(n)))
    special_ids = set(tok.all_special_ids)
    added = {i: t for t, i in tok.get_added_vocab().items()}
    added_special = {t["id"] for t in tj.get("added_tokens", []) if t.get("special")}
    types = []
    for i, t in enumerate(tokens):
        if i == tok.unk_token_id and not byte_level:
            types.append(TokenType.UNKNOWN)
        elif i in special_ids or i in added_special:
            types.append(TokenType.CONTROL)
        elif i in added:
            types.append(TokenType.USER_DEFINED)
        elif not byte_level and re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", t):
            types.append(TokenType.BYTE)
        else:
            types.append(TokenType.NORMAL)
    # Embedding rows beyond the tokenizer (vocab padded to a multiple): placeholders llama.cpp skips.
    tokens += [f"[PAD{i}]" for i in range(n, vocab_rows)]
    types += [TokenType.UNUSED] * (vocab_rows - n)

    if byte_level:
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(pre_tokenizer_name(tok, tj))
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        writer.add_token_merges(merges)
    else:
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
        writer.add_token_list(tokens)
        writer.add_token_scores(_spm_scores(model_dir, tokens, merges))
        writer.add_token_types(types)
        if merges:
            writer.add_token_merges(merges)
    for kind in ("bos", "eos", "unk", "pad"):
        tid = getattr(tok, f"{kind}_token_id")
        if tid is not None:
            getattr(writer, f"add_{kind}_token_id")(int(tid))
    probe = tok("a")["input_ids"]
    writer.add_add_bos_token(bool(probe) and tok.bos_token_id is not None and probe[0] == tok.bos_token_id)
    if bool(probe) and tok.eos_token_id is not None and probe[-1] == tok.eos_token_id:
        writer.add_add_eos_token(True)  # written only when set, as llama.cpp's converter does
    tc_path = model_dir / "tokenizer_config.json"
    prefix = json.loads(tc_path.read_text()).get("add_prefix_space") if tc_path.is_file() else None
    if prefix_from_config and byte_level and prefix is not None:  # as llama.cpp's LlamaModel.set_vocab
        writer.add_add_space_prefix(bool(prefix))
    if not byte_level:  # SentencePiece's add_dummy_prefix: a "▁" before the text (Metaspace or a Prepend)
        spec = json.dumps(tj.get("normalizer") or {}) + json.dumps(tj.get("pre_tokenizer") or {})
        writer.add_add_space_prefix(not tj or '"Prepend"' in spec or '"prepend_scheme": "first"' in spec
                                    or '"prepend_scheme": "always"' in spec)
    if getattr(tok, "chat_template", None):
        writer.add_chat_template(tok.chat_template)


def _spm_scores(model_dir: Path, tokens: list[str], merges: list[str]) -> list[float]:
    """SentencePiece scores: from tokenizer.model when present; else -rank of the merge making each token
    (llama.cpp's SPM tokenizer merges the best-scoring pair first, i.e. BPE merge order)."""
    sp_file = model_dir / "tokenizer.model"
    if sp_file.is_file():
        from sentencepiece import SentencePieceProcessor

        sp = SentencePieceProcessor(model_file=str(sp_file))
        return [float(sp.GetScore(i)) if i < sp.vocab_size() else -1000.0 for i in range(len(tokens))]
    rank = {m.replace(" ", ""): -float(i) for i, m in reversed(list(enumerate(merges)))}
    return [rank.get(t, 0.0 if len(t) == 1 else -1e6) for t in tokens]


# ---------------------------------------------------------------------------------------------- writer


def write_gguf(model_dir: Path, out_path: Path, dtype: str = "f16", name: str | None = None) -> None:
    """Write the HF model in `model_dir` (any family of the registry) to `out_path` (the caller renames it
    into place) with its 2-D weights as `dtype` (f32, f16, bf16, q8_0)."""
    import numpy as np
    import torch
    from gguf import GGUFWriter
    from tqdm import tqdm

    config = json.loads((model_dir / "config.json").read_text())
    family = family_of_config(config, str(model_dir))
    check_gguf_config(family, config, str(model_dir))
    src = SafetensorsFolder(model_dir)
    names = [n for n in src.names if not IGNORED_HF.fullmatch(n)]
    family.check_names(names, str(model_dir))
    vocab_rows = src.shape("model.embed_tokens.weight")[0]

    plan: list[tuple[str | None, str, Any]] = []  # (HF name or None for rope_freqs, GGUF name, type)
    infos = []
    for n in names:
        mapped = family.map_hf(n)
        assert mapped is not None
        shape = src.shape(n)
        qtype = _ggml_type(dtype, shape)
        infos.append((mapped.gguf, shape, qtype))
        plan.append((n, mapped.gguf, qtype))
    factors = rope_factors(config)
    if factors is not None:  # Llama 3 scaling: llama.cpp reads it from this tensor
        infos.append(("rope_freqs.weight", [len(factors)], _ggml_type("f32", [len(factors)])))
        plan.append((None, "rope_freqs.weight", infos[-1][2]))

    w = GGUFWriter(out_path, family.gguf_arch)
    for gguf_name, shape, qtype in infos:
        byte_shape, np_dtype = _byte_shape(shape, qtype)
        nbytes = math.prod(byte_shape) * np.dtype(np_dtype).itemsize
        w.add_tensor_info(gguf_name, byte_shape, np_dtype, nbytes, raw_dtype=qtype)
    total_params = sum(math.prod(shape) for _, shape, _ in infos)
    add_general_keys(w, model_dir, name, total_params)
    add_model_keys(w, family, config, vocab_rows, _file_type(dtype))
    add_tokenizer(w, model_dir, vocab_rows, prefix_from_config=family.gguf_arch == "llama")
    try:
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for n, _gguf_name, qtype in tqdm(plan, desc="writing GGUF", unit="tensor", leave=False):
            if n is None:
                w.write_tensor_data(_encode(torch.tensor(factors, dtype=torch.float32), qtype))
                continue
            t = src.get(n)
            mapped = family.map_hf(n)
            assert mapped is not None
            heads_for = rotary_heads(mapped.rule, config) if family.permute_qk else None
            if heads_for:
                t = hf_to_meta_rows(t, heads_for)
            if family.gguf_norm_shift and n.endswith("norm.weight"):
                t = t.float() + family.gguf_norm_shift
            w.write_tensor_data(_encode(t, qtype))
    finally:
        w.close()
        src.close()
