"""`lorakit webui`: a Gradio page like alpaca-lora's (instruction, input, sampling sliders, stream
checkbox) plus a chat tab, both on the shared `Engine` (its worker batches concurrent visitors).

Binds 127.0.0.1 by default; a public Gradio share link only with `--share`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from typing import Any

from lorakit.generate.params import GenerationParams, sampling_params
from lorakit.generate.runner import Engine
from lorakit.generate.session import PromptTooLongError
from lorakit.serve.config import WebuiConfig

log = logging.getLogger("lorakit")

# Nothing is fetched from the internet for the page: no analytics, no remote fonts.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")


def _params(temperature: float, top_p: float, top_k: int, beams: int, max_tokens: int, base: GenerationParams
            ) -> GenerationParams:
    from dataclasses import replace

    return replace(base, temperature=float(temperature), top_p=float(top_p), top_k=int(top_k),
                   num_beams=int(beams), max_new_tokens=int(max_tokens)).validate()


def _run(engine: Engine, ids: list[int], params: GenerationParams, stream: bool) -> Iterator[str]:
    """Yield the growing response; a closed generator (visitor left, Stop pressed) cancels generation."""
    if not stream or params.num_beams > 1:
        yield engine.complete(ids, params).text.strip()
        return
    text = ""
    with engine.stream(ids, params) as chunks:
        for chunk in chunks:
            text += chunk
            yield text.lstrip()


def build_demo(engine: Engine, defaults: GenerationParams | None = None):
    """The gr.Blocks page (not launched)."""
    import gradio as gr

    d = defaults or GenerationParams(max_new_tokens=256, temperature=0.1, top_p=0.75, top_k=40)

    def instruct(instruction: str, input_text: str, temperature: float, top_p: float, top_k: int, beams: int,
                 max_tokens: int, stream: bool) -> Iterator[str]:
        if not instruction.strip():
            raise gr.Error("Type an instruction first.")
        params = _params(temperature, top_p, top_k, beams, max_tokens, d)
        try:
            ids = engine.instruction_ids(instruction, input_text or None)
            engine.check_length(ids, params)
        except PromptTooLongError as e:
            raise gr.Error(str(e)) from None
        yield from _run(engine, ids, params, stream)

    def chat(message: str, history: list[dict[str, Any]], temperature: float, top_p: float, top_k: int,
             beams: int, max_tokens: int, stream: bool) -> Iterator[tuple[list[dict[str, Any]], str]]:
        if not message.strip():
            yield history, ""
            return
        turns = [{"role": m["role"], "content": _text(m["content"])} for m in history]
        turns.append({"role": "user", "content": message})
        params = _params(temperature, top_p, top_k, beams, max_tokens, d)
        ids = engine.chat_ids(turns)
        while len(turns) > 2:  # forget the oldest exchanges when the conversation outgrows the context
            try:
                engine.check_length(ids, params)
                break
            except PromptTooLongError:
                turns = turns[2:]
                ids = engine.chat_ids(turns)
        try:
            engine.check_length(ids, params)
        except PromptTooLongError as e:
            raise gr.Error(str(e)) from None
        shown = [*history, {"role": "user", "content": message}]
        for text in _run(engine, ids, params, stream):
            yield [*shown, {"role": "assistant", "content": text}], ""

    with gr.Blocks(title="lorakit") as demo:
        gr.Markdown(f"## lorakit: {engine.default_model}\nPrompt template: `{engine.prompter.name}`")
        with gr.Row():
            temperature = gr.Slider(0, 2, value=d.temperature, step=0.05, label="Temperature")
            top_p = gr.Slider(0.05, 1, value=d.top_p, step=0.01, label="Top p")
            top_k = gr.Slider(0, 100, value=d.top_k, step=1, label="Top k")
        with gr.Row():
            beams = gr.Slider(1, 4, value=d.num_beams, step=1, label="Beams")
            max_tokens = gr.Slider(1, 2048, value=d.max_new_tokens, step=1, label="Max tokens")
            stream = gr.Checkbox(value=True, label="Stream output")
        sampling = [temperature, top_p, top_k, beams, max_tokens, stream]
        with gr.Tab("Instruction"):
            instruction = gr.Textbox(lines=2, label="Instruction", placeholder="Tell me about alpacas.",
                                     elem_id="instruction")
            input_text = gr.Textbox(lines=2, label="Input", placeholder="none", elem_id="input")
            with gr.Row():
                submit = gr.Button("Submit", variant="primary", elem_id="submit")
                stop = gr.Button("Stop", elem_id="stop")
            output = gr.Textbox(lines=8, label="Output", elem_id="output")
            event = submit.click(instruct, [instruction, input_text, *sampling], output)
            stop.click(None, None, None, cancels=[event])
        with gr.Tab("Chat"):
            chatbot = gr.Chatbot(label="Chat", elem_id="chatbot", height=360)
            message = gr.Textbox(label="Message", placeholder="Say something (Enter to send)", elem_id="message")
            clear = gr.Button("Clear", elem_id="clear")
            message.submit(chat, [message, chatbot, *sampling], [chatbot, message])
            clear.click(lambda: ([], ""), None, [chatbot, message])
    return demo


def _text(content: Any) -> str:
    """Gradio message content: a string, or a list of parts ({"type": "text", "text": ...})."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") if isinstance(p, dict) else str(p) for p in content)
    return str(content)


def run_webui(cfg: WebuiConfig) -> int:
    """The `lorakit webui` verb: load the engine and serve the Gradio page; returns the exit code."""
    from lorakit.generate.backends import load_engine

    engine = load_engine(cfg)
    demo = build_demo(engine, sampling_params(cfg))
    if cfg.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("the web page is reachable from other machines at %s:%d", cfg.host, cfg.port)
    try:
        demo.queue(default_concurrency_limit=16).launch(server_name=cfg.host, server_port=cfg.port,
                                                         share=cfg.share, inbrowser=False, show_error=True)
    finally:
        engine.close()
    return 0
