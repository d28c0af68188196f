"""Model/tokenizer resolution and vocabulary checks."""

from __future__ import annotations

import shutil

import pytest
import torch

from lorakit.errors import MismatchError, ModelNotFoundError
from lorakit.models import (
    check_vocab,
    ensure_pad_token,
    load_model,
    load_tokenizer,
    resize_embeddings,
    resolve_model_dir,
)


def test_unknown_model_lists_what_was_tried(tmp_path):
    with pytest.raises(ModelNotFoundError) as e:
        resolve_model_dir(str(tmp_path / "nope"))
    text = str(e.value)
    assert "GGUF file" in text and "Hugging Face folder" in text and "smollm2-135m" in text


def test_folder_without_config_is_rejected(tmp_path):
    with pytest.raises(ModelNotFoundError, match="no config.json"):
        resolve_model_dir(tmp_path)


def test_pad_token_is_not_eos(tiny_model_dir):
    tok = load_tokenizer(tiny_model_dir)
    assert tok.pad_token_id is not None and tok.pad_token_id != tok.eos_token_id
    assert tok.pad_token_id == tok.unk_token_id == 0  # alpaca-lora's choice for LLaMA


def test_pad_token_added_when_no_unk(tiny_model_dir):
    tok = load_tokenizer(tiny_model_dir, add_pad_token=False)
    n = len(tok)
    tok.pad_token = tok.eos_token
    tok.unk_token = None
    assert ensure_pad_token(tok) is True
    assert len(tok) == n + 1 and tok.pad_token == "<pad>"


def test_sentencepiece_model_file_matches_sentencepiece(data_dir):
    import sentencepiece as spm

    model_file = data_dir / "llama_style_bpe_16k.model"
    tok = load_tokenizer(".", model_file)
    sp = spm.SentencePieceProcessor(model_file=str(model_file))
    text = "The year 2024 had 366 days.\nx = f(3) + 1  # code"
    assert tok(text)["input_ids"] == [sp.bos_id(), *sp.encode(text)]
    assert len(tok) == sp.get_piece_size()


def test_vocab_mismatch_is_refused_with_sizes(tiny_model_dir):
    tok = load_tokenizer(tiny_model_dir)
    model = load_model(tiny_model_dir)
    tok.add_tokens(["<extra_a>", "<extra_b>"])  # tokenizer now larger than the embeddings
    with pytest.raises(MismatchError, match=rf"{len(tok)} tokens but .* {len(tok) - 2} rows"):
        check_vocab(tok, model)


def test_base_tokenizer_with_extended_model_is_refused(tiny_model_dir):
    tok = load_tokenizer(tiny_model_dir)
    model = load_model(tiny_model_dir)
    resize_embeddings(model, len(tok) + 1000)
    with pytest.raises(MismatchError, match="extended"):
        check_vocab(tok, model)


def test_resize_initialises_new_rows_to_the_mean(tiny_model_dir):
    model = load_model(tiny_model_dir)
    old = model.get_input_embeddings().weight.detach().clone()
    head = model.get_output_embeddings().weight.detach().clone()
    resize_embeddings(model, old.shape[0] + 3)
    emb = model.get_input_embeddings().weight
    assert emb.shape[0] == old.shape[0] + 3
    torch.testing.assert_close(emb[:-3], old)
    for row in emb[-3:]:
        torch.testing.assert_close(row, old.mean(0))
    torch.testing.assert_close(model.get_output_embeddings().weight[-1], head.mean(0))
    assert model.config.vocab_size == old.shape[0] + 3


def test_hf_folder_round_trip(tiny_model_dir, tmp_path):
    copy = shutil.copytree(tiny_model_dir, tmp_path / "copy")
    assert resolve_model_dir(str(copy)) == copy
    assert load_model(copy).config.num_hidden_layers == 2
