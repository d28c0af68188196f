"""The real smollm2-135m with a (random, non-zero) all-linear adapter: `generate --backend llamacpp` (f32 GGUF +
GGUF LoRA, both made and cached by lorakit) prints the same greedy text as `--backend torch`; `serve
--backend llamacpp` answers an OpenAI chat request with that text."""

from __future__ import annotations

import subprocess
import sys

import httpx
import pytest

from lorakit.models import resolve_model_dir
from servers import lorakit_serve
from tiny_models import make_tiny_adapter

pytestmark = pytest.mark.real_model


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    return make_tiny_adapter(resolve_model_dir("smollm2-135m"), tmp_path_factory.mktemp("real") / "adapter", r=8,
                             targets="all-linear", init_lora_weights=False)


ARGS = ["--base-model", "smollm2-135m", "--precision", "fp32", "--temperature", "0", "--max-new-tokens", "24"]


def test_generate_llamacpp_equals_torch_on_smollm2(adapter):
    texts = {}
    for backend in ("torch", "llamacpp"):
        run = subprocess.run([sys.executable, "-m", "lorakit", "generate", *ARGS, "--lora-weights", str(adapter),
                              "--instruction", "What is the capital of France?", "--backend", backend],
                             capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, run.stderr
        texts[backend] = run.stdout.strip()
    assert texts["llamacpp"] == texts["torch"] and len(texts["torch"].split()) > 5, texts


def test_serve_llamacpp_answers_an_openai_chat_request(adapter, tmp_path):
    args = ["--base-model", "smollm2-135m", "--precision", "fp32", "--lora-weights", f"tuned={adapter}",
            "--backend", "llamacpp"]
    with lorakit_serve(args, tmp_path / "serve.log", timeout=300) as (url, _):
        body = {"model": "tuned", "max_tokens": 24, "temperature": 0,
                "messages": [{"role": "user", "content": "What is the capital of France?"}]}
        r = httpx.post(url + "/v1/chat/completions", json=body, timeout=300)
        assert r.status_code == 200, r.text
        answer = r.json()["choices"][0]["message"]["content"]
        run = subprocess.run([sys.executable, "-m", "lorakit", "generate", *ARGS, "--lora-weights", str(adapter),
                              "--instruction", "What is the capital of France?", "--backend", "torch"],
                             capture_output=True, text=True, timeout=600)
        assert answer == run.stdout.strip() and answer
