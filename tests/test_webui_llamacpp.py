"""The Gradio page on the llama.cpp back-end (`lorakit webui --backend llamacpp`): in a real headless Chromium,
an instruction with a LoRA adapter streams in the same greedy text as PEFT + HF generate (f32 GGUF)."""

from __future__ import annotations

import os

import pytest

from servers import free_port
from test_generate_helpers import hf_greedy, make_adapter, tiny_chat_model
from test_webui import CHROMIUM_ARGS, chromium, submit_and_record  # noqa: F401 (chromium is a fixture)

INSTRUCTION = "Describe a llama."
NEW_TOKENS = 40


@pytest.fixture(scope="module")
def llamacpp_page(tmp_path_factory):
    from lorakit.generate.backends import load_engine
    from lorakit.generate.params import sampling_params
    from lorakit.serve.config import WebuiConfig
    from lorakit.serve.webui import build_demo

    model_dir = tiny_chat_model(tmp_path_factory)
    adapter = make_adapter(model_dir, tmp_path_factory.mktemp("webui-cpp") / "adapter", seed=5,
                           targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"))
    old_cache = os.environ.get("LORAKIT_CACHE")
    os.environ["LORAKIT_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    # the options `lorakit webui --backend llamacpp --precision fp32 --temperature 0` parse into (run_webui)
    cfg = WebuiConfig(base_model=str(model_dir), lora_weights=[str(adapter)], precision="fp32", backend="llamacpp",
                      temperature=0.0, max_new_tokens=NEW_TOKENS)
    engine = load_engine(cfg)
    assert type(engine).__name__ == "LlamaCppEngine"
    demo = build_demo(engine, sampling_params(cfg))
    port = free_port()
    demo.queue().launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    yield f"http://127.0.0.1:{port}/", engine, model_dir, adapter
    demo.close()
    engine.close()
    if old_cache is None:
        os.environ.pop("LORAKIT_CACHE", None)
    else:
        os.environ["LORAKIT_CACHE"] = old_cache


def test_page_generates_through_llamacpp_like_peft(chromium, llamacpp_page, tmp_path):  # noqa: F811
    from peft import PeftModel
    from playwright.sync_api import sync_playwright
    from transformers import AutoModelForCausalLM, AutoTokenizer

    url, engine, model_dir, adapter = llamacpp_page
    tok = AutoTokenizer.from_pretrained(model_dir)
    ids = tok.apply_chat_template([{"role": "user", "content": INSTRUCTION}], tokenize=True,
                                  add_generation_prompt=True, return_dict=True)["input_ids"]
    base = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    without = hf_greedy(base, tok, list(ids), NEW_TOKENS).strip()
    expected = hf_greedy(PeftModel.from_pretrained(base, adapter).eval(), tok, list(ids), NEW_TOKENS).strip()
    assert expected and expected != without  # the adapter changes the answer
    steps_before = engine.batches_run

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        seen = submit_and_record(page, url, INSTRUCTION, expected)
        page.screenshot(path=str(tmp_path / "webui-llamacpp.png"), full_page=True)
        browser.close()
    assert seen[-1] == expected
    assert all(expected.startswith(v.strip()) for v in seen)  # streamed piece by piece, never wrong text
    assert engine.batches_run > steps_before  # llama.cpp's decode loop ran the request
