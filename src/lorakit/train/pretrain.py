"""`lorakit pretrain`: continued causal-LM pre-training on raw text with LoRA (+ full embeddings).

Chinese-LLaMA's recipe: documents are tokenized, joined with EOS, and cut into equal blocks; when the
tokenizer was extended (`lorakit vocab merge`) the embeddings grow to match, new rows starting at the
mean of the old ones, and `embed_tokens`/`lm_head` are trained fully (modules_to_save) with the LoRA.
The adapter folder then holds the full resized matrices, so `lorakit merge` yields a model whose
vocab_size equals the tokenizer's.
"""

from __future__ import annotations

import logging
import os
from array import array
from collections.abc import Sequence
from pathlib import Path

from lorakit.data.blocks import TokenBlocks
from lorakit.data.token_cache import TokenCache, load_or_build
from lorakit.errors import DataError
from lorakit.models import check_vocab, load_model, load_tokenizer, resolve_model_dir, tokenizer_source
from lorakit.precision import resolve_precision, weights_dtype
from lorakit.train.distributed import is_main_process
from lorakit.train.engine import train
from lorakit.train.pretrain_config import PretrainConfig
from lorakit.train.summary import TrainSummary

log = logging.getLogger("lorakit")
Block = dict[str, list[int]]


def tokenize_documents(documents: Sequence[str], tokenizer, batch: int = 1000,
                       show_progress: bool = True) -> array:
    """One token stream: each document as the tokenizer encodes it (with BOS if it adds one), then EOS.

    Kept as a C int array (4 bytes a token instead of ~36 for a list of Python ints).
    """
    from tqdm import tqdm

    eos = tokenizer.eos_token_id
    stream = array("i")
    bar = tqdm(total=len(documents), desc="tokenizing", unit=" docs", disable=not show_progress)
    for start in range(0, len(documents), batch):
        chunk = list(documents[start:start + batch])
        for ids in tokenizer(chunk, add_special_tokens=True)["input_ids"]:
            stream.extend(ids)
            if eos is not None and (not ids or ids[-1] != eos):
                stream.append(eos)
        bar.update(len(chunk))
    bar.close()
    return stream


def make_blocks(stream: Sequence[int], block_size: int) -> list[Block]:
    """Cut the stream into blocks of exactly `block_size` tokens; the remainder is dropped.

    Every token is a label (causal LM); the model shifts labels internally.
    """
    blocks = []
    for start in range(0, len(stream) - block_size + 1, block_size):
        ids = list(stream[start:start + block_size])
        blocks.append({"input_ids": ids, "labels": list(ids), "attention_mask": [1] * block_size})
    return blocks


def copy_sentencepiece_model(source: Path, tokenizer, output_dir: str | Path) -> bool:
    """Ship the tokenizer's `tokenizer.model` with the adapter (transformers 5 saves only tokenizer.json).

    `lorakit merge` copies it to the merged model, where SentencePiece-based tools (llama.cpp's
    converter, sentencepiece itself) need it. Copied only when its size matches the tokenizer's.
    """
    import shutil

    import sentencepiece as spm

    src = source if source.is_file() else source / "tokenizer.model"
    if src.suffix != ".model" or not src.is_file():
        return False
    if spm.SentencePieceProcessor(model_file=str(src)).get_piece_size() != len(tokenizer):
        log.warning("%s does not match the tokenizer's %d tokens: not copied to the adapter", src, len(tokenizer))
        return False
    tmp = Path(output_dir) / ".tokenizer.model.tmp"
    shutil.copyfile(src, tmp)
    os.replace(tmp, Path(output_dir) / "tokenizer.model")
    return True


def tokenized_corpus(cfg: PretrainConfig, tokenizer, model_dir: Path) -> TokenCache:
    """The corpus as one token stream in the on-disk cache (data/token_cache.py): tokenized here in parallel
    the first time, memory-mapped afterwards."""
    source = tokenizer_source(model_dir, cfg.tokenizer)
    return load_or_build(cfg.data_path, tokenizer, source, cfg.cache_dir(), cfg.workers())


def pretrain(cfg: PretrainConfig) -> TrainSummary:
    """Train a LoRA adapter on raw text cut into blocks (continued pre-training); returns the TrainSummary."""
    from transformers import default_data_collator

    precision = resolve_precision(cfg.precision)
    model_dir = resolve_model_dir(cfg.base_model)
    tokenizer = load_tokenizer(model_dir, cfg.tokenizer, add_pad_token=False)

    if cfg.streaming:  # tokenized while training, no cache (data/streaming.py)
        from lorakit.data.streaming import StreamedBlocks

        log.info("streaming %s: blocks of %d are tokenized while training, in file order", cfg.data_path,
                 cfg.block_size)
        train_set, val_set = StreamedBlocks(cfg.data_path, tokenizer, cfg.block_size), None
    else:  # data problems surface before the (slow) model load
        tokens = tokenized_corpus(cfg, tokenizer, model_dir)
        blocks = TokenBlocks(tokens.tokens, cfg.block_size)  # views into the memory-mapped token file
        if not len(blocks):
            raise DataError(cfg.data_path, None, None, f"only {len(tokens)} tokens, fewer than --block-size "
                                                       f"{cfg.block_size}: lower --block-size or add text")
        train_set, val_set = blocks.split(cfg.val_set_size, cfg.seed)
        log.info("%d documents -> %d tokens -> %d training / %d validation blocks of %d",
                 tokens.meta["documents"], len(tokens), len(train_set), len(val_set) if val_set else 0,
                 cfg.block_size)

    model = load_model(model_dir, weights_dtype(precision), quantization=cfg)
    rows = model.get_input_embeddings().weight.shape[0]
    check_vocab(tokenizer, model, allow_resize=True)  # grows the embeddings (mean init) for a larger tokenizer
    if len(tokenizer) > rows:
        log.info("vocabulary extended %d -> %d: training embed_tokens and lm_head fully", rows, len(tokenizer))
        for name in ("embed_tokens", "lm_head"):  # the new rows must be trained and saved with the adapter
            if name not in cfg.modules_to_save:
                cfg.modules_to_save.append(name)
    # Blocks all have the same length: stacking them needs no padding and no packing.
    summary = train(cfg, model, tokenizer, train_set, val_set, collator=default_data_collator)
    if is_main_process():
        copy_sentencepiece_model(tokenizer_source(model_dir, cfg.tokenizer), tokenizer,
                                 summary.output_dir)
    return summary
