"""The real smollm2-135m: merge a (random, non-zero) LoRA, export GGUF, and check that llama.cpp itself
(llama-cpp-python, built by scripts/setup.d/40-llama-cpp.sh) generates the same greedy tokens as the
merged Hugging Face model and computes the same logits. (transformers' GGUF loader is checked on the
tiny models in test_export.py, where it is fast.)"""

from __future__ import annotations

import pytest
import torch

from lorakit.checkpoint.verify import logits_of, probe_ids
from lorakit.export.run import export_model
from lorakit.merge.run import merge_model
from lorakit.models import load_model, load_tokenizer, resolve_model_dir
from tiny_models import make_tiny_adapter

pytestmark = pytest.mark.real_model
NEW_TOKENS = 12


def _greedy_hf(model, prompt: list[int]) -> list[int]:
    """Plain argmax decoding (no EOS stop, no logits processors), as llama.cpp's generate does with top_k=1."""
    ids = list(prompt)
    with torch.inference_mode():
        for _ in range(NEW_TOKENS):
            ids.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt):]


def test_smollm2_merge_gguf_transformers_and_llama_cpp_agree(tmp_path):
    base = resolve_model_dir("smollm2-135m")
    # all linear layers, random A and small random B: the merge changes the model but keeps it fluent enough
    # that greedy decoding is not a near-tie everywhere
    adapter = make_tiny_adapter(base, tmp_path / "adapter", r=8, targets="all-linear", init_lora_weights=False)
    merged = merge_model("smollm2-135m", [str(adapter)], tmp_path / "merged")  # verified against PEFT
    assert merged.verify.max_abs_diff <= merged.verify.tolerance

    gguf = tmp_path / "merged-f32.gguf"
    export_model(str(tmp_path / "merged"), "gguf", gguf, "f32", verify=False)  # llama.cpp checks it below

    tok = load_tokenizer(tmp_path / "merged", add_pad_token=False)
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                     add_generation_prompt=True, tokenize=True)
    prompt = list(prompt["input_ids"] if hasattr(prompt, "keys") else prompt)
    hf_model = load_model(tmp_path / "merged", "float32").eval()
    base_model = load_model(base, "float32").eval()
    ids = probe_ids(merged.vocab_size)
    hf_logits = logits_of(hf_model, ids)
    assert (hf_logits - logits_of(base_model, ids)).abs().max() > 0.5  # the adapter changed the model
    hf_tokens = _greedy_hf(hf_model, prompt)
    del base_model

    assert tok.decode(hf_tokens).strip()

    import numpy as np
    from llama_cpp import Llama

    llm = Llama(model_path=str(gguf), n_ctx=256, n_threads=2, verbose=False, seed=0, logits_all=True)
    cpp_tokens: list[int] = []
    for t in llm.generate(prompt, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0):
        cpp_tokens.append(int(t))
        if len(cpp_tokens) == NEW_TOKENS:
            break
    assert cpp_tokens == hf_tokens, (tok.decode(cpp_tokens), tok.decode(hf_tokens))
    # and llama.cpp's logits along the sequence, teacher-forced, match the merged HF model's
    seq = prompt + hf_tokens
    llm.reset()
    llm.eval(seq)
    cpp_logits = torch.from_numpy(np.array(llm.scores[: len(seq)]))
    with torch.inference_mode():
        ref = hf_model(input_ids=torch.tensor([seq])).logits[0]
    assert (cpp_logits - ref).abs().max() <= 1e-2 * ref.abs().max()
