"""`lorakit generate`: one response (streamed as it is generated), or an interactive chat session."""

from __future__ import annotations

import contextlib
import sys
from typing import TextIO

from lorakit.generate.config import GenerateConfig
from lorakit.generate.params import GenerationParams, sampling_params
from lorakit.generate.runner import Engine
from lorakit.generate.session import PromptTooLongError

HELP = "commands: /reset (forget the conversation), /exit (quit; Ctrl-D too)"


def respond(engine: Engine, prompt_ids: list[int], params: GenerationParams, stream: bool, out: TextIO) -> str:
    """Generate one response, printing it (chunk by chunk when streaming); Ctrl-C stops it early."""
    if not stream or params.num_beams > 1:
        text = engine.complete(prompt_ids, params).text.strip()
        print(text, file=out, flush=True)
        return text
    pieces: list[str] = []
    chunks = engine.stream(prompt_ids, params)
    try:
        for chunk in chunks:
            if not pieces:
                chunk = chunk.lstrip()
            pieces.append(chunk)
            out.write(chunk)
            out.flush()
    except KeyboardInterrupt:
        chunks.close()
        out.write(" [stopped]")
    out.write("\n")
    out.flush()
    return "".join(pieces).strip()


def interactive(engine: Engine, params: GenerationParams, stream: bool, out: TextIO = sys.stdout) -> None:
    """A multi-turn session: history is kept (and trimmed from the oldest turns to fit the context)."""
    print(f"lorakit chat with {engine.default_model} (template {engine.prompter.name}). {HELP}", file=out, flush=True)
    with contextlib.suppress(ImportError):
        import readline  # noqa: F401  (line editing and history for input(); also puts the prompt on stdout)
    history: list[dict[str, str]] = []
    while True:
        try:
            line = input(">>> ")
        except EOFError:
            print(file=out)
            return
        except KeyboardInterrupt:
            print(file=out)
            continue
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            return
        if text == "/reset":
            history.clear()
            print("(conversation reset)", file=out, flush=True)
            continue
        if text.startswith("/"):
            print(f"unknown command {text.split()[0]}; {HELP}", file=out, flush=True)
            continue
        history.append({"role": "user", "content": text})
        while True:
            ids = engine.chat_ids(history)
            try:
                engine.check_length(ids, params)
                break
            except PromptTooLongError:
                if len(history) <= 1:
                    print("(message too long for the model's context)", file=out, flush=True)
                    history.clear()
                    ids = []
                    break
                del history[:2]  # forget the oldest exchange
        if not ids:
            continue
        answer = respond(engine, ids, params, stream, out)
        history.append({"role": "assistant", "content": answer})


def run_generate(cfg: GenerateConfig) -> int:
    """The `lorakit generate` verb: one prompt, or an interactive session; returns the exit code."""
    params = sampling_params(cfg)
    from lorakit.generate.backends import load_engine

    engine = load_engine(cfg)
    try:
        if cfg.instruction is None:
            interactive(engine, params, cfg.stream)
        else:
            ids = engine.instruction_ids(cfg.instruction, cfg.input)
            respond(engine, ids, params, cfg.stream, sys.stdout)
    finally:
        engine.close()
    return 0
