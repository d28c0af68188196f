"""The adapter folder a run leaves: adapter + tokenizer + config written to a temp folder, checked
(not empty, not all-zero), then moved in; and an adapter's weights loaded to start a run from."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lorakit.config import save_yaml
from lorakit.errors import LorakitError

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase, Trainer

log = logging.getLogger("lorakit")
ADAPTER_FILE = "adapter_model.safetensors"


def load_adapter_weights(peft_model, adapter_dir: str) -> None:
    """Load the adapter in `adapter_dir` into `peft_model`'s LoRA weights (a run starting from it)."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    state = load_file(str(Path(adapter_dir) / ADAPTER_FILE))
    result = set_peft_model_state_dict(peft_model, state)
    if getattr(result, "unexpected_keys", None):
        raise LorakitError(f"adapter {adapter_dir} does not fit this model/LoRA config: unexpected keys "
                           f"{result.unexpected_keys[:3]}")
    log.info("starting from the weights of adapter %s (optimizer and schedule start fresh)", adapter_dir)


def check_saved_adapter(folder: Path, trainable: dict[str, torch.Tensor]) -> None:
    """Refuse an empty or all-zero adapter file (alpaca-lora's silent state_dict bug)."""
    from safetensors import safe_open

    with safe_open(str(folder / ADAPTER_FILE), framework="pt") as f:
        keys = list(f.keys())
        lora_b = [f.get_tensor(k) for k in keys if "lora_B" in k]
    if not keys or len(keys) < len(trainable):
        raise LorakitError(f"saved adapter has {len(keys)} tensors, expected {len(trainable)}: not saved correctly")
    if lora_b and all(not t.any() for t in lora_b):
        log.warning("all LoRA B matrices are zero: the adapter does not change the model yet")


def save_final(trainer: Trainer, tokenizer: PreTrainedTokenizerBase, cfg: Any, out: Path,
                state_dict: dict[str, torch.Tensor]) -> None:
    """Adapter, tokenizer and config into a temp folder, checked, then moved into `out` file by file.

    `state_dict` is the full model's, gathered by accelerate (see `train`): PEFT keeps its adapter part."""
    tmp = out / ".final-tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model = trainer.accelerator.unwrap_model(trainer.model)
    # Embeddings trained as modules_to_save are saved as such; peft's extra "embedding layers" copy
    # (on by default after a vocab resize) would store them twice more, plus the untrained originals.
    full_embeddings = {"embed_tokens", "lm_head"} & set(getattr(cfg, "modules_to_save", None) or [])
    model.save_pretrained(str(tmp), state_dict=state_dict, save_embedding_layers=False if full_embeddings else "auto")
    tokenizer.save_pretrained(str(tmp))
    save_yaml(cfg, tmp / "lorakit_config.yaml")
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    check_saved_adapter(tmp, trainable)
    for item in tmp.iterdir():
        os.replace(item, out / item.name)
    tmp.rmdir()
