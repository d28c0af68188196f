"""The model families lorakit knows: one small entry per family, read by every verb.

Each `Family` says how a Hugging Face checkpoint of that family is laid out and what lorakit can do
with it: the HF architecture and `model_type`, the tensor names (HF -> GGUF, and Meta's `pth` names
where a Meta layout exists), which q/k weights llama.cpp wants permuted to its interleaved rotary
layout, the modules LoRA targets, the llama.cpp architecture and its family-specific GGUF keys, and
which of lorakit's fused training/inference paths apply. Adding a family is one entry here plus its
tests (tests/test_families.py).

Layout notes, per family (transformers' modeling code is the reference):
- LLaMA 1/2/3 and Mistral: the LLaMA layout (`layout.RULES`); llama.cpp rotates interleaved pairs,
  so q/k rows are permuted; Llama 3's RoPE scaling becomes a `rope_freqs` tensor in GGUF.
- Qwen2/2.5: LLaMA's layout plus q/k/v biases; llama.cpp runs Qwen with HF's half-split ("NEOX")
  rotary, so nothing is permuted.
- Qwen3: LLaMA's layout plus per-head RMSNorms of q and k (`q_norm`, `k_norm`), NEOX rotary.
- Gemma 3 (text, `Gemma3ForCausalLM`): q/k norms, four norms per layer, embeddings scaled by
  sqrt(hidden), RMSNorm computing x * (1 + w) (llama.cpp's converter stores 1 + w in GGUF), GELU-tanh
  MLP, sliding-window layers, optional final logit soft-capping; tied lm_head.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from lorakit.errors import MismatchError
from lorakit.models.layout import IGNORED_HF, RULES, Mapped, TensorRule, compile_rules, match_rules

_L = "model.layers.{}."
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")

QKV_BIASES = (
    TensorRule(_L + "self_attn.q_proj.bias", None, "blk.{}.attn_q.bias"),
    TensorRule(_L + "self_attn.k_proj.bias", None, "blk.{}.attn_k.bias"),
    TensorRule(_L + "self_attn.v_proj.bias", None, "blk.{}.attn_v.bias"),
)
QK_NORMS = (
    TensorRule(_L + "self_attn.q_norm.weight", None, "blk.{}.attn_q_norm.weight"),
    TensorRule(_L + "self_attn.k_norm.weight", None, "blk.{}.attn_k_norm.weight"),
)
# LLaMA's rules without their Meta names (families that have no Meta checkpoint format).
_LLAMA_NO_META = tuple(TensorRule(r.hf, None, r.gguf) for r in RULES)
_GEMMA3_NORMS = (
    TensorRule(_L + "input_layernorm.weight", None, "blk.{}.attn_norm.weight"),
    TensorRule(_L + "post_attention_layernorm.weight", None, "blk.{}.post_attention_norm.weight"),
    TensorRule(_L + "pre_feedforward_layernorm.weight", None, "blk.{}.ffn_norm.weight"),
    TensorRule(_L + "post_feedforward_layernorm.weight", None, "blk.{}.post_ffw_norm.weight"),
)
_GEMMA3_RULES = tuple(r for r in _LLAMA_NO_META if "layernorm" not in r.hf) + _GEMMA3_NORMS + QK_NORMS


@dataclass(frozen=True)
class Family:
    """What lorakit knows about one model family (see the module doc)."""

    name: str  # lorakit's name, e.g. "qwen2"
    model_types: tuple[str, ...]  # config.json `model_type` values
    architecture: str  # the HF causal-LM class (config.json `architectures[0]`)
    rules: tuple[TensorRule, ...]  # every HF tensor name it may have -> GGUF (and Meta) names
    gguf_arch: str  # llama.cpp's architecture name (general.architecture)
    # Family-specific GGUF keys beyond llama.cpp's generic ones, as `<arch>.<suffix>` suffixes; the
    # GGUF writer knows how to compute each (export/gguf_metadata.py).
    gguf_keys: tuple[str, ...] = ()
    # config.json fields llama.cpp's converter assumes when a config omits them (Gemma 3's defaults)
    gguf_config_defaults: tuple[tuple[str, Any], ...] = ()
    permute_qk: bool = True  # llama.cpp's interleaved rotary: permute q/k rows (LLaMA layout)
    gguf_norm_shift: float = 0.0  # added to every `*norm.weight` in GGUF (Gemma: 1 + w)
    meta_pth: bool = False  # a Meta `consolidated.NN.pth` layout exists (export/merge --output-type pth)
    lora_targets: tuple[str, ...] = ATTENTION + MLP  # modules "all-linear" LoRA targets
    # class names of the HF modules, for the fused paths
    attention_class: str = ""
    mlp_class: str = ""
    norm_class: str = ""
    plain_rmsnorm: bool = True  # norm computes w * x / rms(x) (not Gemma's (1 + w)): fused RMSNorm applies
    fused_attention: bool = True  # generate's fused q/k/v module applies (no q/k norms)
    # lm_head and loss may run fused (nothing between them; Gemma's final soft-capping, when a config sets
    # it, is checked at run time: train/loss.py)
    fused_head_loss: bool = True
    packed_attention: bool = True  # training's per-example attention for packed rows applies
    notes: str = ""
    _compiled: Any = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_compiled", compile_rules(self.rules))

    def map_hf(self, name: str) -> Mapped | None:
        """The rule for HF tensor `name` in this family (None if the family has no such tensor)."""
        return match_rules(name, self._compiled)

    def unknown_names(self, names: list[str]) -> list[str]:
        return [n for n in names if self.map_hf(n) is None and not IGNORED_HF.fullmatch(n)]

    def check_names(self, names: list[str], where: str) -> None:
        """Refuse tensors this family's layout does not know (another architecture, a renamed checkpoint)."""
        unknown = self.unknown_names(names)
        if unknown:
            shown = ", ".join(unknown[:5]) + (f" ... ({len(unknown)} in all)" if len(unknown) > 5 else "")
            raise MismatchError(f"{where}: unknown tensor names for a {self.name} model ({self.architecture}): "
                                f"{shown}")

    def gguf_name(self, hf_name: str) -> str | None:
        mapped = self.map_hf(hf_name)
        return None if mapped is None else mapped.gguf


LLAMA = Family(
    "llama", ("llama",), "LlamaForCausalLM", RULES, "llama", ("vocab_size", "rope.dimension_count"),
    meta_pth=True,
    attention_class="LlamaAttention", mlp_class="LlamaMLP", norm_class="LlamaRMSNorm",
    notes="LLaMA 1/2/3 (GQA, tied or untied head; Llama 3 RoPE scaling)")
MISTRAL = Family(
    "mistral", ("mistral",), "MistralForCausalLM", RULES, "llama", ("vocab_size", "rope.dimension_count"),
    meta_pth=True,
    attention_class="MistralAttention", mlp_class="MistralMLP", norm_class="MistralRMSNorm",
    notes="LLaMA layout; llama.cpp runs it as `llama` (no sliding window there)")
QWEN2 = Family(
    "qwen2", ("qwen2",), "Qwen2ForCausalLM", _LLAMA_NO_META + QKV_BIASES, "qwen2", permute_qk=False,
    attention_class="Qwen2Attention", mlp_class="Qwen2MLP", norm_class="Qwen2RMSNorm",
    notes="Qwen2/Qwen2.5: q/k/v biases, NEOX rotary")
QWEN3 = Family(
    "qwen3", ("qwen3",), "Qwen3ForCausalLM", _LLAMA_NO_META + QK_NORMS, "qwen3", permute_qk=False,
    attention_class="Qwen3Attention", mlp_class="Qwen3MLP", norm_class="Qwen3RMSNorm", fused_attention=False,
    notes="q/k RMSNorm per head, NEOX rotary")
GEMMA3 = Family(
    "gemma3", ("gemma3_text",), "Gemma3ForCausalLM", _GEMMA3_RULES, "gemma3",
    ("attention.sliding_window", "final_logit_softcapping"), permute_qk=False, gguf_norm_shift=1.0,
    gguf_config_defaults=(("max_position_embeddings", 131072), ("head_dim", 256), ("rms_norm_eps", 1e-6)),
    attention_class="Gemma3Attention", mlp_class="Gemma3MLP", norm_class="Gemma3RMSNorm",
    plain_rmsnorm=False, fused_attention=False, packed_attention=True,
    notes="Gemma 3 text: (1 + w) RMSNorm, scaled embeddings, sliding window, soft-capping")

FAMILIES: tuple[Family, ...] = (LLAMA, MISTRAL, QWEN2, QWEN3, GEMMA3)
BY_NAME = {f.name: f for f in FAMILIES}


def family_of_config(config: dict[str, Any], where: str = "model") -> Family:
    """The family of an HF config.json (by `model_type`, else by architecture); a clear error if none."""
    model_type = config.get("model_type")
    for fam in FAMILIES:
        if model_type in fam.model_types:
            return fam
    arch = (config.get("architectures") or [None])[0]
    for fam in FAMILIES:
        if arch == fam.architecture:
            return fam
    known = ", ".join(f"{f.name} ({'/'.join(f.model_types)})" for f in FAMILIES)
    raise MismatchError(f"{where}: model_type {model_type!r} ({arch}) is not a supported model family; "
                        f"supported: {known}")


def family_of_dir(model_dir: Any) -> Family:
    """The family of the HF model folder `model_dir` (reads its config.json)."""
    import json
    from pathlib import Path

    path = Path(model_dir) / "config.json"
    return family_of_config(json.loads(path.read_text()), str(model_dir))


def require_meta_pth(model_dir: Any, what: str) -> Family:
    """The family of `model_dir`; a one-line refusal when it has no Meta pth layout (only LLaMA/Mistral)."""
    family = family_of_dir(model_dir)
    if not family.meta_pth:
        have = ", ".join(f.name for f in FAMILIES if f.meta_pth)
        raise MismatchError(f"{what}: the pth (Meta consolidated.NN.pth) layout exists only for {have} models; "
                            f"{model_dir} is {family.name} ({family.architecture}): use the huggingface/gguf outputs")
    return family


def family_of_model(model: Any) -> Family | None:
    """The family of a loaded transformers model (PEFT-wrapped or not); None if not a known family."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    return next((f for f in FAMILIES if model_type in f.model_types), None)


def classes(attr: str, flag: str | None = None) -> set[str]:
    """HF class names (`attention_class`, `mlp_class`, `norm_class`, `architecture`) of the families
    whose `flag` is set (all families when None)."""
    return {getattr(f, attr) for f in FAMILIES if flag is None or getattr(f, flag)}


def rope_parameters(config: dict[str, Any]) -> dict[str, Any]:
    """The RoPE parameters of the full-attention layers: transformers 5's `rope_parameters` (per layer
    type for Gemma 3), else the older `rope_scaling` + `rope_theta` fields."""
    params = config.get("rope_parameters")
    if isinstance(params, dict) and "full_attention" in params:
        params = params["full_attention"]
    if not params:
        params = dict(config.get("rope_scaling") or {})
        if "type" in params and "rope_type" not in params:
            params["rope_type"] = params["type"]
        params.setdefault("rope_theta", config.get("rope_theta", 10000.0))
    return dict(params)


def sliding_rope_theta(config: dict[str, Any]) -> float | None:
    """RoPE base of Gemma 3's sliding-window layers (None for single-RoPE models)."""
    params = config.get("rope_parameters")
    if isinstance(params, dict) and "sliding_attention" in params:
        return float(params["sliding_attention"].get("rope_theta", 10000.0))
    if config.get("rope_local_base_freq") is not None:
        return float(config["rope_local_base_freq"])
    return None
