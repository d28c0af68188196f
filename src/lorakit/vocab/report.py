"""The checks and report printed by `lorakit vocab merge` (also used by the tests)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lorakit.vocab.merge import VocabMergeResult, covered_chars, load_proto
from lorakit.vocab.stats import HFTokenizerView, SentencePieceView, TokenStats, format_table, measure

BUILTIN_SAMPLE = [
    "The quick brown fox jumps over the lazy dog.",
    "In 2023, 1,234,567 people paid $89.99 each (3.14% more than in 1999).",
    'def area(r: float) -> dict:',
    '    return {"pi": 3.14159, "area": r ** 2 * 3.14159}  # ~ \\n ^ `x`',
    "for (int i = 0; i < n; i++) { sum += a[i] | mask; }",
]


@dataclass
class MergeCheck:
    """Round trips and agreements on the sample lines."""

    lines: int
    unchanged_eligible: int  # lines made only of characters whose tokenization is protected
    unchanged: int           # ... of which tokenize to the same ids with the merged model
    sp_round_trip: int       # merged .model: decode(encode(x)) == x
    hf_checked: int          # lines not starting with whitespace (see hf_agrees)
    hf_round_trip: int       # HF folder: decode(encode(x)) == x
    hf_agrees: int           # HF folder ids == merged .model ids
    before: TokenStats
    after: TokenStats


def sample_from_pieces(result: VocabMergeResult, pieces: int = 400, per_line: int = 40) -> list[str]:
    """Lines made of added pieces (so a sample exists even without --sample-text)."""
    texts = [p.replace("\u2581", " ") for p, _ in result.selection.added[:pieces]]
    return ["".join(texts[i:i + per_line]).strip() for i in range(0, len(texts), per_line)]


def check_merge(base_model_file: str | Path, result: VocabMergeResult, lines: list[str],
                protect_ascii: bool = True) -> MergeCheck:
    """Compare base and merged tokenizers on `lines`.

    The HF tokenizer (transformers' LLaMA tokenizer, Metaspace with prepend "first") drops a leading
    space that sentencepiece keeps as its own "▁" piece, so HF is compared only on lines that do not
    start with whitespace, where both are defined the same way.
    """
    from transformers import AutoTokenizer

    base = SentencePieceView(base_model_file, name="before: " + Path(base_model_file).name)
    merged = SentencePieceView(result.output_dir / "tokenizer.model", name="after: merged tokenizer.model")
    hf = HFTokenizerView(AutoTokenizer.from_pretrained(result.output_dir))
    protected = covered_chars(load_proto(base_model_file))
    eligible = unchanged = sp_rt = hf_n = hf_rt = hf_ok = 0
    for x in lines:
        ids = merged.encode(x)
        sp_rt += merged.decode(ids) == x
        if all(ch in protected or (protect_ascii and ord(ch) < 128) for ch in x):
            eligible += 1
            unchanged += base.encode(x) == ids
        if not x[:1].isspace():
            hf_n += 1
            hf_ids = hf.encode(x)
            hf_ok += hf_ids == ids
            hf_rt += hf.decode(hf_ids) == x
    return MergeCheck(len(lines), eligible, unchanged, sp_rt, hf_n, hf_rt, hf_ok,
                      measure(base, lines), measure(merged, lines))


def format_report(result: VocabMergeResult, check: MergeCheck, keep_all: bool) -> str:
    """The printed report of a vocabulary merge: sizes, what was added or left out, and the check."""
    sel = result.selection
    out = [f"merged tokenizer written to {result.output_dir} (tokenizer.model + Hugging Face files)",
           f"vocabulary: {result.base_size} -> {result.merged_size} ({len(sel.added)} pieces added, "
           f"{'--keep-all: score 0' if keep_all else 'scored below every base piece'})",
           f"extra pieces left out: {sel.already_in_base} already in the base"
           + ("" if keep_all else f", {sel.only_covered_chars} made only of characters the base covers, "
                                  f"{sel.new_ascii_char} with a new ASCII character")
           + f", {sel.not_normal} control/byte/unknown"]
    if sel.fullwidth:
        out.append(f"fullwidth forms added (folded away by the extra model's NFKC normalization): {sel.fullwidth}")
    if result.moved_added_tokens:
        out.append(f"added tokens kept at their ids: {', '.join(result.moved_added_tokens)}")
    out.append(f"\ntokens per character on {check.lines} sample lines (before / after):")
    out.append(format_table([check.before, check.after]))
    out.append("\nchecks:")
    out.append(f"  text the base already handled, same ids as before: {check.unchanged}/{check.unchanged_eligible}")
    out.append(f"  round trip decode(encode(x)) == x, tokenizer.model: {check.sp_round_trip}/{check.lines}")
    out.append(f"  round trip, Hugging Face folder: {check.hf_round_trip}/{check.hf_checked} "
               "(lines not starting with a space)")
    out.append(f"  Hugging Face folder ids == tokenizer.model ids: {check.hf_agrees}/{check.hf_checked}"
               + (" (--keep-all: score ties are broken differently by sentencepiece and a ranked merge list)"
                  if keep_all and check.hf_agrees < check.hf_checked else ""))
    return "\n".join(out)


def run_vocab_merge(cfg) -> int:  # cfg: VocabMergeConfig
    """The `lorakit vocab merge` verb; returns the exit code."""
    from lorakit.vocab.corpus import read_text_lines
    from lorakit.vocab.merge import merge_tokenizers

    result = merge_tokenizers(cfg.base_tokenizer, cfg.extra_sp_model, cfg.output_dir, keep_all=cfg.keep_all,
                              protect_ascii=cfg.protect_ascii, fullwidth_variants=cfg.fullwidth_variants,
                              overwrite=cfg.overwrite)
    base_file = Path(cfg.base_tokenizer)
    base_file = base_file / "tokenizer.model" if base_file.is_dir() else base_file
    lines = read_text_lines(cfg.sample_text, cfg.max_sample_lines) if cfg.sample_text else \
        BUILTIN_SAMPLE + sample_from_pieces(result)
    check = check_merge(base_file, result, lines, protect_ascii=cfg.protect_ascii)
    print(format_report(result, check, cfg.keep_all))
    return 0
