"""The Gradio page in a real headless Chromium (Debian's package, driven by Playwright): type an instruction,
press Submit, watch the text stream in, and check it against HF generate run here."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from servers import free_port
from test_generate_helpers import hf_greedy, tiny_chat_model

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
SETUP = Path(__file__).resolve().parents[1] / "scripts" / "setup.d" / "30-chromium.sh"


@pytest.fixture(scope="module")
def chromium() -> str:
    if not Path(CHROMIUM).exists() and shutil.which("apt-get"):
        subprocess.run(["bash", str(SETUP)], check=True, timeout=900)  # the same idempotent set-up as `make test`
    assert Path(CHROMIUM).exists(), f"{CHROMIUM} missing: run {SETUP}"
    return CHROMIUM


@pytest.fixture(scope="module")
def page_url(tmp_path_factory):
    from lorakit.generate import GenerationParams
    from lorakit.generate.config import EngineOptions
    from lorakit.generate.runner import Engine
    from lorakit.serve.webui import build_demo

    model_dir = tiny_chat_model(tmp_path_factory)
    engine = Engine.load(EngineOptions(base_model=str(model_dir), precision="fp32"))
    demo = build_demo(engine, GenerationParams(max_new_tokens=60, temperature=0.0))
    port = free_port()
    demo.queue().launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    yield f"http://127.0.0.1:{port}/", engine, model_dir
    demo.close()
    engine.close()



def submit_and_record(page, url: str, instruction: str, expected: str) -> list[str]:
    """Open the page, submit `instruction` and return every distinct value the output box took while the
    answer streamed in, once it shows `expected`."""
    page.goto(url, wait_until="domcontentloaded", timeout=60_000)
    page.locator("#instruction textarea").fill(instruction)
    # record every distinct value the output box takes while the response streams in
    page.evaluate("""() => { window.__seen = []; setInterval(() => {
        const box = document.querySelector('#output textarea');
        const v = box ? box.value : '';
        if (v && window.__seen[window.__seen.length - 1] !== v) window.__seen.push(v); }, 5); }""")
    page.locator("#submit").click()
    # wait on the recorder, not the box: the box can show the final text a moment before the 5 ms
    # recorder has copied it, and then the last recorded state would lag behind
    page.wait_for_function("(want) => window.__seen.length && window.__seen[window.__seen.length - 1] === want",
                           arg=expected, timeout=60_000)
    return page.evaluate("() => window.__seen")

def test_instruction_streams_into_the_page(chromium, page_url, tmp_path):
    from playwright.sync_api import sync_playwright
    from transformers import AutoModelForCausalLM, AutoTokenizer

    url, engine, model_dir = page_url
    tok = AutoTokenizer.from_pretrained(model_dir)
    ids = tok.apply_chat_template([{"role": "user", "content": "Describe a llama."}], tokenize=True,
                                  add_generation_prompt=True, return_dict=True)["input_ids"]
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    expected = hf_greedy(model, tok, list(ids), 60).strip()
    chat_ids = tok.apply_chat_template([{"role": "user", "content": "Hi llama"}], tokenize=True,
                                       add_generation_prompt=True, return_dict=True)["input_ids"]
    chat_expected = hf_greedy(model, tok, list(chat_ids), 60).strip()

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        seen = submit_and_record(page, url, "Describe a llama.", expected)
        page.screenshot(path=str(tmp_path / "webui.png"), full_page=True)

        # the chat tab: a message and its streamed reply appear in the conversation
        page.get_by_role("tab", name="Chat").click()
        page.locator("#message textarea").fill("Hi llama")
        page.locator("#message textarea").press("Enter")
        bot = page.locator("#chatbot [data-testid='bot']").last
        bot.wait_for(timeout=60_000)
        page.wait_for_function("(want) => { const b = [...document.querySelectorAll(\"#chatbot [data-testid='bot']\")];"
                               " return b.length && b[b.length - 1].innerText.replace(/\\s+/g, ' ').trim() === want; }",
                               arg=" ".join(chat_expected.split()), timeout=60_000)
        page.screenshot(path=str(tmp_path / "webui-chat.png"), full_page=True)
        browser.close()
    assert seen[-1] == expected
    assert len(seen) >= 2 and all(expected.startswith(v.strip()) for v in seen)  # grew piece by piece
    assert (tmp_path / "webui.png").stat().st_size > 10_000
    print(f"screenshot: {tmp_path / 'webui.png'} ({len(seen)} streamed states)")
