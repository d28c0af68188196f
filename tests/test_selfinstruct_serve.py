"""`lorakit self-instruct` with real models: its output trains with `lorakit finetune`, and it runs end to
end against `lorakit serve` (a random tiny model that answers nonsense)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lorakit.selfinstruct.config import SelfInstructConfig
from lorakit.selfinstruct.run import generate
from servers import free_port
from test_selfinstruct_e2e import ROOT, SECRET, FakeOpenAI, cli_env, parse_summary, run_cli


@pytest.fixture(scope="module")
def tiny_chat_model(tmp_path_factory) -> Path:
    """A tiny random LLaMA with a ChatML template: trainable, and servable by `lorakit serve`."""
    from tiny_models import make_tiny_llama

    return make_tiny_llama(tmp_path_factory.mktemp("tiny_chat") / "model", chat=True)


def test_output_feeds_finetune(tmp_path, tiny_chat_model):
    """The generated file is training data as is: one LoRA step on a tiny model, through the CLI."""
    from lorakit.cli import main

    out = tmp_path / "gen.jsonl"
    with FakeOpenAI(per_reply=4, seed=11) as server:
        cfg = SelfInstructConfig(api_base=server.url, model="m", num_examples=8, output=str(out), per_request=4)
        assert generate(cfg, SECRET, progress=False).total == 8
    with pytest.raises(SystemExit) as done:
        main(["finetune", "--base-model", str(tiny_chat_model), "--data-path", str(out), "--output-dir",
              str(tmp_path / "lora"), "--max-steps", "1", "--batch-size", "4", "--micro-batch-size", "4",
              "--val-set-size", "0", "--warmup-steps", "0", "--cutoff-len", "64"])
    assert done.value.code == 0
    assert (tmp_path / "lora" / "adapter_model.safetensors").is_file()


def test_against_lorakit_serve(tmp_path, tiny_chat_model):
    """The real pipeline against `lorakit serve` with a random tiny model: its nonsense replies are counted
    as unparseable, the request budget stops the run, nothing crashes and nothing is written."""
    import urllib.request

    port = free_port()
    server_env = cli_env(LORAKIT_API_KEY=SECRET, LORAKIT_LOG_LEVEL="WARNING")
    proc = subprocess.Popen([sys.executable, "-m", "lorakit", "serve", "--base-model", str(tiny_chat_model),
                             "--port", str(port)], env=server_env, cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + 90
        models = None
        while models is None:
            assert proc.poll() is None, proc.communicate()[1]
            assert time.monotonic() < deadline, "lorakit serve did not come up"
            request = urllib.request.Request(f"{base}/models", headers={"Authorization": f"Bearer {SECRET}"})
            try:
                with urllib.request.urlopen(request, timeout=2) as r:
                    models = json.loads(r.read())
            except OSError:
                time.sleep(0.2)
        name = models["data"][0]["id"]
        out = tmp_path / "gen.jsonl"
        res = run_cli(["--api-base", base, "--model", name, "--num-examples", "4", "--output", str(out),
                       "--max-tokens", "8", "--max-requests", "2", "--concurrency", "2", "--timeout", "60"],
                      env=cli_env(LORAKIT_LOG_LEVEL="INFO"), timeout=120)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    assert res.returncode == 1, res.stderr  # stopped by --max-requests, not by an error
    s = parse_summary(res.stdout)
    assert (s["requests"], s["unparseable"], s["kept"], s["retries"]) == (2, 2, 0, 0)
    assert s["prompt_tokens"] > 0 and 0 < s["completion_tokens"] <= 2 * 8
    assert out.read_bytes() == b"" and SECRET not in res.stdout + res.stderr
