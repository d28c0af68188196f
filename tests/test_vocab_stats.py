"""vocab stats: tokens per character by script, unknown and byte-fallback rates."""

from __future__ import annotations

import re

from lorakit.cli import main
from lorakit.vocab.stats import HFTokenizerView, SentencePieceView, char_class, measure


def test_char_class():
    assert [char_class(c) for c in "a中1 ，,€é"] == ["Latin", "Han", "digits", "whitespace", "punctuation",
                                                    "punctuation", "symbols", "Latin"]
    assert char_class("я") == "Cyrillic" and char_class("カ") == "Kana"


def test_every_token_is_counted_once(data_dir):
    from lorakit.models import load_tokenizer

    lines = ["Hello world, 2024!", "你好，世界。 mixed 中文 text", "  indented   code {x}", "😀 émoji"]
    model = data_dir / "llama_style_bpe_16k.model"
    views = [SentencePieceView(model), HFTokenizerView(load_tokenizer(data_dir, model, add_pad_token=False))]
    for view in views:
        stats = measure(view, lines)
        assert stats.total_tokens == sum(len(view.encode(x)) for x in lines)
        assert stats.total_chars == sum(len(x) for x in lines)
        # 6 Han characters, unknown to this English tokenizer: 3 UTF-8 byte pieces each
        assert stats.chars["Han"] == 6 and stats.tokens["Han"] == 3 * 6
        sp = views[0].sp
        assert stats.byte == sum(1 for x in lines for i in view.encode(x) if sp.is_byte(i)) > 3 * 6
        assert stats.unk == 0


def test_cli_table_matches_a_direct_count(data_dir, capsys):
    import sentencepiece as spm

    model = data_dir / "llama_style_bpe_16k.model"
    main_args = ["vocab", "stats", "--tokenizer", str(model), "--text", str(data_dir / "alpaca_zh_demo.json"),
                 "--max-lines", "50"]
    try:
        main(main_args)
    except SystemExit as e:
        assert e.code == 0
    out = capsys.readouterr().out
    from lorakit.vocab.corpus import read_text_lines

    lines = read_text_lines([str(data_dir / "alpaca_zh_demo.json")], 50)
    sp = spm.SentencePieceProcessor(model_file=str(model))
    expected = sum(len(sp.encode(x)) for x in lines) / sum(len(x) for x in lines)
    row = next(line for line in out.splitlines() if line.startswith("ALL"))
    assert float(re.split(r"\s+", row)[2]) == round(expected, 3)
