"""End-to-end tests of `lorakit self-instruct` against a misbehaving fake OpenAI-compatible server.

The fake server (127.0.0.1, a thread of the test process) plays a script of answers, one per HTTP
request: 500, 429 with Retry-After, a hang past the client timeout, a dropped connection, fenced JSON,
prose, broken/missing/repeated items, a truncated array. After the script it invents fresh tasks from
random pseudo-words (so they are never near-duplicates of each other), optionally mixed with exact and
near copies of earlier ones.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from lorakit.data import read_examples
from lorakit.selfinstruct.client import RequestFailed
from lorakit.selfinstruct.config import SelfInstructConfig
from lorakit.selfinstruct.dedup import rouge_l
from lorakit.selfinstruct.run import generate

ROOT = Path(__file__).resolve().parents[1]
SECRET = "sk-test-SECRET-4f9a2c"
_SYLLABLES = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]


def pseudo_words(rng: random.Random, n: int) -> str:
    return " ".join("".join(rng.choice(_SYLLABLES) for _ in range(3)) for _ in range(n))


def item(instruction: str, output: str = "an answer", input: str = "") -> dict[str, str]:  # noqa: A002
    return {"instruction": instruction, "input": input, "output": output}


class FakeOpenAI:
    """A scripted OpenAI-compatible chat server. Actions (dicts), consumed one per request:

    {"status": code, "headers": {...}, "body": {...}}  an error answer
    {"drop": True}                                       close the connection without answering
    {"sleep": s, "text": t}                              answer t after s seconds
    {"text": t, "usage": (p, c) | None, "finish": f}    a chat completion whose content is t
    When the script is exhausted: `per_reply` fresh tasks (plus `repeats` exact and `near` near copies
    of tasks served earlier), after `delay` seconds.
    """

    def __init__(self, script: list[dict[str, Any]] | None = None, *, per_reply: int = 5, delay: float = 0.0,
                 repeats: int = 0, near: int = 0, seed: int = 0):
        self.script = list(script or [])
        self.per_reply, self.delay, self.repeats, self.near = per_reply, delay, repeats, near
        self.rng = random.Random(seed)
        self.lock = threading.Lock()
        self.requests: list[dict[str, Any]] = []  # time, auth, body
        self.served: list[dict[str, str]] = []  # fresh tasks invented by the generator
        self.in_flight = self.max_in_flight = 0
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                with server.lock:
                    server.requests.append({"time": time.monotonic(), "path": self.path, "body": body,
                                            "auth": self.headers.get("Authorization")})
                    action = server.script.pop(0) if server.script else None
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                try:
                    self._act(action, body)
                except (BrokenPipeError, ConnectionResetError):
                    pass
                finally:
                    with server.lock:
                        server.in_flight -= 1

            def _send(self, code: int, payload: Any, headers: dict[str, str] | None = None) -> None:
                data = json.dumps(payload).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

            def _act(self, action: dict[str, Any] | None, body: dict[str, Any]) -> None:
                if action is None:
                    action = server.invent()
                if "status" in action:
                    self._send(action["status"], action.get("body", {"error": {"message": "boom"}}),
                               action.get("headers"))
                    return
                if action.get("drop"):
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                time.sleep(action.get("sleep", 0.0))
                payload: dict[str, Any] = {
                    "id": "chatcmpl-fake", "object": "chat.completion", "created": 0, "model": body.get("model"),
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": action["text"]},
                                 "finish_reason": action.get("finish", "stop")}]}
                usage = action.get("usage", (100, 50))
                if usage is not None:
                    payload["usage"] = {"prompt_tokens": usage[0], "completion_tokens": usage[1],
                                        "total_tokens": usage[0] + usage[1]}
                self._send(200, payload)

        class Server(ThreadingHTTPServer):
            def handle_error(self, request: Any, client_address: Any) -> None:
                pass  # clients killed mid-request (the kill -9 test) are expected here

        self.httpd = Server(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)

    def invent(self) -> dict[str, Any]:
        with self.lock:
            fresh = [item(pseudo_words(self.rng, 7), pseudo_words(self.rng, 5)) for _ in range(self.per_reply)]
            copies = [dict(self.rng.choice(self.served)) for _ in range(self.repeats)] if self.served else []
            nears = []
            for _ in range(self.near if self.served else 0):
                words = self.rng.choice(self.served)["instruction"].split()
                words[self.rng.randrange(len(words))] = "changed"
                nears.append(item(" ".join(words)))
            mixed = fresh + copies + nears
            self.rng.shuffle(mixed)
            self.served.extend(x for x in mixed if any(x is f for f in fresh))  # in the order sent
        return {"text": json.dumps(mixed), "sleep": self.delay}

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def __enter__(self) -> FakeOpenAI:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def cli_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("OPENAI_API_KEY",)}
    env.update(OPENAI_API_KEY=SECRET, LORAKIT_LOG_LEVEL="DEBUG", PYTHONPATH=str(ROOT / "src"))
    env.update(extra)
    return env


def run_cli(args: list[str], env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lorakit", "self-instruct", *args], capture_output=True,
                          text=True, env=env or cli_env(), timeout=timeout, cwd=ROOT)


def parse_summary(stdout: str) -> dict[str, int]:
    """The numbers of the printed summary, by name."""
    out: dict[str, int] = {}
    patterns = {"total": r"holds (\d+) of", "existing": r"\((\d+) before", "new": r"\+ (\d+) new",
                "requests": r"requests: (\d+)", "unparseable": r"unparseable replies: (\d+)",
                "truncated": r"truncated: (\d+)", "retries": r"retries: (\d+)", "items": r"items: (\d+)",
                "kept": r"kept: (\d+)", "dropped": r"dropped: (\d+)", "surplus": r"reaching N: (\d+)",
                "prompt_tokens": r"(\d+) prompt", "completion_tokens": r"(\d+) completion"}
    for name, pattern in patterns.items():
        m = re.search(pattern, stdout)
        assert m, f"{name!r} not in summary:\n{stdout}"
        out[name] = int(m.group(1))
    for name in ("429", "5xx", "timeout", "connection", "malformed", "missing_field", "duplicate", "similar"):
        m = re.search(rf"\b{name}: (\d+)", stdout)
        out[name] = int(m.group(1)) if m else 0
    return out


def lines_of(path: Path) -> list[dict[str, Any]]:
    raw = path.read_bytes()
    assert raw.endswith(b"\n"), "last line is not complete"
    return [json.loads(line) for line in raw.decode().splitlines()]


def test_misbehaving_server_exact_counts(tmp_path):
    a = [item("Name three primary colors used in painting", "Red, yellow and blue."),
         item("Convert seventy degrees Fahrenheit into Celsius", "About 21.1 degrees Celsius."),
         item("Summarize the following paragraph in one sentence", "Cats sleep a lot.", "Cats sleep 16 hours.")]
    b = [item("Write a haiku about autumn leaves falling slowly", "Red leaves drift and fall..."),
         item("List two advantages of learning a second language", "Travel and better memory.")]
    near_b0 = item("Write a haiku about autumn leaves falling quietly", "Another poem.")  # 7 of 8 words shared
    c1 = item("Explain why the sky looks blue during the day", "Rayleigh scattering of sunlight.")
    fence = "Sure! Here are the tasks:\n```json\n" + json.dumps(b + [a[0]], indent=2) + "\n```\nHope this helps."
    broken = ('Of course. Here you go:\n[' + json.dumps(c1) +
              ', {"instruction": "Translate hello into French", "input": "", "output": "Bonjour",},'
              ' "oops", {"instruction": "Describe a cat"}, {"instruction": "", "output": "nothing"}, '
              + json.dumps(near_b0) + ', {"instruction": 5, "output": "five"}]\nLet me know if you need more.')
    d = ('[{"Instruction": "Give an antonym for the word generous", "Input": "<noinput>", "Output": "Stingy."},'
         ' {"instruction": "Sort these numbers in ascending order", "input": "5, 2, 9", "output": "2, 5, 9"},'
         ' {"instruction": "Write a limerick about a')
    script = [{"status": 500}, {"status": 429, "headers": {"Retry-After": "1"}},
              {"text": json.dumps(a)}, {"sleep": 1.5, "text": "[]"}, {"text": fence}, {"text": broken},
              {"text": "I'm sorry, but I can't help with that.", "usage": None}, {"drop": True},
              {"text": d, "finish": "length", "usage": (100, 60)}]
    out = tmp_path / "gen.jsonl"
    with FakeOpenAI(script, per_reply=5) as server:
        res = run_cli(["--api-base", server.url, "--model", "fake-model", "--num-examples", "12", "--output", str(out),
                       "--concurrency", "1", "--per-request", "5", "--timeout", "0.5", "--backoff", "0.05",
                       "--max-retries", "3", "--temperature", "0.7", "--seed", "1"])
    assert res.returncode == 0, res.stderr
    s = parse_summary(res.stdout)
    assert (s["total"], s["existing"], s["new"], s["kept"]) == (12, 0, 12, 12)
    assert (s["requests"], s["unparseable"], s["truncated"]) == (6, 1, 1)
    assert (s["retries"], s["429"], s["5xx"], s["timeout"], s["connection"]) == (4, 1, 1, 1, 1)
    assert (s["malformed"], s["missing_field"], s["duplicate"], s["similar"], s["dropped"]) == (4, 2, 1, 1, 8)
    assert (s["items"], s["surplus"]) == (21, 1)
    assert (s["prompt_tokens"], s["completion_tokens"]) == (500, 260)
    assert len(server.requests) == 10

    # exactly the expected records, in order, readable as training data
    expected = [x["instruction"] for x in a + b] + [c1["instruction"], "Give an antonym for the word generous",
                                                   "Sort these numbers in ascending order"]
    expected += [x["instruction"] for x in server.served[:4]]
    records = lines_of(out)
    assert [r["instruction"] for r in records] == expected
    examples, skipped = read_examples(out)
    assert len(examples) == 12 and not skipped and all(e.is_alpaca for e in examples)
    assert examples[6].input == "" and examples[7].input == "5, 2, 9"

    # the key went to the server, but never to the terminal or the logs (DEBUG level)
    assert {r["auth"] for r in server.requests} == {f"Bearer {SECRET}"}
    assert SECRET not in res.stdout + res.stderr
    assert "retry" in res.stderr  # the DEBUG log did run
    assert "self-instruct: 100%" in res.stderr and "12/12" in res.stderr  # the progress bar
    # Retry-After honored: the request after the 429 came >= 1 s later; a plain backoff is far shorter
    times = [r["time"] for r in server.requests]
    assert times[2] - times[1] >= 0.95
    assert times[1] - times[0] < 0.5
    body = server.requests[0]["body"]
    assert body["model"] == "fake-model" and body["temperature"] == 0.7
    assert "5" in body["messages"][0]["content"] and "JSON" in body["messages"][0]["content"]


def test_resume_primes_dedup_and_repairs_partial_line(tmp_path):
    out = tmp_path / "gen.jsonl"
    cfg = SelfInstructConfig(api_base="http://x/v1", model="m", num_examples=6, output=str(out), per_request=4,
                             concurrency=1, backoff=0.01)
    with FakeOpenAI(per_reply=4, seed=3) as server:
        cfg.api_base = server.url
        st = generate(cfg, SECRET, progress=False)
        assert (st.kept, st.surplus, st.requests) == (6, 2, 2)
        first = lines_of(out)
        assert [r["instruction"] for r in first] == [x["instruction"] for x in server.served[:6]]
        surplus = server.served[6:8]
    with out.open("ab") as f:  # what a kill in the middle of a write leaves behind
        f.write(b'{"instruction": "half a rec')
    again = [dict(first[0]), dict(first[3]), item(first[5]["instruction"].upper() + "!", "other output")]
    script = [{"text": json.dumps(again + surplus + [item("A brand new task about tea", "Drink it.")])}]
    cfg.num_examples = 10
    with FakeOpenAI(script, per_reply=4, seed=4) as server:
        cfg.api_base = server.url
        st = generate(cfg, SECRET, progress=False)
        assert st.existing == 6 and st.repaired_bytes == len(b'{"instruction": "half a rec')
        assert (st.kept, st.dropped["duplicate"], st.requests, st.surplus) == (4, 3, 2, 3)
        final = lines_of(out)
        assert final[:6] == first
        assert [r["instruction"] for r in final[6:]] == [x["instruction"] for x in surplus] + [
            "A brand new task about tea", server.served[0]["instruction"]]
    with FakeOpenAI() as server:  # already complete: no request at all
        cfg.api_base = server.url
        st = generate(cfg, SECRET, progress=False)
        assert (st.existing, st.kept, st.requests, len(server.requests)) == (10, 0, 0, 0)
    assert len(read_examples(out)[0]) == 10


def test_seed_tasks_are_shown_and_never_copied(tmp_path):
    seeds = tmp_path / "seeds.jsonl"
    seed_items = [item("Suggest a name for a bakery", "Crumb & Co."),
                  {"instruction": "Is this review positive?", "instances": [{"input": "Great!", "output": "Yes"}]}]
    seeds.write_text("".join(json.dumps(x) + "\n" for x in seed_items))
    new = item("Describe the smell of rain in one sentence", "Earthy and fresh.")
    script = [{"text": json.dumps([item("Suggest a name for a bakery!", "Flour Power"), new])}]
    out = tmp_path / "gen.jsonl"
    with FakeOpenAI(script) as server:
        cfg = SelfInstructConfig(api_base=server.url, model="m", num_examples=1, output=str(out),
                                 seed_tasks=str(seeds), concurrency=1)
        st = generate(cfg, SECRET, progress=False)
    assert (st.kept, st.dropped["duplicate"]) == (1, 1)
    assert lines_of(out) == [new]
    prompt = server.requests[0]["body"]["messages"][0]["content"]
    assert "Suggest a name for a bakery" in prompt and "Is this review positive?" in prompt


def test_concurrency_and_exact_stop(tmp_path):
    out = tmp_path / "gen.jsonl"
    with FakeOpenAI(per_reply=3, delay=0.1, repeats=1, near=1, seed=5) as server:
        cfg = SelfInstructConfig(api_base=server.url, model="m", num_examples=40, output=str(out), per_request=3,
                                 concurrency=4, backoff=0.01)
        st = generate(cfg, SECRET, progress=False)
    assert server.max_in_flight == 4
    records = lines_of(out)
    assert len(records) == 40 == st.kept
    assert len({r["instruction"] for r in records}) == 40
    assert st.dropped["duplicate"] + st.dropped["similar"] > 0
    assert st.items == st.kept + sum(st.dropped.values()) + st.surplus


def _count_lines(path: Path) -> int:
    try:
        return path.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def test_kill_9_then_rerun(tmp_path):
    """Kill the generator twice at arbitrary moments; the final file is exact, valid and unique."""
    out = tmp_path / "gen.jsonl"
    n = 300
    with FakeOpenAI(per_reply=5, delay=0.03, repeats=1, near=1, seed=7) as server:
        args = ["--api-base", server.url, "--model", "m", "--num-examples", str(n), "--output", str(out),
                "--per-request", "5", "--concurrency", "3", "--backoff", "0.01"]
        cmd = [sys.executable, "-m", "lorakit", "self-instruct", *args]
        env = cli_env(LORAKIT_LOG_LEVEL="WARNING")
        for i, threshold in enumerate((40, 160)):
            proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            deadline = time.monotonic() + 30
            while _count_lines(out) < threshold and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.003)
            os.kill(proc.pid, signal.SIGKILL)
            proc.communicate()
            assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
            assert _count_lines(out) < n
            if i == 0:  # simulate the worst moment: killed in the middle of writing a line
                with out.open("ab") as f:
                    f.write(b'{"instruction": "cut sh')
        res = run_cli(args, env=env)
    assert res.returncode == 0, res.stderr
    s = parse_summary(res.stdout)
    assert s["total"] == n and s["existing"] + s["new"] == n and s["existing"] >= 160
    records = lines_of(out)
    assert len(records) == n
    instructions = [r["instruction"] for r in records]
    assert len(set(instructions)) == n
    served = {x["instruction"] for x in server.served}
    # only whole, genuine tasks (a near-copy of a task that was served but never kept is a fair new task)
    assert all(x in served or "changed" in x.split() for x in instructions)
    texts = [f"{r['instruction']}\n{r['input']}" for r in records]
    worst = max(rouge_l(texts[i], texts[j]) for i in range(n) for j in range(i))
    assert worst <= 0.7
    assert len(read_examples(out)[0]) == n


def test_unparseable_replies_hit_the_request_budget(tmp_path):
    out = tmp_path / "gen.jsonl"
    script = [{"text": "Here is some prose without any JSON."}] * 4
    with FakeOpenAI(script) as server:
        res = run_cli(["--api-base", server.url, "--model", "m", "--num-examples", "5", "--output", str(out),
                       "--max-requests", "4", "--concurrency", "2"])
    assert res.returncode == 1, res.stderr
    s = parse_summary(res.stdout)
    assert (s["requests"], s["unparseable"], s["kept"], s["total"]) == (4, 4, 0, 0)
    assert len(server.requests) == 4 and "run again to continue" in res.stdout
    assert out.read_bytes() == b""


def test_non_retryable_and_exhausted_retries(tmp_path):
    out = tmp_path / "gen.jsonl"
    # a 401 whose message echoes the key (as some servers do): stop at once, no key on the terminal
    script = [{"status": 401, "body": {"error": {"message": f"Incorrect API key provided: {SECRET}"}}}]
    with FakeOpenAI(script) as server:
        res = run_cli(["--api-base", server.url, "--model", "m", "--num-examples", "5", "--output", str(out),
                       "--concurrency", "1"])
    assert res.returncode == 2 and "401" in res.stderr and "API key" in res.stderr
    assert SECRET not in res.stdout + res.stderr and len(server.requests) == 1
    with FakeOpenAI([{"status": 503}] * 3) as server:
        cfg = SelfInstructConfig(api_base=server.url, model="m", num_examples=5, output=str(out), concurrency=1,
                                 max_retries=2, backoff=0.01)
        with pytest.raises(RequestFailed, match="giving up after 2 retries; last error: HTTP 503") as info:
            generate(cfg, SECRET, progress=False)
    assert len(server.requests) == 3 and info.value.stats.retries == {"5xx": 2}  # type: ignore[attr-defined]
    assert "retries: 2 (5xx: 2)" in info.value.stats.summary(str(out))  # type: ignore[attr-defined]


def test_api_key_env(tmp_path):
    out = tmp_path / "gen.jsonl"
    env = cli_env()
    env.pop("OPENAI_API_KEY")
    res = run_cli(["--api-base", "http://127.0.0.1:9/v1", "--model", "m", "--num-examples", "1", "--output",
                   str(out), "--api-key-env", "MY_KEY"], env=env)
    assert res.returncode == 2 and "MY_KEY" in res.stderr and not out.exists()
    env["MY_KEY"] = "sk-other-77"
    with FakeOpenAI(per_reply=2) as server:
        res = run_cli(["--api-base", server.url, "--model", "m", "--num-examples", "2", "--output", str(out),
                       "--api-key-env", "MY_KEY", "--language", "zh"], env=env)
    assert res.returncode == 0, res.stderr
    assert {r["auth"] for r in server.requests} == {"Bearer sk-other-77"}
    assert "sk-other-77" not in res.stdout + res.stderr
    assert re.search(r"[\u4e00-\u9fff]", server.requests[0]["body"]["messages"][0]["content"])


@pytest.mark.parametrize("bad", [["--num-examples", "0"], ["--similarity-threshold", "1.5"],
                                 ["--api-base", "localhost:8000"]])
def test_bad_options(tmp_path, bad):
    args = ["--api-base", "http://127.0.0.1:9/v1", "--model", "m", "--num-examples", "3", "--output",
            str(tmp_path / "o.jsonl")]
    res = run_cli(args + bad)
    assert res.returncode == 2 and bad[0] in res.stderr
