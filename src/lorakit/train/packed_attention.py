"""Attention for padding-free rows that costs sum(T_i^2), not (sum T_i)^2.

With a flattened micro-batch (one row of N = sum T_i tokens, `position_ids` restarting per example),
transformers' "sdpa" builds a block-diagonal [1, 1, N, N] mask and runs attention over the whole
row: about 4x the attention work of the padded batch at micro-batch 4, all of it masked out except
the diagonal blocks. This module registers "lorakit_packed": it finds the examples of a packed row
from `position_ids` and runs attention per example. Anything else (padded batches, a KV cache,
generation) goes to transformers' sdpa path unchanged, with the mask transformers builds for sdpa.

Per example, on the CPU it runs attention as two batched matmuls with the key/value heads shared
by their query group (no repeat of K and V) and a cached causal bias, with the numerics of
transformers' "eager" attention; on a GPU one causal SDPA call per example. Why and how fast:
docs/performance.md#padding-free-rows-and-per-example-attention.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

NAME = "lorakit_packed"


def segment_lengths(position_ids: torch.Tensor) -> list[int] | None:
    """[1, N] position ids that restart at each example -> example lengths; None if not a packed row."""
    if position_ids is None or position_ids.dim() != 2 or position_ids.shape[0] != 1:
        return None
    pos = position_ids[0]
    starts = torch.nonzero(pos[1:] != pos[:-1] + 1).flatten() + 1
    if starts.numel() == 0:
        return None
    bounds = [0, *starts.tolist(), pos.numel()]
    return [b - a for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


@functools.lru_cache(maxsize=8)  # one micro-batch of lengths, reused by all layers
def _causal_bias(length: int, groups: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """[groups * T, T]: 0 on and below the diagonal, -inf above, repeated for each query head of a group."""
    upper = torch.ones(length, length, dtype=torch.bool, device=device).triu(1)
    bias = torch.zeros(length, length, dtype=dtype, device=device).masked_fill(upper, float("-inf"))
    return bias.repeat(groups, 1)


def grouped_causal_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                             scaling: float) -> torch.Tensor:
    """Causal attention of one example: query [H, T, D], key/value [KV, T, D] -> [H, T, D].

    Query head h reads key/value head h // (H / KV), as transformers' repeat_kv arranges it, so the
    G = H / KV query heads of a group are stacked into one [G * T, D] matrix per key/value head."""
    heads, length, dim = query.shape
    kv_heads = key.shape[0]
    groups = heads // kv_heads
    bias = _causal_bias(length, groups, query.dtype, query.device).expand(kv_heads, groups * length, length)
    scores = torch.baddbmm(bias, query.reshape(kv_heads, groups * length, dim), key.transpose(1, 2), alpha=scaling)
    probs = scores.softmax(dim=-1)  # accumulated in fp32 even for bf16 scores
    return torch.bmm(probs, value).view(heads, length, dim)


def packed_sdpa_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                        attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                        **kwargs) -> tuple[torch.Tensor, None]:
    """query [1, H, N, D], key/value [1, KV, N, D] -> ([1, N, H, D], None), attention within each example."""
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

    lengths = segment_lengths(kwargs.get("position_ids"))
    window = kwargs.get("sliding_window")  # Mistral/Qwen2/Gemma 3 sliding layers: per-example causal only
    if (lengths is None or query.shape[2] != key.shape[2] or not getattr(module, "is_causal", True)
            or (window is not None and max(lengths) > window) or kwargs.get("softcap") is not None):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    # split (not slicing) keeps the backward a single concatenation instead of one zero-filled
    # full-size gradient per example
    pieces = zip(query[0].split(lengths, dim=1), key[0].split(lengths, dim=1), value[0].split(lengths, dim=1),
                 strict=True)
    if query.device.type == "cpu" and (dropout == 0.0 or not module.training):
        outputs = [grouped_causal_attention(q, k, v, scaling) for q, k, v in pieces]
    else:
        groups = query.shape[1] // key.shape[1]
        outputs = [F.scaled_dot_product_attention(q[None], repeat_kv(k[None], groups), repeat_kv(v[None], groups),
                                                  dropout_p=dropout if module.training else 0.0, scale=scaling,
                                                  is_causal=True)[0]
                   for q, k, v in pieces]
    # each [H, T_i, D] goes straight into its rows of the [N, H, D] result: one copy, not two
    return torch.cat([o.transpose(0, 1) for o in outputs], dim=0)[None], None


def register() -> None:
    """Make "lorakit_packed" a valid attn_implementation (its masks are the sdpa ones)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, packed_sdpa_forward)
    AttentionMaskInterface.register(NAME, sdpa_mask)


def use_packed_attention(model) -> bool:
    """Switch a model running "sdpa" to "lorakit_packed"; returns whether it did."""
    config = getattr(model, "config", None)
    if config is None or getattr(config, "_attn_implementation", None) != "sdpa":
        return False
    from lorakit.models.families import family_of_model

    family = family_of_model(model)
    if family is not None and not family.packed_attention:
        return False
    register()
    model.set_attn_implementation(NAME)
    return True
