"""`lorakit generate` as a user runs it: one-shot (subprocess) and interactive (through a pseudo-terminal)."""

from __future__ import annotations

import os
import pty
import select
import subprocess
import sys
import time

import pytest

from lorakit.models import load_model_and_tokenizer
from test_generate_helpers import hf_greedy, tiny_chat_model


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    path = tiny_chat_model(tmp_path_factory)
    model, tok = load_model_and_tokenizer(str(path))
    return path, model.eval(), tok


def chat_reference(model, tok, messages, n):
    """Greedy reply computed without lorakit's prompt code: the tokenizer's own chat template + HF generate."""
    ids = tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_dict=False)
    ids = list(ids["input_ids"]) if isinstance(ids, dict) or hasattr(ids, "keys") else list(ids)
    return hf_greedy(model, tok, ids, n).strip()


def lorakit(*args: str) -> list[str]:
    return [sys.executable, "-m", "lorakit", *args]


def test_one_shot_prints_the_response(chat_model, capsys, caplog):
    from lorakit.cli import main

    path, model, tok = chat_model
    expected = chat_reference(model, tok, [{"role": "user", "content": "Name a color.\n\nred or blue"}], 12)
    with caplog.at_level("INFO", logger="lorakit"), pytest.raises(SystemExit) as exit_info:
        main(["generate", "--base-model", str(path), "--precision", "fp32",
              "--instruction", "Name a color.", "--input", "red or blue",
              "--temperature", "0", "--max-new-tokens", "12"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == expected
    assert "template 'chat'" in caplog.text  # auto: the tokenizer has a chat template


def test_bad_option_is_a_clear_error(chat_model):
    path, _, _ = chat_model
    proc = subprocess.run(lorakit("generate", "--base-model", str(path), "--instruction", "x", "--top-p", "0"),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "top_p" in proc.stderr and "Traceback" not in proc.stderr


class Terminal:
    """A child process on a pseudo-terminal; `expect` reads until a marker appears."""

    def __init__(self, argv: list[str]):
        self.master, slave = pty.openpty()
        self.proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=subprocess.DEVNULL, close_fds=True,
                                     env={**os.environ, "HF_HUB_OFFLINE": "1", "TERM": "dumb"})
        os.close(slave)
        self.buffer = ""

    def expect(self, marker: str, timeout: float = 90) -> str:
        end = time.monotonic() + timeout
        while marker not in self.buffer:
            ready, _, _ = select.select([self.master], [], [], max(0.0, end - time.monotonic()))
            if not ready:
                raise AssertionError(f"timed out waiting for {marker!r}; got {self.buffer!r}")
            self.buffer += os.read(self.master, 4096).decode("utf-8", errors="replace").replace("\r\n", "\n")
        before, _, self.buffer = self.buffer.partition(marker)
        return before

    def send(self, line: str) -> None:
        os.write(self.master, (line + "\n").encode())


def test_interactive_session_keeps_history_and_resets(chat_model):
    path, model, tok = chat_model
    n = 8
    r1 = chat_reference(model, tok, [{"role": "user", "content": "hello"}], n)
    r2 = chat_reference(model, tok, [{"role": "user", "content": "hello"}, {"role": "assistant", "content": r1},
                                     {"role": "user", "content": "again"}], n)
    r3 = chat_reference(model, tok, [{"role": "user", "content": "again"}], n)
    assert r2 != r3  # the history must matter for this test to mean anything
    term = Terminal(lorakit("generate", "--base-model", str(path), "--precision", "fp32", "--temperature", "0",
                            "--max-new-tokens", str(n)))
    try:
        term.expect(">>> ")
        replies = []
        for line in ("hello", "again", "/reset", "again"):
            term.send(line)
            replies.append(term.expect(">>> ").split("\n", 1)[1].strip())  # drop the echoed input line
        term.send("/exit")
        assert term.proc.wait(timeout=30) == 0
    finally:
        if term.proc.poll() is None:
            term.proc.kill()
        os.close(term.master)
    assert replies == [r1, r2, "(conversation reset)", r3]
