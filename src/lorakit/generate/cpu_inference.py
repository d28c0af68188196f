"""Inference-only module swaps that make CPU decoding fast, with the same results (families: models/families.py).

A decode step is ~200 matrix-vector products plus ~1,500 small tensor ops, and on a CPU both cost:

- **Prepacked weights** (`PackedLinear`): the weight reordered once into oneDNN's blocked layout
  (what `torch.compile`'s freezing pass does for CPU, without a compile); bit-identical results.
- **Fused projections**: q/k/v become one product, gate/up another (`FusedAttention`, `FusedMLP`), and
  RMSNorm uses the fused `F.rms_norm` (`models.rmsnorm.RMSNorm`); fewer, larger calls.

Figures: docs/performance.md#prepacked-fused-linear-layers-for-cpu-decoding.

The fused modules mirror transformers' Llama modules line by line except for the fusion, and use the
same attention function, cache and masks. Only weights that no longer change are touched: a model with
unmerged (switchable) LoRA adapters keeps its layers, since PEFT merges into and unmerges from them.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, eager_attention_forward

from lorakit.models.families import ATTENTION, FAMILIES, MLP, family_of_model
from lorakit.models.rmsnorm import RMSNorm
from lorakit.models.swap import swap_modules

log = logging.getLogger("lorakit")


class PackedLinear(nn.Module):
    """`nn.Linear` replacement for inference: y (..., out) = x (..., in) @ W.T + b, W prepacked.

    `weight` is the packed (opaque oneDNN) tensor: its shape and dtype read as usual, but it is not a
    parameter and cannot be trained or saved."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), None)
        self.bias = None if linear.bias is None else linear.bias.detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, packed bf16"


def _stacked(*linears: nn.Linear) -> nn.Linear:
    """One linear computing the outputs of `linears` (same input) side by side: [out_1 | out_2 | ...]."""
    weight = torch.cat([lin.weight.detach() for lin in linears])
    has_bias = linears[0].bias is not None
    fused = nn.Linear(weight.shape[1], weight.shape[0], bias=has_bias, dtype=weight.dtype, device=weight.device)
    with torch.no_grad():
        fused.weight.copy_(weight)
        if has_bias:
            fused.bias.copy_(torch.cat([lin.bias.detach() for lin in linears]))
    return fused


def _same_kind(*linears: Any) -> bool:
    """Plain linears that all have, or all lack, a bias (so they can be stacked); True for none."""
    return all(type(lin) is nn.Linear for lin in linears) and len({lin.bias is None for lin in linears}) <= 1


class FusedMLP(nn.Module):
    """LlamaMLP with gate and up in one product: down(act(gate(x)) * up(x)), x (..., hidden)."""

    def __init__(self, mlp: nn.Module):
        super().__init__()
        self.intermediate = mlp.gate_proj.out_features
        self.gate_up = _stacked(mlp.gate_proj, mlp.up_proj)
        self.down_proj, self.act_fn = mlp.down_proj, mlp.act_fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).split(self.intermediate, dim=-1)
        return self.down_proj(self.act_fn(gate) * up)


class FusedAttention(nn.Module):
    """LlamaAttention with q, k and v in one product; rotary, cache, masks and the attention function
    are transformers' own. hidden_states (B, T, hidden) -> (B, T, hidden)."""

    def __init__(self, attn: nn.Module):
        super().__init__()
        self.config, self.layer_idx, self.head_dim = attn.config, attn.layer_idx, attn.head_dim
        self.scaling, self.is_causal = attn.scaling, attn.is_causal
        # Mistral reads its window from the config, Qwen2 per layer; LLaMA has none
        self.sliding_window = getattr(attn, "sliding_window", getattr(attn.config, "sliding_window", None))
        self.num_key_value_groups, self.attention_dropout = attn.num_key_value_groups, attn.attention_dropout
        self.sizes = [attn.q_proj.out_features, attn.k_proj.out_features, attn.v_proj.out_features]
        self.qkv_proj = _stacked(attn.q_proj, attn.k_proj, attn.v_proj)
        self.o_proj = attn.o_proj

    def forward(self, hidden_states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor],
                attention_mask: torch.Tensor | None = None, cache: Any = None, past_key_values: Any = None,
                **kwargs: Any) -> tuple[torch.Tensor, None]:
        cache = cache if cache is not None else past_key_values
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        q, k, v = (t.view(hidden_shape).transpose(1, 2) for t in self.qkv_proj(hidden_states).split(self.sizes, -1))
        cos, sin = position_embeddings
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx, kwargs=kwargs)
        attention = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention_forward)
        if self.sliding_window is not None:
            kwargs["sliding_window"] = self.sliding_window
        out, _ = attention(self, q, k, v, attention_mask, dropout=0.0, scaling=self.scaling, **kwargs)
        return self.o_proj(out.reshape(*input_shape, -1).contiguous()), None


def packing_works() -> bool:
    """Whether this torch build and CPU run packed bf16 linears, and they agree with `F.linear`."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        linear = nn.Linear(64, 48, dtype=torch.bfloat16)
        x = torch.randn(3, 64, dtype=torch.bfloat16)
        with torch.no_grad():
            return bool(torch.allclose(PackedLinear(linear)(x).float(), linear(x).float(), atol=1e-2, rtol=1e-2))
    except (RuntimeError, AttributeError) as e:  # op missing in this build, or no bf16 support
        log.debug("packed linears unavailable: %s", e)
        return False


# transformers' module class -> (its fused replacement, the linears that must be stackable), for each
# family where the registry says the fused module computes the same (no q/k norms, plain RMSNorm).
_FUSED: dict[str, tuple[type[nn.Module], tuple[str, ...]]] = {}
for _family in FAMILIES:
    _FUSED[_family.mlp_class] = (FusedMLP, MLP)
    if _family.fused_attention:
        _FUSED[_family.attention_class] = (FusedAttention, ATTENTION[:3])  # o_proj may lack q/k/v's bias
    if _family.plain_rmsnorm:
        _FUSED[_family.norm_class] = (RMSNorm, ())


def _fused(module: nn.Module) -> nn.Module | None:
    kind = _FUSED.get(type(module).__name__)
    if kind is None or not _same_kind(*(getattr(module, p) for p in kind[1])):
        return None
    if kind[0] is FusedAttention and type(module.o_proj) is not nn.Linear:
        return None
    return kind[0](module)


def _packed(module: nn.Module) -> nn.Module | None:
    if type(module) is nn.Linear and module.weight.dtype == torch.bfloat16:
        return PackedLinear(module)
    return None


def optimize_for_cpu(model: nn.Module) -> str | None:
    """Fuse and prepack a bf16 CPU model in place for inference; returns what was done (None: nothing).

    Nothing is done for a model with unmerged PEFT adapters (see module doc), on GPU or in other dtypes;
    linears are prepacked only where oneDNN's packed bf16 linears work."""
    weight = next(model.parameters(), None)
    if hasattr(model, "peft_config") or weight is None or weight.device.type != "cpu" or weight.dtype != torch.bfloat16:
        return None
    family = family_of_model(model)
    if family is None:
        log.info("model type %r is not in lorakit's family registry: its modules run as transformers' own "
                 "(only linears are prepacked)", getattr(model.config, "model_type", None))
    elif not (family.fused_attention and family.plain_rmsnorm):
        log.info("%s: fused CPU path for the MLP%s; %s runs as transformers' own", family.name,
                 "" if not family.plain_rmsnorm else " and RMSNorm",
                 "attention (q/k norms)" if family.plain_rmsnorm else "attention and (1 + w) RMSNorm")
    if getattr(model, "is_quantized", False):  # bitsandbytes linears cannot be stacked or prepacked
        log.info("note: on a quantized base q/k/v and gate/up stay separate 4/8-bit products; only the "
                 "norms are fused and the full-precision lm_head prepacked")
    fused = swap_modules(model, _fused)
    packed = swap_modules(model, _packed) if packing_works() else 0
    return f"{fused} modules fused, {packed} linears prepacked"
