"""Prompt templates (alpaca-lora JSON format) and the tokenizer's own chat template, behind one API."""

from lorakit.prompts.prompter import (
    ChatPrompter,
    Prompter,
    Template,
    alpaca_to_messages,
    available_templates,
    get_prompter,
    load_template,
)

__all__ = [
    "ChatPrompter",
    "Prompter",
    "Template",
    "alpaca_to_messages",
    "available_templates",
    "get_prompter",
    "load_template",
]
