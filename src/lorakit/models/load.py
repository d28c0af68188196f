"""Load tokenizers, models and LoRA adapters, and check that their vocabularies agree."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from lorakit.errors import MismatchError, ModelNotFoundError
from lorakit.models.adapter_check import check_adapters_fit_base
from lorakit.models.quantize import Quantization, is_quantized, load_quantized, merge_allowed
from lorakit.models.resolve import resolve_adapter_dir, resolve_model_dir
from lorakit.models.validate import validate_tokenizer

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger("lorakit")

# Allowed excess of embedding rows over tokenizer size (models pad their vocab to a multiple of 64/128).
_VOCAB_PADDING_SLACK = 128


def tokenizer_source(model_dir: str | os.PathLike[str], tokenizer: str | os.PathLike[str] | None = None) -> Path:
    """Where the tokenizer is read from: `tokenizer` if given (a folder, `tokenizer.model` or .gguf), else
    `model_dir`."""
    return Path(tokenizer).expanduser() if tokenizer else Path(model_dir)


def load_tokenizer(model_dir: str | os.PathLike[str], tokenizer: str | os.PathLike[str] | None = None,
                   add_pad_token: bool = True) -> PreTrainedTokenizerBase:
    """Load the tokenizer of `model_dir`, or `tokenizer` if given (a folder, `tokenizer.model` or .gguf).

    When `add_pad_token`, makes sure a pad token exists that is not EOS (see `ensure_pad_token`).
    """
    from transformers import AutoTokenizer

    source = tokenizer_source(model_dir, tokenizer)
    validate_tokenizer(source, required=bool(tokenizer) or source.is_dir())
    if source.is_file() and source.suffix == ".model":
        tok = load_sentencepiece_tokenizer(source)
    elif source.is_dir() and (source / "tokenizer.model").is_file() and not (source / "tokenizer.json").is_file():
        tok = load_sentencepiece_tokenizer(source / "tokenizer.model")
    elif source.is_file() and source.suffix == ".gguf":
        tok = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    elif source.is_dir():
        tok = AutoTokenizer.from_pretrained(source)
    elif tokenizer:
        raise ModelNotFoundError(str(tokenizer), [f"tokenizer folder, tokenizer.model or .gguf at {source}"])
    else:
        tok = AutoTokenizer.from_pretrained(resolve_model_dir(model_dir))
    if add_pad_token:
        ensure_pad_token(tok)
    return tok


def load_sentencepiece_tokenizer(model_file: Path) -> PreTrainedTokenizerBase:
    """A LLaMA tokenizer from a bare SentencePiece `.model` (BOS added, as LLaMA does; needs protobuf)."""
    import shutil
    import tempfile

    from transformers import LlamaTokenizer

    with tempfile.TemporaryDirectory() as tmp:  # from_pretrained wants a folder with "tokenizer.model"
        shutil.copy(model_file, Path(tmp) / "tokenizer.model")
        tok = LlamaTokenizer.from_pretrained(tmp, add_bos_token=True, legacy=False)
    tok.name_or_path = str(model_file)
    return tok


def ensure_pad_token(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Give the tokenizer a pad token distinct from EOS. Returns True if a new token was added.

    Padding with EOS teaches nothing wrong when pads are masked, but a collator or generation loop
    that treats pad as "end" then cuts real EOS tokens. Like alpaca-lora we prefer the unknown token
    (id 0 for LLaMA); only when there is none do we add `<pad>` (the vocab grows by one, as in
    Chinese-Alpaca's 49954).
    """
    if tokenizer.pad_token is not None and tokenizer.pad_token_id != tokenizer.eos_token_id:
        return False
    if tokenizer.unk_token is not None and tokenizer.unk_token_id != tokenizer.eos_token_id:
        tokenizer.pad_token = tokenizer.unk_token
        return False
    tokenizer.add_special_tokens({"pad_token": "<pad>"})
    return True


def embedding_rows(model: PreTrainedModel) -> int:
    """Rows of the input embedding of `model` (its vocabulary size as loaded)."""
    return int(model.get_input_embeddings().weight.shape[0])


def check_vocab(tokenizer: PreTrainedTokenizerBase, model: PreTrainedModel, allow_resize: bool = False,
                what: str = "the model") -> None:
    """Refuse a tokenizer/model vocabulary mix-up with a clear message; resize only when allowed."""
    n_tok, n_emb = len(tokenizer), embedding_rows(model)
    if n_tok > n_emb and allow_resize:
        resize_embeddings(model, n_tok)
        return
    check_vocab_rows(n_tok, n_emb, what)


def check_vocab_rows(n_tok: int, n_emb: int, what: str = "the model") -> None:
    """`check_vocab` on sizes alone (for checkpoints that are not loaded, e.g. a streaming merge)."""
    if n_tok > n_emb:
        raise MismatchError(
            f"the tokenizer has {n_tok} tokens but {what}'s embeddings have {n_emb} rows: token ids "
            f">= {n_emb} would crash or read garbage. Use the tokenizer the model was trained with, or "
            "an extended model (merged after vocabulary pre-training) that matches this tokenizer.")
    if n_emb - n_tok > _VOCAB_PADDING_SLACK:
        raise MismatchError(
            f"the tokenizer has {n_tok} tokens but {what}'s embeddings have {n_emb} rows: this looks like "
            "a base tokenizer used with an extended-vocabulary model. Pass the extended tokenizer (--tokenizer).")


def resize_embeddings(model: PreTrainedModel, new_rows: int) -> None:
    """Grow (or shrink) the embedding and output matrices; new rows start at the mean of the old ones.

    Mean initialisation keeps the new tokens' logits ordinary at the start of training instead of
    random (which spikes the loss); the same is done for an untied lm_head.
    """
    import torch

    old = embedding_rows(model)
    if new_rows == old:
        return
    model.resize_token_embeddings(new_rows, mean_resizing=False)
    if new_rows > old:
        with torch.no_grad():
            emb = model.get_input_embeddings().weight
            emb[old:] = emb[:old].mean(dim=0, keepdim=True)
            head = model.get_output_embeddings()
            if head is not None and head.weight.data_ptr() != emb.data_ptr():
                head.weight[old:] = head.weight[:old].mean(dim=0, keepdim=True)
    log.info("resized embeddings %d -> %d rows", old, new_rows)


def load_model(model_dir: str | os.PathLike[str], dtype: torch.dtype | str | None = None,
               attn_implementation: str = "sdpa", quantization: Quantization | None = None) -> PreTrainedModel:
    """Load a causal LM from an alias, .gguf or HF folder (resolved through `resolve_model_dir`);
    with `quantization` (QuantizationOptions asking for 8bit/4bit) through models/quantize.py."""
    import torch
    from transformers import AutoModelForCausalLM

    folder = resolve_model_dir(model_dir)
    if isinstance(dtype, str):
        from lorakit.precision import torch_dtype

        dtype = torch_dtype(dtype)
    if is_quantized(quantization):
        return load_quantized(folder, quantization, dtype or torch.float32, attn_implementation)
    return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype or torch.float32,
                                                attn_implementation=attn_implementation)


def adapter_vocab_size(adapter_dir: str | os.PathLike[str]) -> int | None:
    """Rows of the full embedding saved in an adapter (modules_to_save after vocab extension), if any."""
    from safetensors import safe_open

    path = Path(adapter_dir) / "adapter_model.safetensors"
    if not path.is_file():
        return None
    with safe_open(str(path), framework="pt") as f:
        for key in f.keys():  # noqa: SIM118 (safe_open is not a dict)
            if "embed_tokens" in key and "lora_" not in key:
                return int(f.get_slice(key).get_shape()[0])
    return None


def attach_adapters(model: PreTrainedModel, adapters: Sequence[str | os.PathLike[str]],
                    names: Sequence[str] | None = None, merge: bool = False):
    """Load LoRA adapters onto `model` (resizing for extended-vocab adapters).

    With `merge`, the adapters are merged in the given order and a plain model is returned;
    otherwise a PeftModel with every adapter loaded (the first one active).
    """
    from peft import PeftModel

    if not adapters:
        return model
    dirs = [resolve_adapter_dir(a) for a in adapters]
    names = list(names) if names else [f"adapter{i}" if i else "default" for i in range(len(dirs))]
    for d in dirs:
        rows = adapter_vocab_size(d)
        if rows is not None and rows != embedding_rows(model):
            resize_embeddings(model, rows)
        base_cfg = json.loads((d / "adapter_config.json").read_text())
        log.info("loading adapter %s (r=%s, targets=%s)", d, base_cfg.get("r"), base_cfg.get("target_modules"))
    peft_model = PeftModel.from_pretrained(model, str(dirs[0]), adapter_name=names[0])
    for d, name in zip(dirs[1:], names[1:], strict=True):
        peft_model.load_adapter(str(d), adapter_name=name)
    if merge:
        return peft_model.merge_and_unload(adapter_names=names)
    return peft_model


def adapter_tokenizer_dir(adapter_dirs: Sequence[str | os.PathLike[str]]) -> Path | None:
    """The last adapter folder that ships its own tokenizer (finetune and pretrain save it; an
    extended-vocabulary adapter needs it), or None."""
    for d in reversed([Path(a) for a in adapter_dirs]):
        if (d / "tokenizer.json").is_file() or (d / "tokenizer.model").is_file():
            return d
    return None


def load_model_and_tokenizer(base_model: str, tokenizer: str | None = None, adapters: Sequence[str] = (),
                             dtype: torch.dtype | str | None = None, merge: bool = False,
                             names: Sequence[str] | None = None, quantization: Quantization | None = None):
    """Everything a verb needs to run a model: (model, tokenizer), vocabularies checked.

    The tokenizer is `tokenizer` if given, else the last adapter's own (if it ships one), else the
    base model's; extended-vocabulary adapters resize the embeddings before loading. On a quantized
    base (`quantization`) adapters are never merged into the weights (see quantize.merge_allowed).
    """
    adapter_dirs = [resolve_adapter_dir(a) for a in adapters]
    check_adapters_fit_base(adapter_dirs, resolve_model_dir(base_model))  # headers only, before any loading
    tok = load_tokenizer(resolve_model_dir(base_model), tokenizer or adapter_tokenizer_dir(adapter_dirs),
                         add_pad_token=False)
    pad_added = ensure_pad_token(tok)
    model = load_model(base_model, dtype, quantization=quantization)
    merge = merge_allowed(quantization, merge, len(adapter_dirs))
    model = attach_adapters(model, adapter_dirs, names=names, merge=merge)
    check_vocab(tok, model, allow_resize=pad_added)
    return model, tok
