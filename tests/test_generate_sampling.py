"""Per-row sampling and incremental detokenization, checked against independent computations."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lorakit.generate.params import GenerationParams
from lorakit.generate.sampling import RowSampler, TokenStream, make_generator, sample_row


def reference_distribution(logits: np.ndarray, temperature: float, top_k: int, top_p: float) -> np.ndarray:
    """Temperature -> top-k -> nucleus, written out with numpy."""
    z = logits / temperature
    p = np.exp(z - z.max())
    p /= p.sum()
    order = np.argsort(-p)
    keep = np.zeros_like(p, dtype=bool)
    keep[order[:top_k] if top_k else order] = True
    p = np.where(keep, p, 0)
    p /= p.sum()
    order = np.argsort(-p)
    mass, nucleus = 0.0, np.zeros_like(keep)
    for i in order:
        if mass >= top_p:
            break
        nucleus[i] = True
        mass += p[i]
    p = np.where(nucleus, p, 0)
    return p / p.sum()


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 4, 0.9), (1.5, 0, 0.6)])
def test_sample_row_follows_the_filtered_distribution(temperature, top_k, top_p):
    logits = np.array([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])
    expected = reference_distribution(logits, temperature, top_k, top_p)
    g = make_generator(123)
    n = 6000
    counts = np.bincount([sample_row(torch.tensor(logits), temperature, top_k, top_p, g) for _ in range(n)],
                         minlength=len(logits)) / n
    assert np.all(counts[expected == 0] == 0)  # filtered tokens are never drawn
    assert np.abs(counts - expected).max() < 0.03


def test_repetition_penalty_matches_hf_and_ignores_padding():
    from transformers import RepetitionPenaltyLogitsProcessor

    scores = torch.randn(2, 20)
    ids = torch.tensor([[0, 0, 5, 7, 5], [3, 4, 9, 9, 1]])  # row 0: two left pads (id 0)
    params = [GenerationParams(repetition_penalty=1.3), GenerationParams(repetition_penalty=1.3)]
    ours = RowSampler(params, starts=[2, 0])(ids, scores.clone())
    hf_row0 = RepetitionPenaltyLogitsProcessor(1.3)(ids[:1, 2:], scores[:1].clone())
    hf_row1 = RepetitionPenaltyLogitsProcessor(1.3)(ids[1:], scores[1:].clone())
    torch.testing.assert_close(ours[0], hf_row0[0])
    torch.testing.assert_close(ours[1], hf_row1[0])
    assert ours[0, 0] == scores[0, 0]  # the pad id was not penalised


def test_presence_and_frequency_penalties_count_only_generated_tokens():
    """OpenAI's formula, written out with numpy, over the generated part of each row only."""
    vocab = 8
    ids = torch.tensor([[0, 3, 3, 5, 3, 3, 6],    # prompt 0 3 3 | generated 5 3 3 6
                        [2, 2, 2, 2, 1, 1, 4]])   # prompt 2 2 2 | generated 2 1 1 4
    scores = torch.randn(2, vocab)
    params = [GenerationParams(presence_penalty=0.5, frequency_penalty=0.25),
              GenerationParams(presence_penalty=-1.0, frequency_penalty=1.5)]

    def expected(row: int, generated: int) -> np.ndarray:
        counts = np.bincount(ids[row, -generated:].numpy(), minlength=vocab)
        p = params[row]
        return scores[row].numpy() - p.frequency_penalty * counts - p.presence_penalty * (counts > 0)

    fixed = RowSampler(params, [0, 0], prompt_width=3)(ids, scores.clone())  # one batch: columns after 3
    running = RowSampler(params, [0, 0], generated=[4, 2])(ids, scores.clone())  # continuous: counts per row
    np.testing.assert_allclose(fixed[0].numpy(), expected(0, 4), rtol=1e-6)
    np.testing.assert_allclose(fixed[1].numpy(), expected(1, 4), rtol=1e-6)
    np.testing.assert_allclose(running[1].numpy(), expected(1, 2), rtol=1e-6)
    assert running[1, 2] == scores[1, 2]  # a prompt-only token is not penalised
    with pytest.raises(Exception, match="beam"):
        GenerationParams(num_beams=2, presence_penalty=0.5).validate()


def test_sampled_rows_become_one_hot_and_greedy_rows_pass_through():
    scores = torch.randn(2, 30)
    out = RowSampler([GenerationParams(temperature=0.9, seed=1), GenerationParams()], starts=[0, 0])(
        torch.zeros(2, 3, dtype=torch.long), scores.clone())
    assert torch.isfinite(out[0]).sum() == 1
    torch.testing.assert_close(out[1], scores[1])


class CharTokenizer:
    """One token per UTF-8 byte (like byte fallback), to test streaming without a real vocabulary."""

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids, skip_special_tokens=True) -> str:
        return bytes(ids).decode("utf-8", errors="replace")


def run_stream(text: str, stop: list[str], max_new_tokens: int = 1000, stop_ids=()):
    tok = CharTokenizer()
    chunks: list[str] = []
    stream = TokenStream(tok, GenerationParams(max_new_tokens=max_new_tokens, stop=stop), stop_ids, chunks.append)
    for t in tok.encode(text):
        if stream.push(t):
            break
    else:
        stream.finish("length")
    return stream, chunks


def test_stop_string_cuts_and_is_never_streamed():
    stream, chunks = run_stream("Hello world. ### Instruction: more", ["### Instruction"])
    assert stream.text == "Hello world. " and stream.finish_reason == "stop"
    assert "".join(chunks) == "Hello world. "
    assert not any("#" in c for c in chunks)


def test_partial_stop_prefix_is_released_when_it_does_not_match():
    stream, chunks = run_stream("a ## b", ["###"])
    assert "".join(chunks) == "a ## b" and stream.finish_reason == "length"


def test_multibyte_characters_are_never_split():
    stream, chunks = run_stream("naïve 中文 ok", [])
    assert "".join(chunks) == "naïve 中文 ok"
    assert not any("\ufffd" in c for c in chunks)


def test_length_limit_and_stop_token():
    stream, chunks = run_stream("abcdefgh", [], max_new_tokens=3)
    assert stream.text == "abc" and stream.finish_reason == "length" and len(stream.tokens) == 3
    stream, _ = run_stream("abc!def", [], stop_ids=[ord("!")])
    assert stream.text == "abc" and stream.finish_reason == "stop"
