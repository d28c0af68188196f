"""GGUF metadata as llama.cpp's own converter (convert_hf_to_gguf.py) writes it, per model family.

Generic keys (every family): general.type/name/size_label... (gguf's `Metadata`, as the converter uses
it), block count, context/embedding/feed-forward lengths, head counts, RoPE base and scaling, RMS
epsilon, attention.key_length/value_length when config.json has `head_dim`, file type and the
quantization version. Family keys (`Family.gguf_keys`): LLaMA's vocab_size and rope.dimension_count,
Gemma 3's sliding window, soft-capping and its defaults.

The pre-tokenizer name (`tokenizer.ggml.pre`) is found as llama.cpp finds it: the tokenizer encodes a
fixed test text and the SHA-256 of the id list names the pre-tokenizer (`KNOWN_PRE_TOKENIZERS`, hashes
read from llama.cpp's converter for the tokenizers of the families lorakit supports).
"""

from __future__ import annotations

import json
import logging
from hashlib import sha256
from pathlib import Path
from typing import Any

from lorakit.errors import MismatchError
from lorakit.models.families import Family, rope_parameters, sliding_rope_theta

log = logging.getLogger("lorakit")

# llama.cpp's test text for pre-tokenizer detection (convert_hf_to_gguf.py, get_vocab_base_pre).
CHECK_TEXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ "
    "🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ "
    "------======= нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you "
    "sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL"
)

# sha256(str(ids)) of CHECK_TEXT -> llama.cpp's pre-tokenizer name (from llama.cpp's converter).
KNOWN_PRE_TOKENIZERS = {
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",  # SmolLM / SmolLM2
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # Llama 3.x
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",  # Qwen1.5/2/2.5
    "d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c": "qwen2",  # Qwen3
    "63b97e4253352e6f357cc59ea5b583e3a680eaeaf2632188c2b952de2588485e": "tekken",  # Mistral Nemo
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",  # GPT-2
}


def tokenizer_hash(tok: Any) -> str:
    """The hash llama.cpp's converter computes for a tokenizer (special tokens added as it encodes)."""
    return sha256(str(tok.encode(CHECK_TEXT)).encode()).hexdigest()


def pre_tokenizer_name(tok: Any, tokenizer_json: dict[str, Any]) -> str:
    """llama.cpp's name for the pre-tokenizer of a byte-level BPE tokenizer: by hash as llama.cpp does;
    for an unknown hash, a guess from tokenizer.json's split rules (with a warning: llama.cpp's
    converter refuses such a tokenizer outright)."""
    name = KNOWN_PRE_TOKENIZERS.get(tokenizer_hash(tok))
    if name is not None:
        return name
    backend = getattr(tok, "backend_tokenizer", None)  # the split rules the loaded tokenizer really uses
    tj = json.loads(backend.to_str()) if backend is not None else tokenizer_json
    pre = json.dumps(tj.get("pre_tokenizer") or {}).replace("\\\\", "\\")  # regexes with single backslashes
    if '"Digits"' in pre and '"individual_digits": true' in pre and "ByteLevel" in pre:
        guess = "smollm"
    elif "\\p{N}{1,3}" in pre:
        guess = "llama-bpe"
    elif "\\p{L}+|\\p{N}|" in pre:
        guess = "qwen2"  # Qwen's split: letters, single digits
    elif '"ByteLevel"' in pre and '"use_regex": true' in pre:
        guess = "gpt-2"
    else:
        guess = "default"
    log.warning("tokenizer not in llama.cpp's pre-tokenizer table (hash %s); writing %r from its split rules "
                "(llama.cpp may split some text differently)", tokenizer_hash(tok)[:12], guess)
    return guess


def _rope(writer: Any, config: dict[str, Any]) -> None:
    """RoPE keys as llama.cpp's generic part writes them (Llama 3 scaling is a tensor, see `rope_factors`)."""
    from gguf import RopeScalingType

    params = rope_parameters(config)
    rope_type, factor = params.get("rope_type"), params.get("factor")
    if rope_type == "linear" and factor is not None:
        writer.add_rope_scaling_type(RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(factor))
    elif rope_type == "yarn" and factor is not None:
        writer.add_rope_scaling_type(RopeScalingType.YARN)
        writer.add_rope_scaling_factor(float(factor))
        writer.add_rope_scaling_orig_ctx_len(int(params["original_max_position_embeddings"]))
    if params.get("rope_theta") is not None:
        writer.add_rope_freq_base(float(params["rope_theta"]))
    swa_theta = sliding_rope_theta(config)
    if swa_theta is not None:
        writer.add_rope_freq_base_swa(swa_theta)


def check_gguf_config(family: Family, config: dict[str, Any], where: str) -> None:
    """Refuse configs llama.cpp cannot express (RoPE types it has no key for)."""
    rope_type = rope_parameters(config).get("rope_type") or "default"
    if rope_type not in ("default", "llama3", "linear", "yarn"):
        raise MismatchError(f"{where}: RoPE type {rope_type!r} cannot be written to GGUF for {family.name}")
    if config.get("attn_logit_softcapping") is not None:
        raise MismatchError(f"{where}: attention logit soft-capping is not supported by llama.cpp's {family.gguf_arch}")


def rope_factors(config: dict[str, Any]) -> list[float] | None:
    """Llama 3 RoPE scaling as llama.cpp stores it: one factor per rotary frequency (head_dim / 2), by which
    llama.cpp divides that frequency; None when the model has no such scaling. Same rule as transformers'
    `_compute_llama3_parameters`: long wavelengths scaled by `factor`, short ones kept, smooth between."""
    import math

    params = rope_parameters(config)
    if str(params.get("rope_type", "")).lower() != "llama3":
        return None
    theta = float(params.get("rope_theta", 10000.0))
    dim = int(config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"])
    factor = float(params.get("factor", 8.0))
    low, high = float(params.get("low_freq_factor", 1.0)), float(params.get("high_freq_factor", 4.0))
    old_ctx = float(params.get("original_max_position_embeddings", 8192))
    out = []
    for i in range(0, dim, 2):
        wavelen = 2 * math.pi * theta ** (i / dim)
        if wavelen < old_ctx / high:
            out.append(1.0)
        elif wavelen > old_ctx / low:
            out.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            out.append(1.0 / ((1 - smooth) / factor + smooth))
    return out


def add_model_keys(writer: Any, family: Family, config: dict[str, Any], vocab_rows: int, file_type: int) -> None:
    """Hyper-parameter keys: llama.cpp's generic ones, then the family's (`Family.gguf_keys`)."""
    config = {**dict(family.gguf_config_defaults), **{k: v for k, v in config.items() if v is not None}}
    writer.add_block_count(int(config["num_hidden_layers"]))
    if config.get("max_position_embeddings") is not None:
        writer.add_context_length(int(config["max_position_embeddings"]))
    writer.add_embedding_length(int(config["hidden_size"]))
    writer.add_feed_forward_length(int(config["intermediate_size"]))
    writer.add_head_count(int(config["num_attention_heads"]))
    writer.add_head_count_kv(int(config.get("num_key_value_heads") or config["num_attention_heads"]))
    _rope(writer, config)
    if config.get("rms_norm_eps") is not None:
        writer.add_layer_norm_rms_eps(float(config["rms_norm_eps"]))
    head_dim = config.get("head_dim")
    if head_dim is not None:
        writer.add_key_length(int(head_dim))
        writer.add_value_length(int(head_dim))
    writer.add_file_type(file_type)
    for key in family.gguf_keys:
        if key == "vocab_size":
            writer.add_vocab_size(vocab_rows)
        elif key == "rope.dimension_count":
            writer.add_rope_dimension_count(int(head_dim or config["hidden_size"] // config["num_attention_heads"]))
        elif key == "attention.sliding_window":
            if config.get("sliding_window_pattern") != 1 and config.get("sliding_window") is not None:
                writer.add_sliding_window(int(config["sliding_window"]))
        elif key == "final_logit_softcapping":
            if config.get("final_logit_softcapping"):
                writer.add_final_logit_softcapping(float(config["final_logit_softcapping"]))
        else:  # a registry entry naming a key this writer cannot compute: a programming error
            raise AssertionError(f"GGUF key {key!r} of family {family.name} has no writer")


def add_general_keys(writer: Any, model_dir: Path, name: str | None, total_params: int) -> None:
    """general.* as llama.cpp's converter writes them: gguf's `Metadata` (name, basename, size label,
    licence... from the model card, config and folder name), general.type = model, quantization version."""
    from gguf import GGML_QUANT_VERSION, GGUFType, Metadata, size_label

    meta = Metadata.load(None, model_dir, name, total_params)
    if meta.name is None:
        meta.name = model_dir.name
    if meta.size_label is None and total_params > 0:
        meta.size_label = size_label(total_params, total_params, 0, 0)
    writer.add_type(GGUFType.MODEL)
    meta.set_gguf_meta_model(writer)
    writer.add_quantization_version(GGML_QUANT_VERSION)
