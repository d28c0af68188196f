"""Data readers, validation errors and label masks (checked against independent computations)."""

from __future__ import annotations

import json

import pytest

from lorakit.data import IGNORE_INDEX, parse_record, read_examples, read_text_documents, tokenize_example
from lorakit.errors import DataError, DataErrors
from lorakit.models import load_tokenizer
from lorakit.prompts import get_prompter

ALPACA = [{"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
          {"instruction": "Name a colour.", "input": "", "output": "Blue."}]


def test_json_array_and_jsonl_read_the_same(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps(ALPACA, indent=2))
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ALPACA))
    from_json, _ = read_examples(tmp_path / "a.json")
    from_jsonl, _ = read_examples(tmp_path / "a.jsonl")
    assert [e.messages for e in from_json] == [e.messages for e in from_jsonl]
    assert from_json[0].where.endswith("a.json:2") and from_jsonl[1].where.endswith("a.jsonl:2")
    assert from_json[0].messages[0]["content"] == "Add the numbers.\n\n2 and 3"


def test_chat_and_sharegpt_records():
    chat = parse_record({"messages": [{"role": "system", "content": "Be brief."},
                                      {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]})
    share = parse_record({"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]})
    assert [m["role"] for m in chat.messages] == ["system", "user", "assistant"]
    assert share.messages == chat.messages[1:]
    assert not chat.is_alpaca


@pytest.mark.parametrize("record, field, reason", [
    ({"instruction": "x", "input": "", "output": ""}, "output", "must not be empty"),
    ({"instruction": "x", "output": 5}, "output", "must be a string, got int"),
    ({"input": "x", "output": "y"}, "instruction", "missing"),
    ({"instruction": "x", "input": ["a"], "output": "y"}, "input", "must be a string"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "messages", "no assistant turn"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, "messages[0].role", "unknown role"),
    ({"conversations": [{"from": "human"}]}, "conversations[0].value", "missing"),
    ({"text": "x"}, None, "unknown record format"),
])
def test_invalid_records_name_the_field(record, field, reason):
    with pytest.raises(DataError) as e:
        parse_record(record, "f.jsonl", 7)
    assert e.value.field == field and reason in str(e.value) and str(e.value).startswith("f.jsonl:7:")


def test_errors_name_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b'{"instruction": "a", "output": "b"}\n{"instruction": "a", "output": ""}\n'
                     b'{not json}\n{"instruction": "\xff\xfe", "output": "b"}\n{"instruction": "c", "output": "d"}\n')
    with pytest.raises(DataErrors) as e:
        read_examples(path)
    lines = str(e.value).splitlines()
    assert lines[0] == "3 invalid record(s):"
    assert lines[1] == f"{path}:2: field 'output': must not be empty"
    assert lines[2].startswith(f"{path}:3: malformed JSON")
    assert lines[3].startswith(f"{path}:4: invalid UTF-8")
    examples, skipped = read_examples(path, skip_invalid=True)
    assert len(examples) == 2 and len(skipped) == 3


def test_json_array_error_line(tmp_path):
    path = tmp_path / "bad.json"
    records = [*ALPACA, {"instruction": "x", "output": None}]
    path.write_text(json.dumps(records, indent=2))
    with pytest.raises(DataErrors, match=rf"{path.name}:12: field 'output': must be a string, got NoneType"):
        read_examples(path)


def test_raw_text_documents(tmp_path):
    (tmp_path / "a.txt").write_text("first doc\n\nsecond doc\n")
    (tmp_path / "b.jsonl").write_text('{"text": "third"}\n')
    assert read_text_documents(tmp_path) == ["first doc", "second doc", "third"]
    (tmp_path / "c.jsonl").write_text('{"txt": "oops"}\n')
    with pytest.raises(DataErrors, match="c.jsonl:1: field 'text'"):
        read_text_documents(tmp_path)


@pytest.fixture(scope="module")
def chat_tokenizer(tmp_path_factory):
    from tiny_models import make_tiny_llama

    return load_tokenizer(make_tiny_llama(tmp_path_factory.mktemp("chat") / "m", chat=True))


@pytest.mark.parametrize("template", ["alpaca", "alpaca_legacy", "chinese_alpaca"])
def test_template_masks_match_independent_computation(tiny_model_dir, template):
    tok = load_tokenizer(tiny_model_dir)
    prompter = get_prompter(template)
    ex = parse_record(ALPACA[0])
    feats = tokenize_example(ex, prompter, tok, cutoff_len=256, train_on_inputs=False)
    prompt_ids = tok(prompter.generate_prompt("Add the numbers.", "2 and 3"))["input_ids"]
    full_ids = tok(prompter.generate_prompt("Add the numbers.", "2 and 3", "5"))["input_ids"] + [tok.eos_token_id]
    assert feats["input_ids"] == full_ids
    assert feats["labels"] == [IGNORE_INDEX] * len(prompt_ids) + full_ids[len(prompt_ids):]
    assert feats["labels"][-1] == tok.eos_token_id  # the model learns to stop
    trained = tokenize_example(ex, prompter, tok, cutoff_len=256, train_on_inputs=True)
    assert trained["labels"] == trained["input_ids"] == full_ids


def test_cutoff_and_eos_rules(tiny_model_dir):
    tok = load_tokenizer(tiny_model_dir)
    prompter = get_prompter("alpaca")
    ex = parse_record({"instruction": "Write a long text.", "output": "word " * 200})
    cut = tokenize_example(ex, prompter, tok, cutoff_len=32)
    assert len(cut["input_ids"]) == 32 and cut["input_ids"][-1] != tok.eos_token_id  # no room: no EOS
    no_eos = tokenize_example(parse_record(ALPACA[1]), prompter, tok, add_eos_token=False)
    assert no_eos["input_ids"][-1] != tok.eos_token_id


def test_multi_turn_chat_masks_all_but_assistant_turns(chat_tokenizer):
    tok = chat_tokenizer
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
                {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "2+2?"},
                {"role": "assistant", "content": "4"}]
    feats = tokenize_example(parse_record({"messages": messages}), get_prompter("chat", tok), tok,
                             cutoff_len=512, train_on_inputs=False)
    expected = tok.apply_chat_template(messages, tokenize=True)["input_ids"]
    assert feats["input_ids"] == expected  # identical to transformers' own chat tokenization
    trained = [t for t, lab in zip(feats["input_ids"], feats["labels"], strict=True) if lab != IGNORE_INDEX]
    # independent: the trained text is exactly the assistant contents, each with its end-of-turn
    assert tok.decode(trained) == "Hello!<|im_end|>\n4<|im_end|>\n"
    assert feats["input_ids"].count(tok.eos_token_id) == len(messages)  # one per turn, no extra EOS


def test_template_rejects_multi_turn(tiny_model_dir):
    record = parse_record({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                                        {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]})
    with pytest.raises(DataError, match="--prompt-template chat"):
        tokenize_example(record, get_prompter("alpaca"), load_tokenizer(tiny_model_dir))
