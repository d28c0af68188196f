"""LLaMA tensor names and rotary layouts: Hugging Face <-> Meta (`consolidated.NN.pth`) <-> GGUF.

Defined once here and used by the pth writer, the pth reader and (through the family registry,
`models/families.py`, which extends these rules for Qwen2/Qwen3/Gemma 3) the GGUF writer and the merge.

Rotary layout: Meta's checkpoints (and llama.cpp) rotate interleaved pairs (x0, x1), (x2, x3), ... of
each head; Hugging Face's LLaMA rotates the two halves (x_i, x_{i+d/2}). HF's conversion script permutes
the rows of wq/wk accordingly; `hf_to_meta_rows` is its inverse. For GQA, wk has `n_kv_heads` heads.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from lorakit.errors import MismatchError

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class TensorRule:
    """How one HF tensor maps to the other layouts.

    `rotary`: "q" or "k" when the rows must be permuted (with n_heads or n_kv_heads heads).
    `meta_split`: the dimension Meta's loader concatenates model-parallel shards along (None: the
    tensor is replicated in every shard).
    """

    hf: str
    meta: str | None  # None: no Meta/pth name (tensors of families without a Meta layout)
    gguf: str
    rotary: str | None = None
    meta_split: int | None = None


_L = "model.layers.{}."
RULES: tuple[TensorRule, ...] = (
    TensorRule("model.embed_tokens.weight", "tok_embeddings.weight", "token_embd.weight", meta_split=1),
    TensorRule("model.norm.weight", "norm.weight", "output_norm.weight"),
    TensorRule("lm_head.weight", "output.weight", "output.weight", meta_split=0),
    TensorRule(_L + "self_attn.q_proj.weight", "layers.{}.attention.wq.weight", "blk.{}.attn_q.weight", "q", 0),
    TensorRule(_L + "self_attn.k_proj.weight", "layers.{}.attention.wk.weight", "blk.{}.attn_k.weight", "k", 0),
    TensorRule(_L + "self_attn.v_proj.weight", "layers.{}.attention.wv.weight", "blk.{}.attn_v.weight", None, 0),
    TensorRule(_L + "self_attn.o_proj.weight", "layers.{}.attention.wo.weight", "blk.{}.attn_output.weight",
               None, 1),
    TensorRule(_L + "mlp.gate_proj.weight", "layers.{}.feed_forward.w1.weight", "blk.{}.ffn_gate.weight", None, 0),
    TensorRule(_L + "mlp.down_proj.weight", "layers.{}.feed_forward.w2.weight", "blk.{}.ffn_down.weight", None, 1),
    TensorRule(_L + "mlp.up_proj.weight", "layers.{}.feed_forward.w3.weight", "blk.{}.ffn_up.weight", None, 0),
    TensorRule(_L + "input_layernorm.weight", "layers.{}.attention_norm.weight", "blk.{}.attn_norm.weight"),
    TensorRule(_L + "post_attention_layernorm.weight", "layers.{}.ffn_norm.weight", "blk.{}.ffn_norm.weight"),
)


def _template_regex(template: str) -> re.Pattern[str]:
    return re.compile(re.escape(template).replace(r"\{\}", r"(\d+)"))


def compile_rules(rules: tuple[TensorRule, ...]) -> list[tuple[re.Pattern[str], TensorRule]]:
    """(regex of the HF name, rule) pairs for `match_rules`."""
    return [(_template_regex(r.hf), r) for r in rules]


_COMPILED = compile_rules(RULES)
_META_COMPILED = [(_template_regex(r.meta), r) for r in RULES if r.meta]

# Tensors that may appear in HF checkpoints but carry no weights of their own.
IGNORED_HF = re.compile(r".*rotary_emb\.inv_freq$")


@dataclass(frozen=True)
class Mapped:
    """An HF tensor name resolved to its naming rule and layer: its Meta and GGUF names follow."""

    rule: TensorRule
    layer: int | None

    @property
    def meta(self) -> str:
        assert self.rule.meta is not None, f"{self.rule.hf} has no Meta name"
        return self.rule.meta.format(self.layer)

    @property
    def gguf(self) -> str:
        return self.rule.gguf.format(self.layer)

    @property
    def hf(self) -> str:
        return self.rule.hf.format(self.layer)


def match_rules(name: str, compiled) -> Mapped | None:
    """The rule (and layer) whose template matches `name`, from `compile_rules` output; None if none."""
    for pattern, rule in compiled:
        m = pattern.fullmatch(name)
        if m:
            return Mapped(rule, int(m.group(1)) if m.groups() else None)
    return None


def map_hf(name: str) -> Mapped | None:
    """The rule for HF tensor `name` (None if it is not a LLaMA tensor)."""
    return match_rules(name, _COMPILED)


def map_meta(name: str) -> Mapped | None:
    """The rule for Meta tensor `name` (e.g. `layers.3.attention.wq.weight`)."""
    return match_rules(name, _META_COMPILED)


def hf_to_meta_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rows of an HF wq/wk [n_heads*head_dim, in] -> Meta/llama.cpp interleaved rotary order (same shape)."""
    rows = w.shape[0]
    return w.reshape(n_heads, 2, rows // n_heads // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def meta_to_hf_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Inverse of `hf_to_meta_rows`: Meta rows [n_heads*head_dim, in] -> HF order (the permutation of HF's
    convert_llama_weights_to_hf; same shape)."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def rotary_heads(rule: TensorRule, config: dict[str, Any]) -> int | None:
    """Heads to permute with for this tensor (None: no permutation)."""
    if rule.rotary == "q":
        return int(config["num_attention_heads"])
    if rule.rotary == "k":
        return int(config.get("num_key_value_heads") or config["num_attention_heads"])
    return None


def rope_theta(config: dict[str, Any]) -> float:
    """The rotary base frequency of an HF config (rope_theta or rope_parameters), default 10000."""
    params = config.get("rope_parameters") or {}
    return float(params.get("rope_theta", config.get("rope_theta", 10000.0)))


# model_types with a Meta `consolidated.NN.pth` layout (models/families.py: `Family.meta_pth`).
META_MODEL_TYPES = ("llama", "mistral")


def check_supported_config(config: dict[str, Any], where: str) -> None:
    """LLaMA-family configs these layouts can express: plain RoPE, head_dim = hidden / heads."""
    if config.get("model_type") not in META_MODEL_TYPES:
        raise MismatchError(f"{where}: the Meta pth layout exists only for LLaMA and Mistral models, not "
                            f"model_type {config.get('model_type')!r}")
    params = config.get("rope_parameters") or config.get("rope_scaling") or {}
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in ("default", None):
        raise MismatchError(f"{where}: RoPE scaling {rope_type!r} cannot be written in this format")
    head_dim = config.get("head_dim")
    if head_dim and head_dim * config["num_attention_heads"] != config["hidden_size"]:
        raise MismatchError(f"{where}: head_dim {head_dim} x {config['num_attention_heads']} heads != hidden size "
                            f"{config['hidden_size']}: not expressible in Meta/llama layout")


def _meta_ffn(dim: int, multiple_of: int, multiplier: float | None) -> int:
    """Meta's FeedForward hidden size formula (model.py)."""
    hidden = int(2 * (4 * dim) / 3)
    if multiplier is not None:
        hidden = int(multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def meta_params(config: dict[str, Any]) -> dict[str, Any]:
    """params.json for an HF LLaMA config. The FFN size is encoded with multiple_of/ffn_dim_multiplier
    exactly as Meta's loader recomputes it (256 for LLaMA-1/2 sizes; otherwise chosen to hit it)."""
    dim, ffn = int(config["hidden_size"]), int(config["intermediate_size"])
    multiple_of, multiplier = 256, None
    if _meta_ffn(dim, multiple_of, None) != ffn:
        multiple_of, multiplier = ffn, ffn / int(2 * (4 * dim) / 3)
        if _meta_ffn(dim, multiple_of, multiplier) != ffn:
            multiplier = (ffn - 0.5) / int(2 * (4 * dim) / 3)
    assert _meta_ffn(dim, multiple_of, multiplier) == ffn
    params: dict[str, Any] = {
        "dim": dim,
        "multiple_of": multiple_of,
        "n_heads": int(config["num_attention_heads"]),
        "n_kv_heads": int(config.get("num_key_value_heads") or config["num_attention_heads"]),
        "n_layers": int(config["num_hidden_layers"]),
        "norm_eps": float(config["rms_norm_eps"]),
        "vocab_size": int(config["vocab_size"]),
        "rope_theta": rope_theta(config),
    }
    if multiplier is not None:
        params["ffn_dim_multiplier"] = multiplier
    return params


def hf_config_from_meta(params: dict[str, Any]) -> dict[str, Any]:
    """The HF LlamaConfig fields that `params.json` describes (inverse of `meta_params`)."""
    dim = int(params["dim"])
    return {
        "model_type": "llama",
        "hidden_size": dim,
        "intermediate_size": _meta_ffn(dim, int(params.get("multiple_of", 256)), params.get("ffn_dim_multiplier")),
        "num_attention_heads": int(params["n_heads"]),
        "num_key_value_heads": int(params.get("n_kv_heads") or params["n_heads"]),
        "num_hidden_layers": int(params["n_layers"]),
        "rms_norm_eps": float(params["norm_eps"]),
        "vocab_size": int(params["vocab_size"]),
        "rope_theta": float(params.get("rope_theta", 10000.0)),
    }


# Chinese-LLaMA-Alpaca / Meta: model-parallel shards by hidden size (7B, 13B, 33B, 65B); small models 1.
META_SHARDS_BY_DIM = {4096: 1, 5120: 2, 6656: 4, 8192: 8}


def meta_num_shards(config: dict[str, Any]) -> int:
    """How many consolidated.NN.pth files Meta's layout uses for a model of this hidden size."""
    return META_SHARDS_BY_DIM.get(int(config["hidden_size"]), 1)
