"""Merge an extra SentencePiece model's pieces into a base tokenizer (`lorakit vocab merge`).

Chinese-LLaMA appends every piece LLaMA lacks with score 0 (`--keep-all` here). In a BPE model the
score decides which merge happens first, so score-0 pieces such as "10" or "▁1" are merged before
LLaMA's own pieces and English and numbers no longer split as before. The default mode instead adds
only pieces that contain a character the base does not cover, scored below every base piece. A piece
can only be produced from text that contains all of its characters, so text made of characters the
base covers (plus ASCII, with `protect_ascii`) is tokenized to exactly the same ids as before.

The result is written twice: `tokenizer.model` (the merged SentencePiece proto) and a Hugging Face
tokenizer (the base's own class and files, its `tokenizer.json` vocabulary and merges extended to
match). Tokens the base HF tokenizer added after its SentencePiece vocabulary (chat markers, ...)
are moved into the proto at their ids, so no id of the base changes.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorakit.errors import ConfigError, MismatchError, ModelNotFoundError, OutputExistsError
from lorakit.files import current_umask

log = logging.getLogger("lorakit")

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, BYTE = 1, 2, 3, 4, 6  # sentencepiece ModelProto.SentencePiece.Type


def load_proto(path: str | Path) -> Any:
    """A SentencePiece .model file -> its ModelProto; ModelNotFoundError when missing."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    p = Path(path)
    if not p.is_file():
        raise ModelNotFoundError(str(path), [f"SentencePiece model file {p}"])
    from lorakit.models.validate import validate_tokenizer

    validate_tokenizer(p)  # a damaged file: one line naming it
    proto = pb.ModelProto()
    try:
        proto.ParseFromString(p.read_bytes())
    except Exception as e:  # protobuf raises DecodeError (not a subclass of ValueError)
        raise MismatchError(f"{p}: not a SentencePiece model ({e})") from None
    if not proto.pieces:
        raise MismatchError(f"{p}: a SentencePiece model with no pieces")
    return proto


@dataclass
class Selection:
    """The pieces chosen from the extra model, and why the others were left out."""

    added: list[tuple[str, float]] = field(default_factory=list)  # (piece, score in the merged model)
    already_in_base: int = 0
    only_covered_chars: int = 0
    new_ascii_char: int = 0
    not_normal: int = 0
    fullwidth: int = 0  # fullwidth forms added for an NFKC-normalizing extra model (see select_pieces)


def covered_chars(proto: Any) -> set[str]:
    """Characters that appear in the base's ordinary pieces (others are byte-fallback or unknown)."""
    return {ch for p in proto.pieces if p.type in (NORMAL, USER_DEFINED) for ch in p.piece}


def select_pieces(base: Any, extra: Any, keep_all: bool = False, protect_ascii: bool = True,
                  fullwidth_variants: bool = True) -> Selection:
    """Which extra pieces to append, with their scores.

    keep_all: every NORMAL piece the base lacks, score 0 (Chinese-LLaMA's merge_tokenizers.py).
    default: only pieces with a character outside `covered_chars(base)` (and, with protect_ascii, no
    uncovered ASCII character), scored below the lowest base score in the extra model's order.
    fullwidth_variants (default mode): an extra model trained with NFKC normalization (Chinese-LLaMA's
    is) never saw fullwidth punctuation such as "，：（）", which NFKC folds to ASCII; the merged model
    keeps the base's normalization, so those characters would cost 3 byte tokens each. Each fullwidth
    form U+FF01..U+FF5E whose folded character is an extra piece is added as a one-character piece.
    """
    sel = Selection()
    base_pieces = {p.piece for p in base.pieces}
    covered = covered_chars(base)
    lowest = min((p.score for p in base.pieces if p.type == NORMAL), default=0.0)
    candidates = list(extra.pieces)
    if not keep_all:  # the extra model's own preference order (its proto order for a BPE model)
        candidates.sort(key=lambda p: -p.score)
    for p in candidates:
        if p.type != NORMAL:
            sel.not_normal += 1
        elif p.piece in base_pieces:
            sel.already_in_base += 1
        elif keep_all:
            sel.added.append((p.piece, 0.0))
            base_pieces.add(p.piece)
        else:
            new_chars = {ch for ch in p.piece if ch not in covered}
            if not new_chars:
                sel.only_covered_chars += 1
            elif protect_ascii and any(ord(ch) < 128 for ch in new_chars):
                sel.new_ascii_char += 1
            else:
                sel.added.append((p.piece, lowest - 1.0 - len(sel.added)))
                base_pieces.add(p.piece)
    if fullwidth_variants and not keep_all and "nfkc" in extra.normalizer_spec.name.lower():
        extra_pieces = {p.piece for p in extra.pieces if p.type == NORMAL}
        for cp in range(0xFF01, 0xFF5F):
            ch = chr(cp)
            if ch not in covered and ch not in base_pieces and unicodedata.normalize("NFKC", ch) in extra_pieces:
                sel.added.append((ch, lowest - 1.0 - len(sel.added)))
                sel.fullwidth += 1
    return sel


def _base_hf_files(base_tokenizer: str) -> tuple[Path, dict[str, bytes]]:
    """(tokenizer.model path, files of the base's Hugging Face tokenizer as `save_pretrained` writes them)."""
    from lorakit.models import load_tokenizer

    src = Path(base_tokenizer).expanduser()
    if src.is_dir():
        model_file = src / "tokenizer.model"
        if not model_file.is_file():
            raise ModelNotFoundError(base_tokenizer, [f"{model_file} (vocab merge needs a SentencePiece "
                                                      "tokenizer.model; pass the .model file itself)"])
        tok = load_tokenizer(src, add_pad_token=False)
    elif src.is_file() and src.suffix == ".model":
        model_file = src
        tok = load_tokenizer(src.parent, src, add_pad_token=False)
    else:
        raise ModelNotFoundError(base_tokenizer, [f"a tokenizer folder or a .model file at {src}"])
    with tempfile.TemporaryDirectory() as tmp:
        tok.save_pretrained(tmp)
        files = {p.name: p.read_bytes() for p in Path(tmp).iterdir() if p.is_file()}
    if "tokenizer.json" not in files:
        raise MismatchError(f"{base_tokenizer}: its Hugging Face tokenizer has no tokenizer.json (a fast tokenizer "
                            "is needed)")
    return model_file, files


def _vocab_ids(model: dict) -> dict[str, int]:
    if model["type"] == "BPE":
        return dict(model["vocab"])
    if model["type"] == "Unigram":
        return {piece: i for i, (piece, _) in enumerate(model["vocab"])}
    raise MismatchError(f"the base tokenizer.json uses a {model['type']} model; only SentencePiece-style BPE "
                        "and Unigram tokenizers can be merged")


def bpe_merges(base_merges: list, pieces: list[tuple[str, float, int]], vocab: dict[str, int],
               new_pieces: set[str]) -> list[list[str]]:
    """The merge list of the extended BPE tokenizer, ordered like sentencepiece's score priority.

    sentencepiece merges, at each step, the adjacent pair whose concatenation has the highest score;
    `tokenizers` applies merges by rank. Every (left, right) split of a piece where the piece or a
    part is new becomes a merge; all merges are then stable-sorted by the score of their result, so
    the base's own order is kept and new merges sit where their scores put them.
    """
    score = {piece: s for piece, s, _ in pieces}
    merges = [list(m.split(" ", 1)) if isinstance(m, str) else list(m) for m in base_merges]
    known = {tuple(m) for m in merges}
    extra: list[tuple[float, int, int, int, str, str]] = []
    for piece, s, ptype in pieces:
        if ptype != NORMAL:
            continue
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab and (left, right) not in known and \
                    (piece in new_pieces or left in new_pieces or right in new_pieces):
                extra.append((-s, vocab[piece], vocab[left], vocab[right], left, right))
    extra.sort()
    result_score = lambda m: score.get(m[0] + m[1], float("-inf"))  # noqa: E731
    lowest_base = min((result_score(m) for m in merges), default=float("inf"))
    merges += [[left, right] for *_, left, right in extra]
    if extra and -extra[0][0] >= lowest_base:  # some new merge outranks a base one (--keep-all's score 0)
        merges.sort(key=lambda m: -result_score(m))  # stable: ties keep the base's merges first
    # else (default mode) the base's merge list stays exactly as it was, new merges after it
    return merges


@dataclass
class VocabMergeResult:
    """What merging an extra SentencePiece model into a base tokenizer wrote (`merge_tokenizers`)."""

    output_dir: Path
    base_size: int
    merged_size: int
    selection: Selection
    moved_added_tokens: list[str]


def merge_tokenizers(base_tokenizer: str, extra_sp_model: str, output_dir: str, keep_all: bool = False,
                     protect_ascii: bool = True, fullwidth_variants: bool = True,
                     overwrite: bool = False) -> VocabMergeResult:
    """Write `output_dir` with the merged `tokenizer.model` and Hugging Face tokenizer files."""
    out = Path(output_dir)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise OutputExistsError(f"{out} is not empty (pass --overwrite to replace it)")
    model_file, files = _base_hf_files(base_tokenizer)
    base, extra = load_proto(model_file), load_proto(extra_sp_model)
    if base.trainer_spec.model_type not in (1, 2):  # UNIGRAM=1, BPE=2
        raise ConfigError(f"{model_file}: only unigram and bpe SentencePiece models can be extended")
    hf = json.loads(files["tokenizer.json"])
    vocab = _vocab_ids(hf["model"])
    n_base = len(base.pieces)
    for i, p in enumerate(base.pieces):
        if vocab.get(p.piece) != i:
            raise MismatchError(f"{base_tokenizer}: tokenizer.json gives {p.piece!r} id {vocab.get(p.piece)} but "
                                f"tokenizer.model gives {i}: the two files are not the same tokenizer")

    # Tokens added on top of the SentencePiece vocabulary (ids n_base, n_base+1, ...) keep their ids.
    moved = sorted((t for t in hf.get("added_tokens", []) if t["id"] >= n_base), key=lambda t: t["id"])
    if [t["id"] for t in moved] != list(range(n_base, n_base + len(moved))):
        raise MismatchError(f"{base_tokenizer}: added token ids {[t['id'] for t in moved]} do not follow the "
                            f"SentencePiece vocabulary ({n_base} pieces) without gaps")
    for t in moved:
        piece = base.pieces.add()
        piece.piece, piece.score, piece.type = t["content"], 0.0, CONTROL if t.get("special") else USER_DEFINED

    sel = select_pieces(base, extra, keep_all=keep_all, protect_ascii=protect_ascii,
                        fullwidth_variants=fullwidth_variants)
    for text, s in sel.added:
        piece = base.pieces.add()
        piece.piece, piece.score, piece.type = text, s, NORMAL
    base.trainer_spec.vocab_size = len(base.pieces)

    pieces = [(p.piece, p.score, p.type) for p in base.pieces]
    new_vocab = {text: i for i, (text, _, _) in enumerate(pieces)}
    if hf["model"]["type"] == "BPE":
        hf["model"]["merges"] = bpe_merges(hf["model"]["merges"], pieces, new_vocab, {t for t, _ in sel.added})
        hf["model"]["vocab"] = new_vocab
    else:
        hf["model"]["vocab"] = [[text, s] for text, s, _ in pieces]
    files["tokenizer.json"] = json.dumps(hf, ensure_ascii=False, indent=1).encode("utf-8")
    files["tokenizer.model"] = base.SerializeToString()

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        for name, data in files.items():
            (tmp / name).write_bytes(data)
        tmp.chmod(0o777 & ~current_umask())  # mkdtemp makes a 0700 folder
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("merged tokenizer: %d -> %d pieces (%d added) in %s", n_base + len(moved), len(pieces),
             len(sel.added), out)
    return VocabMergeResult(out, n_base + len(moved), len(pieces), sel, [t["content"] for t in moved])
