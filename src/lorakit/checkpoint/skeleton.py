"""A model's structure without its weights, for walking it one decoder layer at a time (layerwise.py).

`skeleton` builds the causal-LM class of a config with every parameter on the `meta` device;
`layer_arguments` runs the decoder stack's own forward pass once with each layer replaced by a
recorder, so a caller gets the exact arguments (causal or sliding-window masks, rotary cos/sin per
layer type, position ids) the model gives each layer.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from lorakit.checkpoint.verify import VerificationError

if TYPE_CHECKING:
    import torch
    from transformers import PretrainedConfig


def skeleton(config: PretrainedConfig | dict[str, Any]):
    """The causal-LM model of `config` with every parameter on the `meta` device (buffers such as
    rotary frequencies and Gemma's embedding scale are real: they are computed, not stored)."""
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    if isinstance(config, dict):
        fields = {k: v for k, v in config.items() if k != "model_type"}
        config = AutoConfig.for_model(config["model_type"], **fields)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model.eval()


def decoder_stack(model) -> tuple[Any, str]:
    """(the decoder stack module, its name prefix in the state dict, e.g. "model.")."""
    inner = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    prefix = next(n for n, m in model.named_modules() if m is inner)
    return inner, prefix + "." if prefix else ""


def layer_arguments(inner, hidden: torch.Tensor) -> list[tuple[tuple, dict]]:
    """The (args, kwargs) the model's own forward pass gives each decoder layer (masks, position ids,
    rotary cos/sin per layer type) for inputs_embeds `hidden` [n, length, hidden]."""
    import torch

    class Capture(torch.nn.Module):
        """Stands in for a decoder layer during one forward pass and records the arguments it gets."""

        def forward(self, hidden_states, *args, **kwargs):
            calls.append((args, kwargs))
            return hidden_states

    calls: list = []
    layers, norm = inner.layers, inner.norm
    inner.layers = torch.nn.ModuleList(Capture() for _ in layers)
    inner.norm = torch.nn.Identity()
    try:
        with torch.inference_mode():
            inner(inputs_embeds=hidden, use_cache=False)
    finally:
        inner.layers, inner.norm = layers, norm
    if len(calls) != len(layers):
        raise VerificationError(f"the model ran {len(calls)} of its {len(layers)} layers")
    return calls
