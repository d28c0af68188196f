"""The `lorakit` command: parse flags/YAML into a verb's config dataclass, call the verb, map errors.

Each verb is registered once in COMMANDS as (config class, run function, help). Both are named by
import path so that `lorakit --help` imports no torch; the run function is imported only when used.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import traceback
from collections.abc import Sequence
from typing import Any

from lorakit.config import add_dataclass_arguments, config_from_args
from lorakit.errors import LorakitError

# "verb [sub-verb]": ("module:ConfigClass", "module:run_function", "one-line help")
COMMANDS: dict[str, tuple[str, str, str]] = {
    "finetune": ("lorakit.train.config:FinetuneConfig", "lorakit.train.commands:run_finetune",
                 "LoRA instruction tuning on alpaca-style or chat data"),
    "eval": ("lorakit.train.config:EvalConfig", "lorakit.train.evaluate:run_eval",
             "masked loss / perplexity (and exact-match accuracy) of a model + adapter on a data file"),
    "data preview": ("lorakit.data.config:PreviewConfig", "lorakit.data.preview:run_preview",
                     "show examples as the trainer sees them (prompt, masked part, labels)"),
    "vocab train": ("lorakit.vocab.config:VocabTrainConfig", "lorakit.vocab.train:run_vocab_train",
                    "train a SentencePiece tokenizer with LLaMA's settings (BPE, byte fallback, split digits)"),
    "vocab merge": ("lorakit.vocab.config:VocabMergeConfig", "lorakit.vocab.report:run_vocab_merge",
                    "add an extra SentencePiece model's pieces to a base tokenizer (.model + HF folder)"),
    "vocab stats": ("lorakit.vocab.config:VocabStatsConfig", "lorakit.vocab.stats:run_vocab_stats",
                    "tokens per character (by script) and unknown/byte-fallback rates of tokenizers"),
    "pretrain": ("lorakit.train.pretrain_config:PretrainConfig", "lorakit.train.commands:run_pretrain",
                 "continued pre-training on raw text (LoRA + full embeddings after a vocabulary extension)"),
    "demo": ("lorakit.demo.config:DemoConfig", "lorakit.demo.run:run_demo",
             "the main job: teach smollm2-135m a verifiable task with LoRA, accuracy before/after"),
    "merge": ("lorakit.merge.config:MergeConfig", "lorakit.merge.run:run_merge",
              "merge LoRA adapter(s) into the base, streaming (bounded memory), to safetensors or Meta pth"),
    "export": ("lorakit.export.config:ExportConfig", "lorakit.export.run:run_export",
               "export a model to GGUF (f32/f16/bf16/q8_0) or Meta pth, verified by logits"),
    "generate": ("lorakit.generate.config:GenerateConfig", "lorakit.generate.cli:run_generate",
                 "generate a response to --instruction (streamed), or chat interactively"),
    "infer": ("lorakit.generate.config:InferConfig", "lorakit.generate.infer:run_infer",
              "batch generation over a data file into a .jsonl (in order, resumable)"),
    "webui": ("lorakit.serve.config:WebuiConfig", "lorakit.serve.webui:run_webui",
              "a Gradio web page (instruction + chat tabs, streaming)"),
    "serve": ("lorakit.serve.config:ServeConfig", "lorakit.serve.api:run_serve",
              "an OpenAI-compatible HTTP API (chat/completions, streaming, dynamic batching)"),
    "self-instruct": ("lorakit.selfinstruct.config:SelfInstructConfig", "lorakit.selfinstruct.run:run_self_instruct",
                      "generate alpaca data from any OpenAI-compatible endpoint (resumable, de-duplicated)"),
}


DESCRIPTION = """\
lorakit teaches open language models (Llama, Mistral, Qwen, Gemma) new instructions and new
languages with LoRA, on one GPU or none: fine-tune, use the result, merge it and export it.

Every command has --help. Options are flags; a YAML file with the same keys may come first
(`lorakit finetune my.yaml --lora-r 16`): flags win."""

MAIN_FLOWS = """\
main flows (the base model is a Hugging Face folder, a .gguf file or the alias smollm2-135m):

  fine-tune, then use it
    lorakit finetune --data-path data/alpaca_en_demo.json --output-dir out/sft --no-train-on-inputs
    lorakit generate --lora-weights out/sft --instruction "Name three rivers."
    lorakit serve --lora-weights out/sft          # OpenAI-compatible API on http://127.0.0.1:8000/v1

  fine-tune, merge, export for llama.cpp / Ollama
    lorakit merge --lora-weights out/sft --output-dir merged
    lorakit export --model merged --format gguf --dtype q8_0 --output merged.q8_0.gguf

  a new language: extend the vocabulary, continue pre-training, then fine-tune
    lorakit vocab train --input zh.txt --vocab-size 20000 --output zh.model
    lorakit vocab merge --base-tokenizer llama/ --extra-sp-model zh.model --output-dir llama-zh-tok
    lorakit pretrain --base-model llama/ --tokenizer llama-zh-tok --data-path zh.txt --output-dir out/pt

  try it in two minutes: lorakit demo"""


def _load(ref: str) -> Any:
    module, _, attr = ref.partition(":")
    return getattr(importlib.import_module(module), attr)


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser: one sub-command per COMMANDS entry, flags from its options dataclass."""
    parser = argparse.ArgumentParser(prog="lorakit", description=DESCRIPTION, epilog=MAIN_FLOWS,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"lorakit {_load('lorakit:__version__')}")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error (also "
                        "LORAKIT_DEBUG=1); accepted anywhere on the command line")
    verbs = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    groups: dict[str, argparse._SubParsersAction] = {}
    for name, (config_ref, _, help_text) in COMMANDS.items():
        words = name.split()
        target = verbs
        if len(words) == 2:
            if words[0] not in groups:
                group = verbs.add_parser(words[0], help=f"{words[0]} commands")
                groups[words[0]] = group.add_subparsers(dest="subcommand", metavar="SUBCOMMAND", required=True)
            target = groups[words[0]]
        # each flag's help states its default itself (config.add_dataclass_arguments)
        sub = target.add_parser(words[-1], help=help_text, description=help_text)
        sub.add_argument("config", nargs="?", metavar="CONFIG.yaml",
                         help="YAML file with options (same names as the flags); flags override it")
        add_dataclass_arguments(sub, _load(config_ref))
        sub.set_defaults(_command=name)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    """Run `lorakit` with `argv` (default: sys.argv[1:]) and exit with the verb's code (2 on a LorakitError)."""
    logging.basicConfig(level=os.environ.get("LORAKIT_LOG_LEVEL", "INFO"), format="[lorakit] %(message)s",
                        stream=sys.stderr)
    from lorakit.crash import debug_requested, report_internal_error

    debug, argv = debug_requested(list(sys.argv[1:] if argv is None else argv))  # --debug: anywhere
    args = build_parser().parse_args(argv)
    config_ref, run_ref, _ = COMMANDS[args._command]
    cfg = None
    try:
        cfg = config_from_args(_load(config_ref), args, args.config)
        code = _load(run_ref)(cfg)
    except LorakitError as e:
        if debug:
            traceback.print_exc()
        print(f"error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as e:  # a bug or a library failure: one line, the traceback in a log file
        sys.exit(report_internal_error(args._command, e, cfg, debug))
    sys.exit(code or 0)


if __name__ == "__main__":
    main()
