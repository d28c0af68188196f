"""Options of `lorakit vocab train|merge|stats` (no heavy imports: `lorakit --help` stays fast)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from lorakit.config import opt
from lorakit.errors import ConfigError


@dataclass
class VocabTrainConfig:
    """SentencePiece training with LLaMA's settings unless told otherwise."""

    input: list[str] = opt(help="text file(s): .txt (one sentence a line), .jsonl with `text`, or "
                                "alpaca/chat .json/.jsonl (every instruction/input/output/message is used)")
    vocab_size: int = opt(help="number of pieces, including <unk> <s> </s> and the 256 byte pieces")
    output: str = opt(help="where to write the model: PATH.model (PATH.vocab is written next to it)")
    model_type: Literal["bpe", "unigram"] = opt("bpe", "SentencePiece algorithm (LLaMA uses bpe)")
    character_coverage: float = opt(0.9995, "share of characters covered by pieces; the rest fall back to bytes")
    max_sentences: int = opt(0, "train on a random sample of at most N sentences (0: all)")
    byte_fallback: bool = opt(True, "encode characters outside the vocabulary as UTF-8 byte pieces (no <unk>)")
    split_digits: bool = opt(True, "every digit is its own piece (LLaMA)")
    normalization: str = opt("identity", "SentencePiece normalization rule: identity (LLaMA), nmt_nfkc, nfkc, ...")
    max_sentence_length: int = opt(16384, "longer lines (in bytes) are skipped by SentencePiece")
    seed: int = opt(42, "seed of the --max-sentences sample")
    num_threads: int = opt(2, "training threads")
    overwrite: bool = opt(False, "replace an existing --output")

    def validate(self) -> None:
        if not self.output.endswith(".model"):
            raise ConfigError(f"--output must end with .model, got {self.output!r}")
        if self.vocab_size < 300 and self.byte_fallback:
            raise ConfigError("--vocab-size must be at least 300 with byte fallback (259 pieces are reserved)")
        if self.vocab_size < 10:
            raise ConfigError("--vocab-size must be at least 10")
        if not 0.9 <= self.character_coverage <= 1.0:
            raise ConfigError("--character-coverage must be between 0.9 and 1.0")
        if self.max_sentences < 0:
            raise ConfigError("--max-sentences must be >= 0")


@dataclass
class VocabMergeConfig:
    """Append an extra SentencePiece model's pieces to a base tokenizer (Chinese-LLaMA's recipe)."""

    base_tokenizer: str = opt(help="base tokenizer: a Hugging Face folder with tokenizer.model, or a .model file")
    extra_sp_model: str = opt(help="SentencePiece .model whose pieces are added (e.g. a Chinese model)")
    output_dir: str = opt(help="folder to write: tokenizer.model + a Hugging Face tokenizer (tokenizer.json, ...)")
    keep_all: bool = opt(False, "add every piece the base lacks with score 0, as Chinese-LLaMA does (this also "
                                "changes how English and numbers split); default: only pieces bringing new "
                                "characters, scored below the base's, so existing text keeps its ids")
    protect_ascii: bool = opt(True, "default mode: never add a piece that would give an ASCII character (code "
                                    "braces, backslash, ...) a new token, even where the base uses byte fallback")
    fullwidth_variants: bool = opt(True, "default mode: also add fullwidth punctuation/letters (，：（）...) when "
                                         "the extra model folded them away with NFKC normalization")
    sample_text: list[str] = opt([], "text file(s) for the report (tokens per character by script, round trip); "
                                     "default: a small built-in mixed sample")
    max_sample_lines: int = opt(2000, "lines read from each --sample-text file")
    overwrite: bool = opt(False, "replace an existing --output-dir")


@dataclass
class VocabStatsConfig:
    """Tokens per character (overall and by script) and unknown/byte-fallback rates of tokenizers."""

    tokenizer: list[str] = opt(help="tokenizer(s) to compare: .model files, Hugging Face folders, .gguf, or "
                                    "a model alias")
    text: list[str] = opt(help="text file(s): .txt, .jsonl with `text`, or alpaca/chat .json/.jsonl")
    max_lines: int = opt(0, "read at most N lines/records from each file (0: all)")

    def validate(self) -> None:
        if self.max_lines < 0:
            raise ConfigError("--max-lines must be >= 0")
