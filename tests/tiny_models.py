"""Build tiny random LLaMA models for tests (seconds, a few MB)."""

from __future__ import annotations

from pathlib import Path

# The data files the tests read ship with the repository (data/README.md gives their provenance).
DATA_DIR = Path(__file__).resolve().parents[1] / "data"

# A ChatML template (as SmolLM2 uses) so that `--prompt-template chat` works on tiny models.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def make_tiny_llama(path: Path, *, hidden_size: int = 64, layers: int = 2, heads: int = 4, kv_heads: int = 2,
                    intermediate_size: int = 128, tie_word_embeddings: bool = False, chat: bool = False,
                    seed: int = 0, dtype: str = "float32") -> Path:
    """Save a random LlamaForCausalLM + the shared LLaMA-style SentencePiece tokenizer to `path`.

    With `chat=True` the tokenizer gets ChatML special tokens and template, and EOS = <|im_end|>.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from lorakit.models import load_tokenizer

    tok = load_tokenizer(path, DATA_DIR / "llama_style_bpe_16k.model", add_pad_token=False)
    if chat:
        tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
        tok.eos_token = "<|im_end|>"
        tok.chat_template = CHATML_TEMPLATE
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=hidden_size, intermediate_size=intermediate_size,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         max_position_embeddings=1024, tie_word_embeddings=tie_word_embeddings,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.unk_token_id, rms_norm_eps=1e-5)
    model = LlamaForCausalLM(config).to(getattr(torch, dtype))
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def make_tiny_adapter(model_dir: Path, path: Path, *, r: int = 4, targets: tuple[str, ...] = ("q_proj", "v_proj"),
                      seed: int = 0) -> Path:
    """Save a PEFT LoRA adapter for the model in `model_dir` with random (non-zero) A and B (< 1 s)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    peft_model = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(targets),
                                                  task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    peft_model.save_pretrained(path)
    return path
