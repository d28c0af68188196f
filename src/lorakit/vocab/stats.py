"""Tokens per character, by script, and unknown/byte-fallback rates (`lorakit vocab stats`).

A token is attributed to the character class (script) of the first non-space character it covers, so
per-script figures come from one pass over the real tokenization of whole lines (no re-tokenizing of
fragments, which would change where pieces start).
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

Span = tuple[int, int, str]  # (first char, end char, kind: "piece" | "space" | "byte" | "unk")
_BYTE_PIECE = re.compile(r"^<0x[0-9A-Fa-f]{2}>$")
_SCRIPT_NAMES = {"CJK": "Han", "HIRAGANA": "Kana", "KATAKANA": "Kana", "HANGUL": "Hangul"}


def char_class(ch: str) -> str:
    """A coarse script/class for reports: Latin, Han, Cyrillic, digits, punctuation, whitespace, ..."""
    if ch.isspace():
        return "whitespace"
    cat = unicodedata.category(ch)
    if cat == "Nd":
        return "digits"
    if cat[0] in "LMN":
        first = unicodedata.name(ch, "OTHER").split(" ")[0]
        return _SCRIPT_NAMES.get(first, first.title())
    if cat[0] == "P":
        return "punctuation"
    if cat[0] == "S":
        return "symbols"
    return "other"


def _is_space(piece: str) -> bool:
    """A piece made only of whitespace ("▁" is sentencepiece's space, "Ġ"/"Ċ" byte-level BPE's)."""
    return bool(piece) and all(ch in "\u2581\u0120\u010a" or ch.isspace() for ch in piece)


class SentencePieceView:
    """A bare SentencePiece .model, through the sentencepiece library (the reference tokenization)."""

    def __init__(self, model_file: str | Path | None = None, model_proto: bytes | None = None, name: str = ""):
        import sentencepiece as spm

        self.sp = spm.SentencePieceProcessor(model_file=str(model_file)) if model_file else \
            spm.SentencePieceProcessor(model_proto=model_proto)
        self.name = name or str(model_file)
        self.vocab_size = self.sp.get_piece_size()

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode(ids)

    def spans(self, text: str) -> list[Span]:
        # sentencepiece gives byte offsets into the input; map them to character offsets.
        char_at = {}
        pos = 0
        for i, ch in enumerate(text):
            char_at[pos] = i
            pos += len(ch.encode("utf-8"))
        char_at[pos] = len(text)
        out = []
        for p in self.sp.encode(text, return_type="proto").pieces:
            kind = "unk" if self.sp.is_unknown(p.id) else "byte" if self.sp.is_byte(p.id) else \
                "space" if _is_space(p.piece) else "piece"
            start = char_at.get(p.begin, len(text))
            out.append((start, max(char_at.get(p.end, start), start), kind))
        return out


class HFTokenizerView:
    """A Hugging Face tokenizer (fast), without BOS/EOS."""

    def __init__(self, tokenizer: Any, name: str = ""):
        self.tok = tokenizer
        self.name = name or str(getattr(tokenizer, "name_or_path", "tokenizer"))
        self.vocab_size = len(tokenizer)
        vocab = tokenizer.get_vocab()
        self._byte_ids = {i for t, i in vocab.items() if _BYTE_PIECE.match(t)}

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False)

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def spans(self, text: str) -> list[Span]:
        enc = self.tok(text, add_special_tokens=False, return_offsets_mapping=True)
        unk, ids = self.tok.unk_token_id, enc["input_ids"]
        pieces = self.tok.convert_ids_to_tokens(ids)
        return [(s, max(e, s), "unk" if i == unk else "byte" if i in self._byte_ids else
                 "space" if _is_space(piece) else "piece")
                for i, piece, (s, e) in zip(ids, pieces, enc["offset_mapping"], strict=True)]


def load_view(spec: str) -> SentencePieceView | HFTokenizerView:
    """A .model file through sentencepiece; anything else through lorakit.models.load_tokenizer."""
    from lorakit.models import load_tokenizer

    if spec.endswith(".model") and Path(spec).is_file():
        from lorakit.models.validate import validate_tokenizer

        validate_tokenizer(Path(spec))  # a damaged file: one line naming it
        return SentencePieceView(spec, name=spec)
    return HFTokenizerView(load_tokenizer(spec, add_pad_token=False), name=spec)


@dataclass
class TokenStats:
    """Counts for one tokenizer on one text sample."""

    name: str
    vocab_size: int
    chars: Counter = field(default_factory=Counter)   # class -> characters
    tokens: Counter = field(default_factory=Counter)  # class -> tokens attributed to it
    unk: int = 0
    byte: int = 0

    @property
    def total_chars(self) -> int:
        return sum(self.chars.values())

    @property
    def total_tokens(self) -> int:
        return sum(self.tokens.values())

    def tokens_per_char(self, cls: str | None = None) -> float:
        chars = self.total_chars if cls is None else self.chars[cls]
        tokens = self.total_tokens if cls is None else self.tokens[cls]
        return tokens / chars if chars else float("nan")


def measure(view: SentencePieceView | HFTokenizerView, lines: Iterable[str]) -> TokenStats:
    """Tokenize each line and attribute every token to a character class."""
    stats = TokenStats(view.name, view.vocab_size)
    for line in lines:
        classes = [char_class(ch) for ch in line]
        stats.chars.update(classes)
        for start, end, kind in view.spans(line):
            cls = "whitespace"
            if kind == "space":  # "▁" pieces, including the dummy prefix that covers no character
                pass
            elif end <= start:  # sentencepiece: the leading byte pieces of a character have empty spans
                if start < len(line):
                    cls = classes[start]
            else:
                cls = next((c for c in classes[start:end] if c != "whitespace"), "whitespace")
            stats.tokens[cls] += 1
            stats.unk += kind == "unk"
            stats.byte += kind == "byte"
    return stats


def format_table(stats: list[TokenStats], min_chars: int = 1) -> str:
    """Tokens per character by class, one column per tokenizer (plus the ratio first/last for two)."""
    classes = [c for c, n in sorted(stats[0].chars.items(), key=lambda kv: -kv[1]) if n >= min_chars]
    names = [s.name if len(s.name) <= 28 else "..." + s.name[-25:] for s in stats]
    head = f"{'class':<14}{'chars':>9}" + "".join(f"{n:>30}" for n in names)
    two = len(stats) == 2
    if two:
        head += f"{'ratio':>8}"
    rows = [head]
    for cls in [*classes, None]:
        label = "ALL" if cls is None else cls
        chars = stats[0].total_chars if cls is None else stats[0].chars[cls]
        row = f"{label:<14}{chars:>9}"
        values = [s.tokens_per_char(cls) for s in stats]
        row += "".join(f"{v:>30.3f}" for v in values)
        if two:
            row += f"{values[0] / values[1]:>7.2f}x" if values[1] else f"{'-':>8}"
        rows.append(row)
    rows.append(f"{'vocab size':<23}" + "".join(f"{s.vocab_size:>30}" for s in stats))
    rows.append(f"{'unknown rate':<23}" + "".join(f"{s.unk / max(s.total_tokens, 1):>30.4%}" for s in stats))
    rows.append(f"{'byte-fallback rate':<23}" + "".join(f"{s.byte / max(s.total_tokens, 1):>30.4%}"
                                                        for s in stats))
    return "\n".join(rows)


def run_vocab_stats(cfg) -> int:  # cfg: VocabStatsConfig
    """The `lorakit vocab stats` verb: token statistics of tokenizers on a corpus; returns the exit code."""
    from lorakit.vocab.corpus import read_text_lines

    lines = read_text_lines(cfg.text, cfg.max_lines)
    views = [load_view(spec) for spec in cfg.tokenizer]
    stats = [measure(v, lines) for v in views]
    print(f"{len(lines)} lines, {stats[0].total_chars} characters from {', '.join(cfg.text)}")
    print("tokens per character (lower is better):")
    print(format_table(stats))
    return 0
