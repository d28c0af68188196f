"""`lorakit serve` as clients use it: the official `openai` client, raw HTTP for bad bodies, 16 concurrent
requests and a client that disconnects. Answers are checked against HF generate run here, independently."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from servers import lorakit_serve
from test_generate_helpers import hf_greedy, make_adapter, penalized_greedy, tiny_chat_model

KEY = "sk-test-123"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    model_dir = tiny_chat_model(tmp_path_factory)
    root = tmp_path_factory.mktemp("adapters")
    alpha = make_adapter(model_dir, root / "alpha", seed=3)
    args = ["--base-model", str(model_dir), "--precision", "fp32", "--backend", "torch",  # llama.cpp's: test_llamacpp_*
            "--lora-weights", f"alpha={alpha}", "--api-key", KEY, "--gather-ms", "100"]
    with lorakit_serve(args, root / "server.log", env={"HF_HUB_OFFLINE": "1"}) as (url, proc):
        yield {"url": url, "model_dir": model_dir, "alpha": alpha, "proc": proc}


@pytest.fixture(scope="module")
def refs(server):
    """Reference greedy replies, computed in this process with plain transformers/peft."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(server["model_dir"])
    base = AutoModelForCausalLM.from_pretrained(server["model_dir"]).eval()
    tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(server["model_dir"]),
                                      str(server["alpha"])).eval()

    def chat(text: str, n: int, adapter: bool = False) -> tuple[str, int]:
        ids = tok.apply_chat_template([{"role": "user", "content": text}], tokenize=True,
                                      add_generation_prompt=True, return_dict=True)["input_ids"]
        return hf_greedy(tuned if adapter else base, tok, list(ids), n).strip(), len(ids)

    def complete(prompt: str, n: int, presence: float = 0.0, frequency: float = 0.0) -> str:
        ids = list(tok(prompt)["input_ids"])
        if presence or frequency:
            return penalized_greedy(base, tok, ids, n, presence, frequency)
        return hf_greedy(base, tok, ids, n)

    return {"chat": chat, "complete": complete}


@pytest.fixture()
def client(server):
    return openai.OpenAI(base_url=server["url"] + "/v1", api_key=KEY, max_retries=0, timeout=120)


def test_models_lists_base_and_adapters(client):
    assert [m.id for m in client.models.list().data] == ["tiny-chat", "alpha"]


def test_chat_completion_matches_reference(client, refs):
    for model, adapter in (("tiny-chat", False), ("alpha", True)):
        r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hi there"}],
                                           temperature=0, max_tokens=8)
        expected, n_prompt = refs["chat"]("Hi there", 8, adapter)
        assert r.choices[0].message.content == expected and r.choices[0].message.role == "assistant"
        assert r.choices[0].finish_reason == "length"
        assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (n_prompt, 8, n_prompt + 8)


def test_chat_streaming(client, refs):
    stream = client.chat.completions.create(model="tiny-chat", messages=[{"role": "user", "content": "Stream me"}],
                                            temperature=0, max_tokens=10, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert deltas[0].role == "assistant"
    assert "".join(d.content or "" for d in deltas).strip() == refs["chat"]("Stream me", 10)[0]
    assert sum(1 for d in deltas if d.content) > 1  # really streamed, not one piece
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 10


def test_completions_plain_and_streaming(client, refs):
    expected = refs["complete"]("Once upon a time", 9)
    r = client.completions.create(model="tiny-chat", prompt="Once upon a time", temperature=0, max_tokens=9)
    assert r.choices[0].text == expected and r.usage.completion_tokens == 9
    pieces = client.completions.create(model="tiny-chat", prompt="Once upon a time", temperature=0, max_tokens=9,
                                       stream=True)
    assert "".join(p.choices[0].text for p in pieces) == expected


def test_presence_and_frequency_penalties_are_applied(client, refs):
    expected = refs["complete"]("Once upon a time", 9, presence=-2.0, frequency=0.6)
    assert expected != refs["complete"]("Once upon a time", 9)
    r = client.completions.create(model="tiny-chat", prompt="Once upon a time", temperature=0, max_tokens=9,
                                  presence_penalty=-2.0, frequency_penalty=0.6)
    assert r.choices[0].text == expected


def test_n_choices_plain_and_streaming(client, refs, server):
    """n choices: greedy ones all equal the reference; seeded sampled ones are choice i = seed + i alone;
    streamed deltas, grouped by index, rebuild each choice; the prompt counts once in usage."""
    finished = sum(httpx.get(server["url"] + "/health").json()["finished"].values())
    r = client.chat.completions.create(model="tiny-chat", messages=[{"role": "user", "content": "Hi there"}],
                                       temperature=0, max_tokens=6, n=2)
    expected, n_prompt = refs["chat"]("Hi there", 6)
    assert [c.index for c in r.choices] == [0, 1] and all(c.message.content == expected for c in r.choices)
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (n_prompt, 12)
    # greedy choices are one answer: generated once, not n times
    assert sum(httpx.get(server["url"] + "/health").json()["finished"].values()) == finished + 1
    streamed = client.chat.completions.create(model="tiny-chat", messages=[{"role": "user", "content": "Hi there"}],
                                              temperature=0, max_tokens=6, n=2, stream=True)
    parts = ["", ""]
    for chunk in streamed:
        for c in chunk.choices:
            parts[c.index] += c.delta.content or ""
    assert [p.strip() for p in parts] == [expected, expected]

    sample = dict(model="tiny-chat", prompt="Once upon a time", temperature=1.0, max_tokens=8)
    many = client.completions.create(n=3, seed=5, **sample)
    alone = [client.completions.create(n=1, seed=5 + i, **sample).choices[0].text for i in range(3)]
    assert [c.text for c in many.choices] == alone and len(set(alone)) > 1  # sampled: they differ

    stream = client.completions.create(n=3, seed=5, stream=True, stream_options={"include_usage": True}, **sample)
    texts, finished = ["", "", ""], []
    for chunk in stream:
        for c in chunk.choices:
            texts[c.index] += c.text
            if c.finish_reason:
                finished.append(c.index)
        if chunk.usage:
            assert chunk.usage.completion_tokens == 24
    assert texts == alone and sorted(finished) == [0, 1, 2]
    with pytest.raises(openai.BadRequestError, match="beam"):
        client.completions.create(model="tiny-chat", prompt="x", max_tokens=4, n=2, extra_body={"num_beams": 2})


def test_api_key_is_required(server):
    bad = openai.OpenAI(base_url=server["url"] + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    r = httpx.post(server["url"] + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"


@pytest.mark.parametrize("body,status,needle", [
    ({"model": "tiny-chat"}, 400, "messages"),
    ({"messages": "hello"}, 400, "messages"),
    ({"messages": [{"role": "user", "content": "x"}], "max_tokens": -1}, 400, "max_tokens"),
    ({"messages": [{"role": "user", "content": "x"}], "temperature": "hot"}, 400, "temperature"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, 400, "role"),
    ({"messages": [{"role": "user", "content": "x"}], "model": "gpt-4"}, 404, "not served"),
    ({"messages": [{"role": "user", "content": "word " * 1200}]}, 400, "context"),
    ({"messages": [{"role": "user", "content": "x"}], "max_tokens": 99999}, 400, "limit"),
    ("{not json", 400, ""),
])
def test_invalid_bodies_get_openai_errors(server, body, status, needle):
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    content = body if isinstance(body, str) else json.dumps(body)
    r = httpx.post(server["url"] + "/v1/chat/completions", content=content, headers=headers, timeout=60)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert needle in error["message"] and "type" in error
    assert httpx.get(server["url"] + "/health").json()["status"] == "ok"  # still serving


def test_sixteen_concurrent_clients_are_batched(client, refs, server):
    prompts = [f"Question number {i}?" for i in range(16)]

    def ask(p: str) -> str:
        r = client.chat.completions.create(model="tiny-chat", messages=[{"role": "user", "content": p}],
                                           temperature=0, max_tokens=6)
        return r.choices[0].message.content

    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(ask, prompts))
    assert answers == [refs["chat"](p, 6)[0] for p in prompts]
    assert httpx.get(server["url"] + "/health").json()["max_batch_size"] > 1


def test_client_that_gives_up_on_a_plain_request_cancels_it(server):
    """No streaming: the server only sees the client go away by asking the connection; it must."""
    def cancelled() -> int:
        return httpx.get(server["url"] + "/health").json()["finished"].get("cancelled", 0)

    before = cancelled()
    body = {"model": "tiny-chat", "messages": [{"role": "user", "content": "Tell a very long story"}],
            "max_tokens": 900, "temperature": 0, "ignore_eos": True}
    start = time.monotonic()
    with pytest.raises(httpx.TimeoutException):
        httpx.post(server["url"] + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"},
                   timeout=0.5)
    deadline = time.monotonic() + 30
    while cancelled() == before:  # without the disconnect check it ends as "length", after ~2.5 s
        assert time.monotonic() < deadline, "generation was not cancelled"
        time.sleep(0.1)
    took = time.monotonic() - start
    assert took < 20, took


def test_client_disconnect_stops_generation(server):
    def cancelled() -> int:
        return httpx.get(server["url"] + "/health").json()["finished"].get("cancelled", 0)

    before = cancelled()
    body = {"model": "tiny-chat", "messages": [{"role": "user", "content": "Tell a very long story"}],
            "max_tokens": 900, "stream": True, "temperature": 0}
    with httpx.stream("POST", server["url"] + "/v1/chat/completions", json=body,
                      headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as r:
        lines = r.iter_lines()
        got = [line for line, _ in zip(lines, range(6), strict=False) if line.startswith("data:")]
        assert got
    # the response was closed after a few chunks: the generation must end as "cancelled", not run on
    deadline = time.monotonic() + 30
    while cancelled() == before:
        assert time.monotonic() < deadline, "generation was not cancelled"
        time.sleep(0.2)
