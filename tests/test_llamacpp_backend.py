"""`--backend llamacpp`: the same answers as the torch back-end (f32 GGUF, so logits agree to ~1e-6), the
same streaming and concurrency behaviour, and clear refusals."""

from __future__ import annotations

import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

from lorakit.generate import GenerationParams
from lorakit.generate.backends import load_engine, resolve_backend
from lorakit.generate.config import EngineOptions, GenerateConfig
from lorakit.generate.runner import Engine
from test_generate_helpers import make_adapter, tiny_chat_model

QUESTIONS = ["What is the capital of France?", "Count to five.", "Name a colour.", "Say hi.", "Why is the sky blue?"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    model_dir = tiny_chat_model(tmp_path_factory)
    root = tmp_path_factory.mktemp("cpp")
    adapter = make_adapter(model_dir, root / "alpha", seed=7, targets=("q_proj", "k_proj", "v_proj", "o_proj",
                                                                       "gate_proj", "down_proj"))
    return {"model_dir": model_dir, "adapter": adapter, "root": root}


@pytest.fixture(scope="module")
def engines(setup, tmp_path_factory):
    import os

    os.environ["LORAKIT_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    opts = dict(base_model=str(setup["model_dir"]), precision="fp32", lora_weights=[f"alpha={setup['adapter']}"],
                merge=False)
    torch_engine = load_engine(EngineOptions(**opts, backend="torch"))
    cpp_engine = load_engine(EngineOptions(**opts, backend="llamacpp"), max_batch_size=4)
    assert type(torch_engine) is Engine and type(cpp_engine).__name__ == "LlamaCppEngine"
    yield torch_engine, cpp_engine
    torch_engine.close()
    cpp_engine.close()


def test_greedy_text_equals_torch_backend_with_and_without_the_adapter(engines):
    torch_engine, cpp = engines
    params = GenerationParams(max_new_tokens=24)
    for q in QUESTIONS[:3]:
        ids = cpp.chat_ids([{"role": "user", "content": q}])
        assert ids == torch_engine.chat_ids([{"role": "user", "content": q}])
        for adapter in ("alpha", None):
            want = torch_engine.complete(ids, params, adapter=adapter)
            got = cpp.complete(ids, params, adapter=adapter)
            assert got.text == want.text and got.finish_reason == want.finish_reason, (q, adapter)
    ids = cpp.chat_ids([{"role": "user", "content": QUESTIONS[0]}])
    assert cpp.complete(ids, params, "alpha").text != cpp.complete(ids, params, None).text  # the adapter matters


def test_sampling_penalties_and_seeds_match_torch(engines):
    torch_engine, cpp = engines
    ids = cpp.chat_ids([{"role": "user", "content": QUESTIONS[1]}])
    for params in [GenerationParams(max_new_tokens=20, repetition_penalty=1.3),
                   GenerationParams(max_new_tokens=20, presence_penalty=0.8, frequency_penalty=0.4),
                   GenerationParams(max_new_tokens=20, temperature=0.9, top_p=0.9, top_k=30, seed=11)]:
        assert cpp.complete(ids, params, "alpha").text == torch_engine.complete(ids, params, "alpha").text, params


def test_concurrent_streams_each_get_their_own_answer(engines):
    torch_engine, cpp = engines
    params = GenerationParams(max_new_tokens=16)
    prompts = [cpp.chat_ids([{"role": "user", "content": q}]) for q in QUESTIONS]
    want = [torch_engine.complete(p, params, "alpha").text for p in prompts]

    def streamed(p):
        return "".join(cpp.stream(p, params, "alpha"))

    before = cpp.batches_run
    with ThreadPoolExecutor(5) as pool:
        got = list(pool.map(streamed, prompts))
    assert got == want
    assert max(cpp.batch_sizes[before:]) > 1  # requests shared decode steps (max_batch_size 4 < 5 requests)


def test_generate_many_for_batch_files(engines):
    torch_engine, cpp = engines
    params = GenerationParams(max_new_tokens=12)
    prompts = [cpp.chat_ids([{"role": "user", "content": q}]) for q in QUESTIONS]
    got = [r.text for batch in cpp.generate_many(prompts, params, batch_size=3, adapter="alpha") for r in batch]
    want = [r.text for batch in torch_engine.generate_many(prompts, params, 3, adapter="alpha") for r in batch]
    assert got == want


def test_cli_generate_llamacpp_and_refusals(setup, tmp_path):
    base = ["--base-model", str(setup["model_dir"]), "--precision", "fp32", "--lora-weights", str(setup["adapter"]),
            "--instruction", "Say hi.", "--max-new-tokens", "12", "--temperature", "0"]
    env = {**__import__("os").environ, "LORAKIT_CACHE": str(tmp_path / "cache")}
    texts = {}
    for backend in ("torch", "llamacpp"):
        run = subprocess.run([sys.executable, "-m", "lorakit", "generate", *base, "--backend", backend],
                             capture_output=True, text=True, timeout=300, env=env)
        assert run.returncode == 0, run.stderr
        texts[backend] = run.stdout
    assert texts["torch"] == texts["llamacpp"] and texts["torch"].strip()
    run = subprocess.run([sys.executable, "-m", "lorakit", "generate", *base, "--backend", "llamacpp",
                          "--num-beams", "2"], capture_output=True, text=True, timeout=120, env=env)
    assert run.returncode == 2 and "beam search" in run.stderr and len(run.stderr.strip().splitlines()) == 1


def test_auto_backend_picks_torch_for_adapters_that_train_embeddings(setup, tmp_path):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(setup["model_dir"])
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["embed_tokens"]))
    peft_model.save_pretrained(tmp_path / "emb")
    opts = GenerateConfig(base_model=str(setup["model_dir"]), lora_weights=[str(tmp_path / "emb")])
    assert resolve_backend(opts) == "torch"
    assert resolve_backend(GenerateConfig(base_model=str(setup["model_dir"]))) == (
        "torch" if torch.cuda.is_available() else "llamacpp")
    opts.backend = "llamacpp"
    with pytest.raises(Exception, match="merge it"):
        resolve_backend(opts)


def test_prompts_admitted_together_are_prefilled_in_one_decode(engines, monkeypatch):
    torch_engine, cpp = engines
    real, seqs_per_decode = cpp.runner.decode, []

    def counting(entries):
        seqs_per_decode.append(len({seq for _, _, seq, _ in entries}))
        return real(entries)

    monkeypatch.setattr(cpp.runner, "decode", counting)
    params = GenerationParams(max_new_tokens=6)
    prompts = [cpp.chat_ids([{"role": "user", "content": q}]) for q in QUESTIONS[:3]]
    got = [r.text for batch in cpp.generate_many(prompts, params, batch_size=3, adapter="alpha") for r in batch]
    assert seqs_per_decode[0] == 3  # the three prompts in one llama_decode
    want = [r.text for batch in torch_engine.generate_many(prompts, params, 3, adapter="alpha") for r in batch]
    assert got == want
