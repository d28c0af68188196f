"""Helpers shared by the generate/infer/serve/webui tests: random LoRA adapters and reference generations.

The references are computed independently of lorakit's engine: plain HF `generate`, one prompt at a time.
"""

from __future__ import annotations

from pathlib import Path


def make_adapter(model_dir: Path, out: Path, seed: int = 1, targets: tuple[str, ...] = ("q_proj", "v_proj"),
                 r: int = 4) -> Path:
    """A random (non-zero) LoRA adapter for the tiny model, saved with peft directly."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    peft_model = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(targets),
                                                  init_lora_weights=False))
    with torch.no_grad():  # make the adapter change the logits clearly
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    peft_model.save_pretrained(out)
    return out


def hf_greedy(model, tokenizer, prompt_ids: list[int], max_new_tokens: int) -> str:
    """Reference greedy continuation of one prompt with HF generate (no padding, no lorakit code)."""
    import torch

    with torch.inference_mode():
        out = model.generate(input_ids=torch.tensor([prompt_ids]), attention_mask=torch.ones(1, len(prompt_ids),
                             dtype=torch.long), max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0, len(prompt_ids):], skip_special_tokens=True)


def penalized_greedy(model, tokenizer, prompt_ids: list[int], max_new_tokens: int, presence: float,
                     frequency: float) -> str:
    """Reference greedy continuation with OpenAI's presence/frequency penalties over the generated tokens:
    a cache-free loop (whole sequence through the model each step), no lorakit code."""
    import torch

    seq = list(prompt_ids)
    with torch.inference_mode():
        for _ in range(max_new_tokens):
            logits = model(torch.tensor([seq])).logits[0, -1].float()
            counts = torch.bincount(torch.tensor(seq[len(prompt_ids):], dtype=torch.long), minlength=logits.shape[0])
            seq.append(int((logits - frequency * counts - presence * (counts > 0).float()).argmax()))
    return tokenizer.decode(seq[len(prompt_ids):], skip_special_tokens=True)


def test_make_adapter_changes_the_model(tiny_model_dir, tmp_path):
    """The helper itself: a saved adapter must change greedy output (else adapter tests prove nothing)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    adapter = make_adapter(tiny_model_dir, tmp_path / "a")
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    ids = torch.tensor([[1, 50, 60, 70, 80]])
    before = base(ids).logits
    tuned = PeftModel.from_pretrained(base, str(adapter))
    assert (tuned(ids).logits - before).abs().max() > 0.1


_CHAT_MODEL: dict[str, Path] = {}


def tiny_chat_model(tmp_path_factory) -> Path:
    """A tiny LLaMA with a ChatML chat template, built once per test process (shared by several files)."""
    if "path" not in _CHAT_MODEL:
        from tiny_models import make_tiny_llama

        _CHAT_MODEL["path"] = make_tiny_llama(tmp_path_factory.mktemp("chat") / "tiny-chat", chat=True)
    return _CHAT_MODEL["path"]
