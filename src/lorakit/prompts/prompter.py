"""Build prompts and extract responses.

Two kinds of prompt format share one small API (`generate_prompt`, `chat_prompt`, `get_response`,
`stop_strings`):

- `Prompter`: an alpaca-lora JSON template (`prompt_input`, `prompt_no_input`, `response_split`),
  built in (`alpaca`, `alpaca_short`, `alpaca_legacy`, `vigogne`, `chinese_alpaca`) or a file path.
- `ChatPrompter`: the tokenizer's own `chat_template` (name `chat`), for multi-turn data and chat models.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lorakit.errors import ConfigError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

Message = dict[str, str]
_TEMPLATE_FIELDS = ("prompt_input", "prompt_no_input", "response_split")


@dataclass(frozen=True)
class Template:
    """An alpaca-lora JSON template: name, description, prompts with and without input, response split."""

    name: str
    description: str
    prompt_input: str
    prompt_no_input: str
    response_split: str


def available_templates() -> list[str]:
    """Names of the built-in JSON templates, and `chat` (the tokenizer's chat template)."""
    folder = resources.files("lorakit.prompts") / "templates"
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".json")) + ["chat"]


def load_template(name_or_path: str) -> Template:
    """A built-in template by name, or a JSON file with alpaca-lora's fields."""
    path = Path(name_or_path)
    if path.suffix == ".json" or path.is_file():
        if not path.is_file():
            raise ConfigError(f"prompt template file not found: {path}")
        text, name = path.read_text(encoding="utf-8"), path.stem
    else:
        resource = resources.files("lorakit.prompts") / "templates" / f"{name_or_path}.json"
        if not resource.is_file():
            raise ConfigError(f"unknown prompt template {name_or_path!r}; built in: "
                              f"{', '.join(available_templates())}, or a path to a .json template")
        text, name = resource.read_text(encoding="utf-8"), name_or_path
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"prompt template {name_or_path}: invalid JSON ({e})") from None
    missing = [f for f in _TEMPLATE_FIELDS if not isinstance(data.get(f), str)]
    if missing:
        raise ConfigError(f"prompt template {name_or_path}: missing string field(s) {', '.join(missing)}")
    return Template(name, data.get("description", ""), *(data[f] for f in _TEMPLATE_FIELDS))


def alpaca_to_messages(instruction: str, input: str | None = None, output: str | None = None) -> list[Message]:  # noqa: A002
    """An alpaca record as a chat: the input, if any, follows the instruction after a blank line."""
    user = f"{instruction}\n\n{input}" if input else instruction
    messages = [{"role": "user", "content": user}]
    if output is not None:
        messages.append({"role": "assistant", "content": output})
    return messages


class Prompter:
    """alpaca-lora's Prompter: fill a JSON template, and cut the response out of generated text."""

    kind = "template"

    def __init__(self, template: Template | str = "alpaca"):
        self.template = load_template(template) if isinstance(template, str) else template

    @property
    def name(self) -> str:
        return self.template.name

    def generate_prompt(self, instruction: str, input: str | None = None, label: str | None = None) -> str:  # noqa: A002
        t = self.template
        prompt = (t.prompt_input.format(instruction=instruction, input=input) if input
                  else t.prompt_no_input.format(instruction=instruction))
        return prompt + label if label else prompt

    def chat_prompt(self, messages: list[Message]) -> str:
        """Single-turn templates see only the last user message (and an optional earlier context)."""
        users = [m["content"] for m in messages if m["role"] == "user"]
        if not users:
            raise ConfigError("a prompt needs at least one user message")
        return self.generate_prompt(users[-1])

    def get_response(self, output: str) -> str:
        return output.split(self.template.response_split)[-1].strip()

    @property
    def stop_strings(self) -> list[str]:
        return []  # templates end with the tokenizer's EOS


class ChatPrompter:
    """The tokenizer's own chat template (Jinja), as transformers' `apply_chat_template` renders it."""

    kind = "chat"
    name = "chat"

    def __init__(self, tokenizer: PreTrainedTokenizerBase):
        if not getattr(tokenizer, "chat_template", None):
            raise ConfigError("prompt template 'chat' needs a tokenizer with a chat_template; this one has "
                              "none. Use an alpaca-style template (e.g. --prompt-template alpaca).")
        self.tokenizer = tokenizer
        probe = [{"role": "user", "content": "\x00"}]
        bare = self._render(probe, add_generation_prompt=False)
        self.assistant_header = self._render(probe, add_generation_prompt=True)[len(bare):]
        full = self._render(probe + [{"role": "assistant", "content": "\x01"}], add_generation_prompt=False)
        self.end_of_turn = full.split("\x01", 1)[1].strip()

    def _render(self, messages: list[Message], add_generation_prompt: bool, **kw: Any) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt, **kw)

    def generate_prompt(self, instruction: str, input: str | None = None, label: str | None = None) -> str:  # noqa: A002
        messages = alpaca_to_messages(instruction, input, label)
        return self._render(messages, add_generation_prompt=label is None)

    def chat_prompt(self, messages: list[Message]) -> str:
        return self._render(messages, add_generation_prompt=True)

    def get_response(self, output: str) -> str:
        if self.assistant_header and self.assistant_header in output:
            output = output.split(self.assistant_header)[-1]
        if self.end_of_turn:
            output = output.split(self.end_of_turn)[0]
        return output.strip()

    @property
    def stop_strings(self) -> list[str]:
        return [self.end_of_turn] if self.end_of_turn else []


def get_prompter(name: str, tokenizer: PreTrainedTokenizerBase | None = None) -> Prompter | ChatPrompter:
    """`chat` -> the tokenizer's chat template; anything else -> a JSON template (name or path)."""
    if name == "chat":
        if tokenizer is None:
            raise ConfigError("prompt template 'chat' needs the tokenizer")
        return ChatPrompter(tokenizer)
    return Prompter(name)
