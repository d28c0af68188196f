"""Exact and near-duplicate filtering with ROUGE-L, fast enough for tens of thousands of examples.

Self-Instruct drops a new instruction whose ROUGE-L F1 with any kept one exceeds 0.7. Comparing each
new text with every kept one is quadratic (why by hand: docs/design.md#self-instruct-near-duplicates-by-hand);
here:

1. Texts are tokenized the ROUGE way (lower case, runs of letters/digits), with each CJK character a
   token of its own so that Chinese works too.
2. ROUGE-L F1 = 2 * LCS / (len_a + len_b), and LCS <= the multiset overlap of the two token bags. An
   inverted index over (token, occurrence number) keys gives every kept text's overlap with the new one
   in one `numpy.bincount`; only texts whose overlap could reach the threshold are candidates.
3. The exact LCS of a candidate uses a bit-parallel algorithm (Hyyro 2004) on Python integers: one
   pass over the candidate's tokens, each step a few big-integer operations.
"""

from __future__ import annotations

import re
from collections import Counter

import numpy as np

_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
_TOKEN = re.compile(rf"[{_CJK}]|[^\W_{_CJK}]+")


def tokenize(text: str) -> list[str]:
    """ROUGE-style tokens: lower-cased letter/digit runs; each CJK character is one token."""
    return _TOKEN.findall(text.lower())


def lcs_length(a: list[int] | tuple[int, ...], b: list[int] | tuple[int, ...]) -> int:
    """Length of the longest common subsequence of two token-id sequences (bit-parallel, O(|b|) steps)."""
    if not a or not b:
        return 0
    masks: dict[int, int] = {}
    for i, tok in enumerate(a):
        masks[tok] = masks.get(tok, 0) | (1 << i)
    full = (1 << len(a)) - 1
    v = full  # bit i clear <=> a[i] is matched in the LCS built so far
    for tok in b:
        u = v & masks.get(tok, 0)
        v = ((v + u) | (v - u)) & full
    return len(a) - bin(v).count("1")


def rouge_l(a: str, b: str) -> float:
    """ROUGE-L F1 of two texts (the same measure the filter uses)."""
    vocab: dict[str, int] = {}
    ta = [vocab.setdefault(t, len(vocab)) for t in tokenize(a)]
    tb = [vocab.setdefault(t, len(vocab)) for t in tokenize(b)]
    if not ta or not tb:
        return 0.0
    return 2.0 * lcs_length(ta, tb) / (len(ta) + len(tb))


class _Postings:
    """A growable int32 array (doc ids holding one key)."""

    __slots__ = ("data", "size")

    def __init__(self) -> None:
        self.data = np.empty(4, dtype=np.int32)
        self.size = 0

    def append(self, doc: int) -> None:
        if self.size == len(self.data):
            self.data = np.concatenate([self.data, np.empty(len(self.data), dtype=np.int32)])
        self.data[self.size] = doc
        self.size += 1

    def view(self) -> np.ndarray:
        return self.data[: self.size]


class DuplicateFilter:
    """Remembers kept texts; `check` says whether a new text duplicates one of them.

    `check` returns "duplicate" (same tokens, or the same text when it has no tokens), "similar"
    (ROUGE-L F1 > threshold with a kept text) or None. `threshold >= 1` disables the near-duplicate test.
    """

    def __init__(self, threshold: float = 0.7):
        self.threshold = threshold
        self._vocab: dict[str, int] = {}
        self._keys: dict[tuple[int, int], int] = {}  # (token id, occurrence number) -> key id
        self._postings: list[_Postings] = []
        self._docs: list[tuple[int, ...]] = []
        self._lengths = np.zeros(16, dtype=np.int64)
        self._exact: set[tuple[int, ...] | str] = set()

    def __len__(self) -> int:
        return len(self._docs)

    def _ids(self, tokens: list[str], create: bool) -> list[int]:
        if create:
            return [self._vocab.setdefault(t, len(self._vocab)) for t in tokens]
        # unknown tokens match nothing: give each a distinct negative id
        return [self._vocab.get(t, -1 - i) for i, t in enumerate(tokens)]

    @staticmethod
    def _occurrences(ids: list[int]) -> list[tuple[int, int]]:
        seen: Counter[int] = Counter()
        out = []
        for t in ids:
            seen[t] += 1
            out.append((t, seen[t]))
        return out

    def check(self, text: str) -> str | None:
        tokens = tokenize(text)
        if not tokens:
            return "duplicate" if text.strip() in self._exact else None
        ids = self._ids(tokens, create=False)
        if tuple(ids) in self._exact:
            return "duplicate"
        if self.threshold >= 1.0 or not self._docs:
            return None
        keys = [self._keys[k] for k in self._occurrences(ids) if k in self._keys]
        if not keys:
            return None
        n = len(self._docs)
        overlap = np.bincount(np.concatenate([self._postings[k].view() for k in keys]), minlength=n)
        la = len(ids)
        # LCS <= overlap, so F1 > threshold needs 2 * overlap > threshold * (la + lb)
        possible = np.nonzero(2 * overlap > self.threshold * (la + self._lengths[:n]))[0]
        for doc in possible[np.argsort(-overlap[possible], kind="stable")]:
            other = self._docs[doc]
            if 2 * lcs_length(ids, other) > self.threshold * (la + len(other)):
                return "similar"
        return None

    def add(self, text: str) -> None:
        tokens = tokenize(text)
        if not tokens:
            self._exact.add(text.strip())
            return
        ids = self._ids(tokens, create=True)
        doc = len(self._docs)
        self._docs.append(tuple(ids))
        self._exact.add(tuple(ids))
        if doc == len(self._lengths):
            self._lengths = np.concatenate([self._lengths, np.zeros(len(self._lengths), dtype=np.int64)])
        self._lengths[doc] = len(ids)
        for key in self._occurrences(ids):
            kid = self._keys.get(key)
            if kid is None:
                kid = self._keys[key] = len(self._postings)
                self._postings.append(_Postings())
            self._postings[kid].append(doc)
