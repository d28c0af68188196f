"""`lorakit vocab train`: a SentencePiece model with LLaMA's settings (BPE, byte fallback, split digits,
identity normalization, <unk>=0 <s>=1 </s>=2, no pad)."""

from __future__ import annotations

import logging
import random
import re
from collections.abc import Iterable
from pathlib import Path

from lorakit.errors import ConfigError, DataError, OutputExistsError
from lorakit.files import write_atomic
from lorakit.vocab.config import VocabTrainConfig
from lorakit.vocab.corpus import iter_text_lines

log = logging.getLogger("lorakit")


def sample_sentences(lines: Iterable[str], max_sentences: int, seed: int) -> tuple[list[str], int]:
    """A uniform random sample of at most `max_sentences` lines (reservoir sampling, all if 0).

    Returns (sample in input order, number of lines seen). Memory stays O(max_sentences).
    """
    rng = random.Random(seed)
    reservoir: list[tuple[int, str]] = []
    seen = 0
    for seen, line in enumerate(lines, start=1):  # noqa: B007 (seen is read after the loop)
        if not max_sentences or len(reservoir) < max_sentences:
            reservoir.append((seen, line))
        else:
            j = rng.randrange(seen)
            if j < max_sentences:
                reservoir[j] = (seen, line)
    reservoir.sort()
    return [line for _, line in reservoir], seen


_SENTENCE_END = re.compile(r"[.!?;。！？；]+\s*")


def split_long_line(line: str, max_bytes: int) -> list[str]:
    """Cut a line longer than `max_bytes` (UTF-8) into chunks at sentence ends (else at a space, else
    anywhere): SentencePiece silently skips over-long sentences, and a Wikipedia paragraph often is one.
    Chunks are slices of the line (nothing inserted), stripped at their ends."""
    if len(line.encode("utf-8")) <= max_bytes:
        return [line]
    hard = max(max_bytes // 4, 1)  # characters that surely fit (UTF-8 uses at most 4 bytes a character)
    ends = [m.end() for m in _SENTENCE_END.finditer(line)] + [len(line)]
    parts, start = [], 0
    for end in ends:
        while end - start > hard:  # one over-long sentence: cut at the last space that fits
            space = line.rfind(" ", start + 1, start + hard)
            cut = space if space > start else start + hard
            parts.append(line[start:cut])
            start = cut
        if end > start:
            parts.append(line[start:end])
            start = end
    chunks, current = [], ""
    for part in parts:
        if current and len((current + part).encode("utf-8")) > max_bytes:
            chunks.append(current)
            current = ""
        current += part
    chunks.append(current)
    return [c.strip() for c in chunks if c.strip()]


def trainer_options(cfg: VocabTrainConfig) -> dict[str, object]:
    """SentencePieceTrainer keyword arguments; the defaults are those of LLaMA's tokenizer.model."""
    return {
        "model_type": cfg.model_type,
        "vocab_size": cfg.vocab_size,
        "character_coverage": cfg.character_coverage,
        "byte_fallback": cfg.byte_fallback,
        "split_digits": cfg.split_digits,
        "normalization_rule_name": cfg.normalization,
        "add_dummy_prefix": True,
        "remove_extra_whitespaces": False,  # keep runs of spaces (code indentation) as they are
        "allow_whitespace_only_pieces": True,
        "unk_id": 0, "bos_id": 1, "eos_id": 2, "pad_id": -1,
        "max_sentence_length": cfg.max_sentence_length,
        "num_threads": cfg.num_threads,
        "input_sentence_size": 0,  # we sample ourselves (reproducibly, with --seed)
        "shuffle_input_sentence": False,
    }


def train_sentencepiece(cfg: VocabTrainConfig, show_progress: bool = True) -> dict[str, object]:
    """Train and write `cfg.output` (+ `.vocab`) atomically. Returns a summary dict."""
    import io

    import sentencepiece as spm
    from tqdm import tqdm

    out = Path(cfg.output)
    if out.exists() and not cfg.overwrite:
        raise OutputExistsError(f"{out} exists (pass --overwrite to replace it)")
    lines = (chunk for path in cfg.input for line in iter_text_lines(path)
             for chunk in split_long_line(line, cfg.max_sentence_length))
    progress = tqdm(lines, desc="reading sentences", unit=" lines", disable=not show_progress)
    sentences, seen = sample_sentences(progress, cfg.max_sentences, cfg.seed)
    progress.close()
    if not sentences:
        raise DataError(",".join(cfg.input), None, None, "no text lines to train on")
    log.info("training a %s SentencePiece model (%d pieces) on %d of %d lines", cfg.model_type,
             cfg.vocab_size, len(sentences), seen)
    buffer = io.BytesIO()
    # SentencePiece reports its training progress itself (on stderr) when its log level is INFO.
    verbose = show_progress and log.isEnabledFor(logging.INFO)
    try:
        spm.SentencePieceTrainer.train(sentence_iterator=iter(sentences), model_writer=buffer,
                                       minloglevel=0 if verbose else 2, **trainer_options(cfg))
    except RuntimeError as e:  # e.g. "Vocabulary size too high (20000). Please set it to a value <= 5432."
        raise ConfigError(f"SentencePiece training failed: {e}") from None
    model = buffer.getvalue()
    sp = spm.SentencePieceProcessor(model_proto=model)
    vocab_lines = "".join(f"{sp.id_to_piece(i)}\t{sp.get_score(i):g}\n" for i in range(sp.get_piece_size()))
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(out, model)
    write_atomic(out.with_suffix(".vocab"), vocab_lines)
    return {"output": str(out), "pieces": sp.get_piece_size(), "sentences": len(sentences), "lines_seen": seen}


def run_vocab_train(cfg: VocabTrainConfig) -> int:
    """The `lorakit vocab train` verb: train a SentencePiece model; returns the exit code."""
    summary = train_sentencepiece(cfg)
    print(f"wrote {summary['output']}: {summary['pieces']} pieces, trained on {summary['sentences']} of "
          f"{summary['lines_seen']} lines")
    return 0
