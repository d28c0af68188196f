"""Prompt templates and the chat-template mode."""

from __future__ import annotations

import json

import pytest

from lorakit.errors import ConfigError
from lorakit.models import load_tokenizer
from lorakit.prompts import ChatPrompter, Prompter, available_templates, get_prompter


def test_builtin_templates_exist():
    names = available_templates()
    for name in ["alpaca", "alpaca_short", "alpaca_legacy", "vigogne", "chinese_alpaca", "chat"]:
        assert name in names


def test_alpaca_prompt_with_and_without_input():
    p = Prompter("alpaca")
    with_input = p.generate_prompt("Sum the numbers.", "1, 2")
    assert with_input.endswith("### Instruction:\nSum the numbers.\n\n### Input:\n1, 2\n\n### Response:\n")
    assert "paired with an input" in with_input
    no_input = p.generate_prompt("Say hi.")
    assert "### Input" not in no_input and no_input.endswith("### Response:\n")
    assert p.generate_prompt("Say hi.", label="hi") == no_input + "hi"


def test_response_extraction():
    p = Prompter("alpaca")
    generated = p.generate_prompt("Say hi.") + " hello there \n"
    assert p.get_response(generated) == "hello there"
    assert Prompter("vigogne").get_response("### Réponse:\n bonjour") == "bonjour"


def test_chinese_alpaca_template_blank_lines():
    prompt = Prompter("chinese_alpaca").generate_prompt("翻译", "hello")
    assert "### Instruction:\n\n翻译\nhello\n\n### Response:\n\n" in prompt


def test_custom_template_file(tmp_path):
    path = tmp_path / "mine.json"
    path.write_text(json.dumps({"description": "d", "prompt_input": "Q: {instruction} [{input}] A:",
                                "prompt_no_input": "Q: {instruction} A:", "response_split": "A:"}))
    p = get_prompter(str(path))
    assert p.generate_prompt("x", "y") == "Q: x [y] A:" and p.get_response("Q: x A: z") == "z"
    path.write_text(json.dumps({"prompt_input": "x"}))
    with pytest.raises(ConfigError, match="missing string field"):
        get_prompter(str(path))


def test_unknown_template():
    with pytest.raises(ConfigError, match="unknown prompt template 'nope'"):
        get_prompter("nope")


def test_chat_mode_matches_apply_chat_template(tmp_path):
    from tiny_models import make_tiny_llama

    tok = load_tokenizer(make_tiny_llama(tmp_path / "chat", chat=True))
    chat = get_prompter("chat", tok)
    assert isinstance(chat, ChatPrompter)
    messages = [{"role": "user", "content": "What is 2+2?"}]
    expected = tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)["input_ids"]
    text = chat.chat_prompt(messages)
    assert tok(text, add_special_tokens=False)["input_ids"] == expected
    assert chat.stop_strings == ["<|im_end|>"]
    assert chat.get_response(text + "four<|im_end|>\n") == "four"


def test_chat_mode_needs_a_chat_template(tiny_model_dir):
    with pytest.raises(ConfigError, match="chat_template"):
        get_prompter("chat", load_tokenizer(tiny_model_dir))
