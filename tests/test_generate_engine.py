"""The generation engine on a tiny random LLaMA, against plain HF `generate` one prompt at a time."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from lorakit.errors import MismatchError
from lorakit.generate import GenerationParams, Request, generate_batch, run_batch
from lorakit.generate.config import EngineOptions
from lorakit.generate.runner import Engine
from lorakit.generate.session import PromptTooLongError, UnknownModelError
from lorakit.models import load_model_and_tokenizer
from test_generate_helpers import hf_greedy, make_adapter, penalized_greedy

PROMPTS = ["Hello", "The weather in Paris is", "A much longer prompt that needs left padding in a batch of three"]


@pytest.fixture(scope="module")
def model_tok(tiny_model_dir):
    model, tok = load_model_and_tokenizer(str(tiny_model_dir))
    return model.eval(), tok


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    e = Engine.load(EngineOptions(base_model=str(tiny_model_dir), precision="fp32"), gather_ms=50)
    yield e
    e.close()


def ids_of(tok, text):
    return list(tok(text)["input_ids"])


def test_generate_batch_equals_one_prompt_at_a_time(model_tok):
    model, tok = model_tok
    out = generate_batch(model, tok, PROMPTS, GenerationParams(max_new_tokens=12))
    assert out == [hf_greedy(model, tok, ids_of(tok, p), 12) for p in PROMPTS]


def test_seeded_sampling_is_the_same_alone_and_in_a_batch(model_tok):
    model, tok = model_tok
    params = [GenerationParams(max_new_tokens=10, temperature=0.9, top_p=0.9, seed=5),
              GenerationParams(max_new_tokens=14, temperature=1.2, top_k=20, seed=7, repetition_penalty=1.2),
              GenerationParams(max_new_tokens=8)]
    together = [Request(ids_of(tok, p), q) for p, q in zip(PROMPTS, params, strict=True)]
    run_batch(model, tok, together)
    for r in together:
        alone = Request(r.prompt_ids, r.params)
        run_batch(model, tok, [alone])
        assert alone.text == r.text and alone.completion_tokens == r.completion_tokens == r.params.max_new_tokens
    assert together[2].text == hf_greedy(model, tok, together[2].prompt_ids, 8)
    other_seed = Request(together[0].prompt_ids, GenerationParams(max_new_tokens=10, temperature=0.9, seed=6))
    run_batch(model, tok, [other_seed])
    assert other_seed.text != together[0].text


def test_beam_search_equals_hf_beam_search(model_tok):
    model, tok = model_tok
    ids = ids_of(tok, PROMPTS[1])
    r = Request(ids, GenerationParams(max_new_tokens=10, num_beams=3))
    run_batch(model, tok, [r])
    with torch.inference_mode():
        ref = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=10, num_beams=3, do_sample=False, early_stopping=True,
                             pad_token_id=tok.pad_token_id)
    assert r.text == tok.decode(ref[0, len(ids):], skip_special_tokens=True)


def test_stop_strings_and_length_limit(model_tok):
    model, tok = model_tok
    ids = ids_of(tok, PROMPTS[0])
    full = hf_greedy(model, tok, ids, 16)
    stop = full.split()[2]  # a word the model is about to produce
    r = Request(ids, GenerationParams(max_new_tokens=16, stop=[stop]))
    run_batch(model, tok, [r])
    assert r.text == full[:full.index(stop)] and r.finish_reason == "stop"
    r = Request(ids, GenerationParams(max_new_tokens=5))
    run_batch(model, tok, [r])
    assert r.finish_reason == "length" and r.completion_tokens == 5


def test_engine_stream_complete_and_template(engine, model_tok):
    model, tok = model_tok
    assert engine.prompter.name == "alpaca"  # no chat template on this tokenizer -> alpaca
    assert engine.template_stops == ["\n### Instruction:"]
    assert next(engine.model.parameters()).dtype == torch.float32
    ids = engine.instruction_ids("Name three colors.")
    assert ids == ids_of(tok, engine.prompter.generate_prompt("Name three colors."))
    params = GenerationParams(max_new_tokens=12)
    chunks = list(engine.stream(ids, params))
    assert len(chunks) > 1
    assert "".join(chunks) == engine.complete(ids, params).text == hf_greedy(model, tok, ids, 12)


def test_auto_precision_is_bf16_where_native_and_decodes_like_hf_in_bf16(tiny_model_dir):
    """The default dtype: bf16 on bf16 hardware (this CPU has AMX), and then the engine's tokens are those
    of HF generate on the same weights in bf16 (the dtype changes speed, not the decoding)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lorakit.precision import bf16_supported

    e = Engine.load(EngineOptions(base_model=str(tiny_model_dir)))
    try:
        expected = torch.bfloat16 if bf16_supported() else torch.float32
        assert next(e.model.parameters()).dtype == expected
        ids = e.instruction_ids("Name three colors.")
        got = e.complete(ids, GenerationParams(max_new_tokens=12)).text
    finally:
        e.close()
    ref = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=expected).eval()
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert got == hf_greedy(ref, tok, ids, 12)


def test_penalties_decode_like_a_plain_reference_loop(engine, model_tok):
    """Greedy with presence/frequency penalties, in a fixed batch (run_batch, next to an unpenalised row)
    and in the engine's running batch, equals a cache-free loop that applies OpenAI's formula itself."""
    model, tok = model_tok
    # a negative presence penalty rewards repeating (a random model never repeats on its own), and the
    # frequency penalty, growing with each repeat, eventually moves it on
    params = GenerationParams(max_new_tokens=10, presence_penalty=-2.0, frequency_penalty=0.6)
    ids = ids_of(tok, PROMPTS[1])
    expected = penalized_greedy(model, tok, ids, 10, presence=-2.0, frequency=0.6)
    assert expected != hf_greedy(model, tok, ids, 10)  # the penalties change this continuation
    fixed = [Request(ids_of(tok, PROMPTS[2]), GenerationParams(max_new_tokens=10)), Request(ids, params)]
    run_batch(model, tok, fixed)
    assert fixed[1].text == expected and fixed[0].text == hf_greedy(model, tok, fixed[0].prompt_ids, 10)
    assert engine.complete(ids, params).text == expected


def test_concurrent_requests_are_batched_and_answered_correctly(engine, model_tok):
    model, tok = model_tok
    prompts = [engine.instruction_ids(f"Item number {i}") for i in range(8)]
    results: dict[int, str] = {}
    start = threading.Barrier(8)

    def client(i: int) -> None:
        start.wait()
        results[i] = engine.complete(prompts[i], GenerationParams(max_new_tokens=10 + i)).text

    before = len(engine.batch_sizes)
    threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert max(engine.batch_sizes[before:]) > 1  # arrived together -> shared forward passes
    for i in range(8):
        assert results[i] == hf_greedy(model, tok, prompts[i], 10 + i)


def test_closing_a_stream_cancels_generation(engine):
    ids = engine.instruction_ids("Write a long story.")
    stream = engine.stream(ids, GenerationParams(max_new_tokens=500))
    it = iter(stream)
    next(it)
    stream.close()
    assert stream.request.finished.wait(10)
    assert stream.request.finish_reason == "cancelled" and stream.request.completion_tokens < 50


def test_prompt_too_long_is_refused(engine):
    with pytest.raises(PromptTooLongError, match="context"):
        engine.submit([5] * 1000, GenerationParams(max_new_tokens=100))


def test_adapters_selectable_by_name_and_merged(tiny_model_dir, tmp_path, model_tok):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model, tok = model_tok
    a = make_adapter(tiny_model_dir, tmp_path / "alpha", seed=1)
    b = make_adapter(tiny_model_dir, tmp_path / "beta", seed=2, targets=("q_proj", "k_proj", "gate_proj"))
    opts = EngineOptions(base_model=str(tiny_model_dir), precision="fp32", lora_weights=[str(a), f"second={b}"],
                         merge=False)
    e = Engine.load(opts)
    try:
        assert e.model_names == [tiny_model_dir.name, "alpha", "second"]
        ids = e.instruction_ids("Hello")
        params = GenerationParams(max_new_tokens=10)
        got = {name: e.complete(ids, params, e.resolve_model(name)).text for name in e.model_names}
        with pytest.raises(UnknownModelError):
            e.resolve_model("nope")
    finally:
        e.close()
    assert got[tiny_model_dir.name] == hf_greedy(model, tok, ids, 10)
    for name, folder in (("alpha", a), ("second", b)):
        ref = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(folder)).eval()
        assert got[name] == hf_greedy(ref, tok, ids, 10), name
    assert len(set(got.values())) == 3
    merged = Engine.load(EngineOptions(base_model=str(tiny_model_dir), precision="fp32", lora_weights=[str(a)]))
    assert merged.model_names == ["alpha"] and not hasattr(merged.model, "peft_config")
    assert merged.complete(ids, params).text == got["alpha"]
    merged.close()


def test_mismatched_tokenizer_is_refused(tiny_model_dir, tmp_path):
    from tiny_models import make_tiny_llama

    small = make_tiny_llama(tmp_path / "small", hidden_size=32, intermediate_size=64)
    with torch.no_grad():
        from transformers import AutoModelForCausalLM

        m = AutoModelForCausalLM.from_pretrained(small)
        m.resize_token_embeddings(1000)
        m.save_pretrained(small)
    with pytest.raises(MismatchError, match="tokenizer has"):
        Engine.load(EngineOptions(base_model=str(small)))
    time.sleep(0)


def test_extended_vocab_adapter_resizes_and_uses_its_tokenizer(tiny_model_dir, tmp_path):
    """An adapter trained after a vocabulary extension (full embed/lm_head saved, tokenizer in its folder)."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.add_tokens(["llamaword", "alpacaword", "vicunaword"])
    torch.manual_seed(4)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model.resize_token_embeddings(len(tok))
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False,
                                                  modules_to_save=["embed_tokens", "lm_head"]))
    folder = tmp_path / "ext"
    peft_model.save_pretrained(folder)
    tok.save_pretrained(folder)

    e = Engine.load(EngineOptions(base_model=str(tiny_model_dir), precision="fp32", lora_weights=[str(folder)]))
    try:
        assert len(e.tokenizer) == len(tok)
        assert e.model.get_input_embeddings().weight.shape[0] == len(tok)
        ids = e.instruction_ids("Say llamaword and alpacaword")
        assert any(i >= len(tok) - 3 for i in ids)  # the new tokens are in the prompt
        got = e.complete(ids, GenerationParams(max_new_tokens=8)).text
    finally:
        e.close()
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    base.resize_token_embeddings(len(tok))
    ref = PeftModel.from_pretrained(base, str(folder)).eval()
    ref_tok = AutoTokenizer.from_pretrained(folder)
    ref_tok.pad_token = ref_tok.unk_token
    assert got == hf_greedy(ref, ref_tok, ids, 8)


def test_auto_template_prefers_the_adapters_training_template(tmp_path):
    from types import SimpleNamespace

    from lorakit.prompts.choose import choose_template

    with_chat, without = SimpleNamespace(chat_template="{{ x }}"), SimpleNamespace(chat_template=None)
    trained = tmp_path / "adapter"
    trained.mkdir()
    (trained / "lorakit_config.yaml").write_text("prompt_template: alpaca_short\nlora_r: 8\n")
    assert choose_template("auto", with_chat, [trained]) == "alpaca_short"
    assert choose_template("auto", with_chat, [tmp_path]) == "chat"
    assert choose_template("auto", without, []) == "alpaca"
    assert choose_template("vigogne", with_chat, [trained]) == "vigogne"


@pytest.mark.real_model
def test_real_model_answers_and_stops_at_end_of_turn():
    """smollm2-135m through the engine: chat template by default, stops at <|im_end|> on its own."""
    e = Engine.load(EngineOptions(base_model="smollm2-135m"))
    try:
        assert e.prompter.name == "chat"
        r = e.complete(e.chat_ids([{"role": "user", "content": "What is the capital of France?"}]),
                       GenerationParams(max_new_tokens=60))
    finally:
        e.close()
    assert "Paris" in r.text
    assert r.finish_reason == "stop" and r.completion_tokens < 60 and "<|im_end|>" not in r.text


def test_requests_join_a_running_batch_mid_flight(engine, model_tok):
    """Continuous batching: a request arriving during another's generation joins it at the next step,
    and both get exactly what they would get alone (greedy = HF generate; seeded sampling = run_batch)."""
    model, tok = model_tok
    long_ids, short_ids, late_ids = (engine.instruction_ids(t) for t in ("Tell a long tale", "Hi", "Late one"))
    first_chunk = threading.Event()
    long_req = engine.submit(long_ids, GenerationParams(max_new_tokens=60), on_text=lambda t: first_chunk.set())
    assert first_chunk.wait(30)
    before = len(engine.batch_sizes)
    short_req = engine.submit(short_ids, GenerationParams(max_new_tokens=5))
    sampled = GenerationParams(max_new_tokens=12, temperature=0.8, top_k=50, seed=11)
    late_req = engine.submit(late_ids, sampled)
    for r in (long_req, short_req, late_req):
        assert r.finished.wait(60) and r.error is None
    assert max(engine.batch_sizes[before:], default=0) >= 2  # joined the running batch
    assert long_req.completion_tokens == 60 and short_req.completion_tokens == 5
    assert long_req.text == hf_greedy(model, tok, long_ids, 60)
    assert short_req.text == hf_greedy(model, tok, short_ids, 5)
    alone = Request(late_ids, engine.with_template_stops(sampled))
    run_batch(model, tok, [alone])
    assert late_req.text == alone.text


def test_params_from_cli_options_and_api_bodies_take_every_shared_field():
    """CLI options and API bodies become GenerationParams through one function: every sampling field of
    the same name is carried over (a field added to both but forgotten here would stay at its default)."""
    from types import SimpleNamespace

    from lorakit.errors import ConfigError

    values = dict(temperature=0.7, top_p=0.9, top_k=5, num_beams=1, repetition_penalty=1.1,
                  presence_penalty=0.5, frequency_penalty=0.25, seed=7, ignore_eos=True, unrelated="x")
    params = GenerationParams.from_fields(SimpleNamespace(**values), max_new_tokens=9, stop=["##"])
    assert params == GenerationParams(max_new_tokens=9, stop=["##"], **{k: v for k, v in values.items()
                                                                        if k != "unrelated"})
    with pytest.raises(ConfigError, match="top_p"):
        GenerationParams.from_fields(SimpleNamespace(top_p=0.0))
