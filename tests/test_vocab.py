"""vocab merge: the shared LLaMA-style 16k BPE model + the shared Chinese SentencePiece model."""

from __future__ import annotations

import json
import shutil

import pytest
import sentencepiece as spm

from lorakit.errors import DamagedFileError, MismatchError, ModelNotFoundError, OutputExistsError
from lorakit.vocab.corpus import read_text_lines
from lorakit.vocab.merge import covered_chars, load_proto, merge_tokenizers
from lorakit.vocab.report import check_merge

CODE = [
    'def area(r: float) -> dict:',
    '    return {"pi": 3.14159, "area": r ** 2 * 3.14159}  # ~ \\n ^ `x`',
    "for (int i = 0; i < n; i++) { sum += a[i] | mask; }",
    "SELECT name, COUNT(*) FROM users WHERE id > 42 GROUP BY name;",
    "x = [1, 22, 333, 4444, 55555]; y = {k: v for k, v in zip(x, x)}",
]
NUMBERS = ["In 2023, 1,234,567 people paid $89.99 each.", "3.14159265358979", "0x1F 1e-5 -42 +7 100%",
           "Call 555-0199 before 10:30 on 12/31/1999."]


def _sp(path) -> spm.SentencePieceProcessor:
    return spm.SentencePieceProcessor(model_file=str(path))


@pytest.fixture(scope="module")
def texts(data_dir):
    zh = read_text_lines([str(data_dir / "alpaca_zh_demo.json")], 200)
    en = read_text_lines([str(data_dir / "alpaca_en_demo.json")], 200) + \
        read_text_lines([str(data_dir / "wiki_demo.txt")], 20)
    mixed = [f"{a} {b}" for a, b in zip(zh[:100], en[:100], strict=True)] + \
        [f"{b}：{a}（2024年）" for a, b in zip(zh[100:150], en[100:150], strict=True)]
    return {"zh": zh, "en": en, "mixed": mixed}


@pytest.fixture(scope="module")
def merged(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("vocab") / "merged"
    result = merge_tokenizers(str(data_dir / "llama_style_bpe_16k.model"),
                              str(data_dir / "chinese_sp.model"), str(out))
    return result


@pytest.fixture(scope="module")
def merged_keep_all(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("vocab") / "keep_all"
    return merge_tokenizers(str(data_dir / "llama_style_bpe_16k.model"), str(data_dir / "chinese_sp.model"),
                            str(out), keep_all=True)


@pytest.fixture(scope="module")
def merged_hf(merged):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(merged.output_dir)


def test_existing_text_keeps_its_ids(data_dir, merged, merged_hf, texts):
    base, new = _sp(data_dir / "llama_style_bpe_16k.model"), _sp(merged.output_dir / "tokenizer.model")
    lines = CODE + NUMBERS + [x for x in texts["en"] if x.isascii()]
    assert len(lines) > 200
    for x in lines:
        ids = base.encode(x)
        assert new.encode(x) == ids, x
        if not x[:1].isspace():  # transformers' LLaMA tokenizer drops a leading space (see check_merge)
            assert merged_hf.encode(x, add_special_tokens=False) == ids, x


def test_chinese_needs_at_least_half_the_tokens(data_dir, merged, texts):
    base, new = _sp(data_dir / "llama_style_bpe_16k.model"), _sp(merged.output_dir / "tokenizer.model")
    before = sum(len(base.encode(x)) for x in texts["zh"])
    after = sum(len(new.encode(x)) for x in texts["zh"])
    assert before / after >= 2.0, (before, after)
    # The report's table counts the same tokens.
    check = check_merge(data_dir / "llama_style_bpe_16k.model", merged, texts["zh"])
    assert (check.before.total_tokens, check.after.total_tokens) == (before, after)
    assert check.before.total_chars == sum(len(x) for x in texts["zh"])


def test_round_trip_and_hf_agrees_with_sentencepiece(merged, merged_hf, texts):
    new = _sp(merged.output_dir / "tokenizer.model")
    lines = texts["mixed"] + texts["zh"] + CODE + NUMBERS
    for x in lines:
        ids = new.encode(x)
        assert new.decode(ids) == x
        if not x[:1].isspace():
            hf_ids = merged_hf.encode(x, add_special_tokens=False)
            assert hf_ids == ids, x
            assert merged_hf.decode(hf_ids) == x


def test_hf_folder_is_the_base_class_with_its_special_tokens(data_dir, merged, merged_hf):
    from lorakit.models import load_tokenizer

    base = load_tokenizer(data_dir, data_dir / "llama_style_bpe_16k.model", add_pad_token=False)
    assert type(merged_hf) is type(base)
    assert len(merged_hf) == merged.merged_size == _sp(merged.output_dir / "tokenizer.model").get_piece_size()
    for name in ("bos_token", "eos_token", "unk_token"):
        assert getattr(merged_hf, name) == getattr(base, name)
        assert getattr(merged_hf, name + "_id") == getattr(base, name + "_id")
    assert merged_hf.encode("hi")[0] == base.bos_token_id  # BOS still added, as LLaMA does
    # the base's merge list is kept as it was, the new merges come after it
    base_merges = json.loads(base.backend_tokenizer.to_str())["model"]["merges"]
    new_merges = json.loads((merged.output_dir / "tokenizer.json").read_text())["model"]["merges"]
    assert new_merges[:len(base_merges)] == base_merges and len(new_merges) > len(base_merges)
    # lorakit's own loader reads the folder the same way.
    assert load_tokenizer(merged.output_dir, add_pad_token=False).encode("中文 text") == merged_hf.encode("中文 text")


def test_default_mode_adds_only_pieces_with_new_characters(data_dir, merged):
    base = load_proto(data_dir / "llama_style_bpe_16k.model")
    out = load_proto(merged.output_dir / "tokenizer.model")
    covered = covered_chars(base)
    assert [p.piece for p in out.pieces[:len(base.pieces)]] == [p.piece for p in base.pieces]
    added = out.pieces[len(base.pieces):]
    assert len(added) == len(merged.selection.added) > 15000
    lowest = min(p.score for p in base.pieces if p.type == 1)
    scores = [p.score for p in added]
    assert max(scores) < lowest and scores == sorted(scores, reverse=True)
    for p in added:
        new_chars = {c for c in p.piece if c not in covered}
        assert new_chars and all(ord(c) >= 128 for c in new_chars), p.piece
    # fullwidth punctuation, which the NFKC-normalized Chinese model never saw, is one token, not 3 bytes
    sp = _sp(merged.output_dir / "tokenizer.model")
    assert merged.selection.fullwidth > 80
    pieces = [sp.id_to_piece(i) for i in sp.encode("你好，世界！（测试）")]
    assert {"，", "！", "（", "）"} <= set(pieces) and not any(p.startswith("<0x") for p in pieces), pieces


def test_keep_all_adds_every_missing_piece(data_dir, merged_keep_all, texts):
    base, extra = _sp(data_dir / "llama_style_bpe_16k.model"), _sp(data_dir / "chinese_sp.model")
    base_pieces = {base.id_to_piece(i) for i in range(base.get_piece_size())}
    missing = [extra.id_to_piece(i) for i in range(extra.get_piece_size())
               if not (extra.is_control(i) or extra.is_unknown(i)) and extra.id_to_piece(i) not in base_pieces]
    out = load_proto(merged_keep_all.output_dir / "tokenizer.model")
    assert [p.piece for p in out.pieces[base.get_piece_size():]] == missing
    assert all(p.score == 0.0 for p in out.pieces[base.get_piece_size():])
    assert merged_keep_all.merged_size == base.get_piece_size() + len(missing)
    # Chinese-LLaMA's behaviour: score-0 pieces such as "10" now split numbers (and English) differently.
    new = _sp(merged_keep_all.output_dir / "tokenizer.model")
    assert new.encode("1999") != base.encode("1999")
    assert sum(new.encode(x) != base.encode(x) for x in texts["en"]) > len(texts["en"]) // 2


def test_base_folder_added_tokens_keep_their_ids(data_dir, tmp_path):
    from transformers import AutoTokenizer

    from lorakit.models import load_tokenizer

    folder = tmp_path / "chat_base"
    tok = load_tokenizer(data_dir, data_dir / "llama_style_bpe_16k.model", add_pad_token=False)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.save_pretrained(folder)
    shutil.copy(data_dir / "llama_style_bpe_16k.model", folder / "tokenizer.model")
    ids = {t: tok.convert_tokens_to_ids(t) for t in ("<|im_start|>", "<|im_end|>")}
    assert ids == {"<|im_start|>": 16000, "<|im_end|>": 16001}

    result = merge_tokenizers(str(folder), str(data_dir / "chinese_sp.model"), str(tmp_path / "out"))
    assert result.moved_added_tokens == ["<|im_start|>", "<|im_end|>"]
    hf = AutoTokenizer.from_pretrained(tmp_path / "out")
    proto = load_proto(tmp_path / "out" / "tokenizer.model")
    for t, i in ids.items():
        assert hf.convert_tokens_to_ids(t) == i and proto.pieces[i].piece == t
    assert len(hf) == len(proto.pieces) == result.merged_size
    text = "<|im_start|>user\n你好，世界<|im_end|>"
    assert hf.encode(text, add_special_tokens=False)[0] == 16000
    assert hf.decode(hf.encode(text, add_special_tokens=False)) == text


def test_merge_errors(data_dir, tmp_path, merged):
    extra = str(data_dir / "chinese_sp.model")
    (tmp_path / "no_model").mkdir()
    (tmp_path / "no_model" / "tokenizer.json").write_text(json.dumps({}))
    with pytest.raises(ModelNotFoundError, match="tokenizer.model"):
        merge_tokenizers(str(tmp_path / "no_model"), extra, str(tmp_path / "o1"))
    bogus = tmp_path / "bogus.model"
    bogus.write_bytes(b"not a sentencepiece model at all")
    with pytest.raises(DamagedFileError, match="bogus.model: not a SentencePiece model"):
        merge_tokenizers(str(data_dir / "llama_style_bpe_16k.model"), str(bogus), str(tmp_path / "o2"))
    assert not (tmp_path / "o2").exists()
    # a folder whose tokenizer.model is not the tokenizer its tokenizer.json describes
    odd = tmp_path / "odd"
    shutil.copytree(merged.output_dir, odd)
    shutil.copy(data_dir / "chinese_sp.model", odd / "tokenizer.model")
    with pytest.raises(MismatchError, match="not the same tokenizer"):
        merge_tokenizers(str(odd), extra, str(tmp_path / "o3"))
    with pytest.raises(OutputExistsError):
        merge_tokenizers(str(data_dir / "llama_style_bpe_16k.model"), extra, str(merged.output_dir))

