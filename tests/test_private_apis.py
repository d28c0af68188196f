"""Guards for the private (underscore) and internal APIs of torch/transformers/peft/accelerate that lorakit
calls or overrides. An upgrade that removes or reshapes one fails here, with a message naming the API
and the lorakit file that depends on it, instead of a silent slowdown or a wrong result later.

Each guard names the file that uses the API; the test also checks that file still mentions it, so a
guard cannot outlive its use (remove the guard when the use goes).
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def resolve(dotted: str):
    """Import the longest importable module prefix of `dotted`, then follow attributes (a property is
    returned as such, not run on the class)."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for name in parts[cut:]:
            static = inspect.getattr_static(obj, name) if inspect.isclass(obj) else None
            obj = static if isinstance(static, property) else getattr(obj, name)
        return obj
    raise ImportError(dotted)


def params(*names: str) -> Callable[[object], None]:
    """A check that the callable takes these parameters, in this order (extra trailing ones allowed)."""
    def check(obj: object) -> None:
        got = list(inspect.signature(obj).parameters)
        assert got[:len(names)] == list(names), f"parameters {got}, expected to start with {list(names)}"
    return check


def is_property(obj: object) -> None:
    assert isinstance(obj, property), f"{obj!r} is no longer a property"


def is_dict(obj: object) -> None:
    assert isinstance(obj, dict), f"{obj!r} is not a dict"


def is_callable(obj: object) -> None:
    assert callable(obj), f"{obj!r} is not callable"


def lora_layer_has_cast_switch(_: object) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from peft.tuners.tuners_utils import BaseTunerLayer

    model = torch.nn.Sequential()
    model.add_module("q_proj", torch.nn.Linear(4, 4))
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"]))
    layer = next(m for m in peft_model.modules() if isinstance(m, BaseTunerLayer))
    assert hasattr(layer, "cast_input_dtype_enabled"), "LoRA layers lost cast_input_dtype_enabled"


@dataclass(frozen=True)
class Guard:
    api: str                  # dotted path, e.g. "transformers.Trainer._get_train_sampler"
    used_by: str              # the lorakit file that relies on it
    check: Callable[[object], None] = is_callable
    mention: str = ""         # what used_by must contain (default: the API's last name)

    def verify(self) -> None:
        try:
            self.check(resolve(self.api))
        except (ImportError, AttributeError, AssertionError, TypeError, ValueError) as e:
            raise AssertionError(f"{self.api} is gone or changed ({e}); {self.used_by} depends on it: "
                                 "adapt that file before upgrading") from None


GUARDS = [
    Guard("transformers.Trainer._track_num_input_tokens", "src/lorakit/train/trainers.py", params("self", "inputs")),
    Guard("transformers.Trainer._get_train_sampler", "src/lorakit/train/trainers.py",
          params("self", "train_dataset")),
    Guard("transformers.Trainer._save_checkpoint", "src/lorakit/train/checkpoints.py",
          params("self", "model", "trial")),
    Guard("transformers.Trainer._get_output_dir", "src/lorakit/train/checkpoints.py", params("self", "trial")),
    Guard("transformers.trainer_utils.rotate_checkpoints", "src/lorakit/train/checkpoints.py",
          params("output_dir", "save_total_limit", "best_model_checkpoint", "use_mtime")),
    Guard("torch.nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model",
          "src/lorakit/train/distributed.py", params("module", "params_and_buffers_to_ignore")),
    Guard("transformers.PretrainedConfig._attn_implementation", "src/lorakit/generate/cpu_inference.py",
          is_property),
    Guard("torch.ops.mkldnn._reorder_linear_weight", "src/lorakit/generate/cpu_inference.py"),
    Guard("torch.ops.mkldnn._linear_pointwise", "src/lorakit/generate/cpu_inference.py"),
    Guard("transformers.modeling_utils.ALL_ATTENTION_FUNCTIONS.get_interface",
          "src/lorakit/generate/cpu_inference.py", params("attn_implementation", "default")),
    Guard("transformers.models.llama.modeling_llama.apply_rotary_pos_emb", "src/lorakit/generate/cpu_inference.py"),
    Guard("transformers.models.llama.modeling_llama.eager_attention_forward",
          "src/lorakit/generate/cpu_inference.py", params("module", "query", "key", "value", "attention_mask")),
    Guard("transformers.integrations.sdpa_attention.sdpa_attention_forward", "src/lorakit/train/packed_attention.py",
          params("module", "query", "key", "value", "attention_mask", "dropout", "scaling")),
    Guard("transformers.integrations.sdpa_attention.repeat_kv", "src/lorakit/train/packed_attention.py",
          params("hidden_states", "n_rep")),
    Guard("transformers.masking_utils.sdpa_mask", "src/lorakit/train/packed_attention.py"),
    Guard("transformers.masking_utils.AttentionMaskInterface.register", "src/lorakit/train/packed_attention.py",
          mention="AttentionMaskInterface"),
    Guard("peft.tuners.tuners_utils.BaseTunerLayer", "src/lorakit/train/lora_layers.py", lora_layer_has_cast_switch,
          mention="cast_input_dtype_enabled"),
    Guard("transformers.Trainer.create_accelerator_and_postprocess", "src/lorakit/train/trainers.py", params("self")),
    Guard("accelerate.PartialState._shared_state", "src/lorakit/train/fsdp.py", is_dict),
]


@pytest.mark.parametrize("guard", GUARDS, ids=lambda g: g.api)
def test_private_api_is_still_there(guard: Guard):
    guard.verify()
    used_by = ROOT / guard.used_by
    name = guard.mention or guard.api.rsplit(".", 1)[-1]
    assert used_by.is_file() and name in used_by.read_text(), \
        f"guard for {guard.api}: {guard.used_by} no longer uses {name}; move or remove the guard"


def test_a_removed_api_fails_with_the_api_and_the_file(monkeypatch):
    """What an upgrade that drops an API looks like: the deletion is planted here."""
    import transformers

    monkeypatch.delattr(transformers.Trainer, "_track_num_input_tokens")
    guard = GUARDS[0]
    with pytest.raises(AssertionError) as e:
        guard.verify()
    assert "transformers.Trainer._track_num_input_tokens" in str(e.value)
    assert "src/lorakit/train/trainers.py" in str(e.value)


def test_a_changed_signature_fails(monkeypatch):
    import transformers

    monkeypatch.setattr(transformers.Trainer, "_get_train_sampler", lambda self, dataset, extra: None)
    with pytest.raises(AssertionError, match="_get_train_sampler is gone or changed"):
        GUARDS[1].verify()
