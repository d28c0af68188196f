"""The real smollm2-135m with a (random, non-zero) all-linear adapter: `generate --backend llamacpp` (f32 GGUF +
GGUF LoRA, both made and cached by lorakit) prints the same greedy text as `--backend torch`; `serve
--backend llamacpp` answers an OpenAI chat request with that text."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import httpx
import pytest
import torch

from lorakit.models import load_model, resolve_model_dir

pytestmark = pytest.mark.real_model


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = load_model(resolve_model_dir("smollm2-135m"), "float32")
    peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear",
                                                  init_lora_weights=False))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn_like(p) * 0.02)
    out = tmp_path_factory.mktemp("real") / "adapter"
    peft_model.save_pretrained(out)
    return out


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
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = (tmp_path / "serve.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "lorakit", "serve", "--base-model", "smollm2-135m", "--precision",
                             "fp32", "--lora-weights", f"tuned={adapter}", "--backend", "llamacpp", "--port",
                             str(port)], stdout=log, stderr=subprocess.STDOUT, env={**os.environ})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "serve.log").read_text()
            time.sleep(0.5)
        body = {"model": "tuned", "max_tokens": 24, "temperature": 0,
                "messages": [{"role": "user", "content": "What is the capital of France?"}]}
        r = httpx.post(url + "/v1/chat/completions", json=body, timeout=300)
        assert r.status_code == 200, r.text
        answer = r.json()["choices"][0]["message"]["content"]
        run = subprocess.run([sys.executable, "-m", "lorakit", "generate", *ARGS, "--lora-weights", str(adapter),
                              "--instruction", "What is the capital of France?", "--backend", "torch"],
                             capture_output=True, text=True, timeout=600)
        assert answer == run.stdout.strip() and answer
    finally:
        proc.terminate()
        proc.wait(timeout=30)
