"""Tokenize examples into `input_ids` + `labels`, with the label masks alpaca-lora means.

Template prompts (alpaca-lora's `generate_and_tokenize_prompt`):
  ids = tokenizer(prompt + output), truncated at `cutoff_len`; EOS appended when `add_eos_token` and
  room remains; with `train_on_inputs=False` the first len(tokenizer(prompt)) labels are -100.

Chat prompts (the tokenizer's chat template): the conversation is tokenized exactly as
`tokenizer.apply_chat_template(messages, tokenize=True)`; with `train_on_inputs=False` only the
assistant turns (content and end-of-turn) keep their labels.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from lorakit.data.readers import Example
from lorakit.errors import ConfigError, DataError
from lorakit.prompts import ChatPrompter, Prompter

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

IGNORE_INDEX = -100
Features = dict[str, list[int]]


def _ids(tokenizer: PreTrainedTokenizerBase, text: str, cutoff_len: int | None = None,
         add_special_tokens: bool = True) -> list[int]:
    kw = {"truncation": True, "max_length": cutoff_len} if cutoff_len else {}
    return list(tokenizer(text, add_special_tokens=add_special_tokens, **kw)["input_ids"])


def _tokenize_template(ex: Example, prompter: Prompter, tokenizer: PreTrainedTokenizerBase, cutoff_len: int,
                       train_on_inputs: bool, add_eos_token: bool) -> Features:
    if not ex.is_alpaca:
        users = [m for m in ex.messages if m["role"] == "user"]
        if len(users) != 1 or ex.messages[-1]["role"] != "assistant":
            raise DataError(ex.where, None, "messages",
                            f"multi-turn chat needs --prompt-template chat (template {prompter.name!r} "
                            "holds one instruction and one response)")
        instruction, inp, output = users[0]["content"], None, ex.messages[-1]["content"]
    else:
        instruction, inp, output = ex.instruction, ex.input, ex.output
    ids = _ids(tokenizer, prompter.generate_prompt(instruction, inp, output), cutoff_len)
    eos = tokenizer.eos_token_id
    if add_eos_token and eos is not None and (not ids or ids[-1] != eos) and len(ids) < cutoff_len:
        ids.append(eos)
    labels = list(ids)
    if not train_on_inputs:
        n_prompt = len(_ids(tokenizer, prompter.generate_prompt(instruction, inp), cutoff_len))
        labels[:n_prompt] = [IGNORE_INDEX] * min(n_prompt, len(labels))
    return {"input_ids": ids, "labels": labels}


def _tokenize_chat(ex: Example, prompter: ChatPrompter, tokenizer: PreTrainedTokenizerBase, cutoff_len: int,
                   train_on_inputs: bool, add_eos_token: bool) -> Features:
    # apply_chat_template(tokenize=True) renders, then tokenizes without adding special tokens:
    # tokenizing rendered prefixes the same way gives the turn boundaries in token positions.
    def render(messages: list[dict[str, str]], gen: bool) -> list[int]:
        return _ids(tokenizer, prompter._render(messages, add_generation_prompt=gen), add_special_tokens=False)

    ids = render(ex.messages, gen=False)
    labels = list(ids) if train_on_inputs else [IGNORE_INDEX] * len(ids)
    if not train_on_inputs:
        for i, message in enumerate(ex.messages):
            if message["role"] != "assistant":
                continue
            start, end = len(render(ex.messages[:i], gen=True)), len(render(ex.messages[: i + 1], gen=False))
            if ids[:start] != render(ex.messages[:i], gen=True):
                raise ConfigError("this chat template does not render conversations as a sequence of "
                                  "prefixes; train with --train-on-inputs")
            labels[start:end] = ids[start:end]
    # Chat templates usually end each turn with EOS already (<|im_end|>); add one only if not.
    eos = tokenizer.eos_token_id
    last_turn = len(render(ex.messages[:-1], gen=True)) if ex.messages[-1]["role"] == "assistant" else len(ids)
    if add_eos_token and eos is not None and eos not in ids[last_turn:]:
        ids.append(eos)
        labels.append(eos)
    return {"input_ids": ids[:cutoff_len], "labels": labels[:cutoff_len]}


def tokenize_example(example: Example, prompter: Prompter | ChatPrompter, tokenizer: PreTrainedTokenizerBase,
                     cutoff_len: int = 256, train_on_inputs: bool = True, add_eos_token: bool = True) -> Features:
    """One example -> {"input_ids": [T], "labels": [T]} with T <= cutoff_len; masked labels are -100."""
    if isinstance(prompter, ChatPrompter):
        feats = _tokenize_chat(example, prompter, tokenizer, cutoff_len, train_on_inputs, add_eos_token)
    else:
        feats = _tokenize_template(example, prompter, tokenizer, cutoff_len, train_on_inputs, add_eos_token)
    feats["attention_mask"] = [1] * len(feats["input_ids"])
    return feats


def fully_masked(labels: list[int]) -> bool:
    """No label to learn from (the first is never predicted): the prompt filled the whole cutoff_len."""
    return all(label == IGNORE_INDEX for label in labels[1:])


def tokenize_examples(examples: Sequence[Example], prompter: Prompter | ChatPrompter,
                      tokenizer: PreTrainedTokenizerBase, cutoff_len: int = 256, train_on_inputs: bool = True,
                      add_eos_token: bool = True, drop_fully_masked: bool = True) -> list[Features]:
    """Tokenize all examples; drop those whose labels are all masked (prompt longer than cutoff_len)."""
    out = []
    for ex in examples:
        feats = tokenize_example(ex, prompter, tokenizer, cutoff_len, train_on_inputs, add_eos_token)
        if drop_fully_masked and fully_masked(feats["labels"]):
            continue
        out.append(feats)
    return out
