"""`ModelSession`: a model, its adapters, tokenizer and prompt template, loaded once.

What the `Engine` (runner.py) serves: the names a client may ask for (base, merged, each selectable
adapter), prompt encoding with the template's stop strings, the context-length check and switching
the active adapter for one model call. Scheduling requests is the runner's job, not this one's.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lorakit.errors import LorakitError
from lorakit.generate.loading import resolve_dtype
from lorakit.generate.params import GenerationParams
from lorakit.prompts.choose import choose_template

if TYPE_CHECKING:
    from typing_extensions import Self  # typing.Self needs Python 3.11

    from lorakit.generate.config import EngineOptions
    from lorakit.prompts import ChatPrompter, Prompter

log = logging.getLogger("lorakit")


class PromptTooLongError(LorakitError):
    """The prompt plus the requested new tokens do not fit the model's context."""


class UnknownModelError(LorakitError):
    """A request named a model/adapter the engine does not serve."""


class ModelSession:
    """A loaded model + tokenizer + prompter and the names under which its weights are served."""

    def __init__(self, model: Any, tokenizer: Any, prompter: Prompter | ChatPrompter, *, base_name: str = "base",
                 adapter_names: Sequence[str] = (), merged_name: str | None = None):
        self.model, self.tokenizer, self.prompter = model, tokenizer, prompter
        self.base_name = base_name
        self.adapter_names = list(adapter_names)  # selectable (unmerged) adapters
        self.merged_name = merged_name            # set when adapters were merged into the weights
        self.context_length = int(getattr(model.config, "max_position_embeddings", 0) or 0) or None

    # ---- loading -----------------------------------------------------------------------------------
    @classmethod
    def load(cls, opts: EngineOptions, merge: bool | None = None, **kwargs: Any) -> Self:
        """Load base model, adapters (merged or selectable), tokenizer and prompt template once."""
        from lorakit.models import load_model_and_tokenizer, resolve_adapter_dir
        from lorakit.models.quantize import merge_allowed
        from lorakit.prompts import get_prompter

        specs = opts.adapter_specs()
        merge = merge_allowed(opts, opts.merge if merge is None else merge, len(specs))  # not into 4/8-bit weights
        dirs = [resolve_adapter_dir(p) for _, p in specs]
        model, tokenizer = load_model_and_tokenizer(opts.base_model, opts.tokenizer, [str(d) for d in dirs],
                                                    dtype=resolve_dtype(opts.precision), merge=merge,
                                                    names=[n for n, _ in specs], quantization=opts)
        template = choose_template(opts.prompt_template, tokenizer, dirs)
        prompter = get_prompter(template, tokenizer)
        import torch

        from lorakit.generate.cpu_inference import optimize_for_cpu

        if torch.cuda.is_available() and not getattr(model, "is_quantized", False):  # quantized: placed at load
            model = model.cuda()
        model.eval()
        optimized = optimize_for_cpu(model)  # bf16 on CPU: fused, prepacked layers (docs/performance.md)
        base_name = opts.base_model if "/" not in opts.base_model else Path(opts.base_model).name
        names = [n for n, _ in specs]
        log.info("engine: %s%s, template %r, %s%s", base_name,
                 f" + {', '.join(names)} ({'merged' if merge else 'separate'})" if names else "",
                 prompter.name, next(model.parameters()).dtype, f" ({optimized})" if optimized else "")
        return cls(model, tokenizer, prompter, base_name=base_name,
                   adapter_names=[] if merge else names,
                   merged_name="+".join(names) if merge and names else None, **kwargs)

    # ---- models and prompts ----------------------------------------------------------------------
    @property
    def model_names(self) -> list[str]:
        """What the server lists: the merged model, or the base and each selectable adapter."""
        if self.merged_name:
            return [self.merged_name]
        return [self.base_name, *self.adapter_names]

    @property
    def default_model(self) -> str:
        return self.merged_name or (self.adapter_names[0] if self.adapter_names else self.base_name)

    def resolve_model(self, name: str | None) -> str | None:
        """Model name -> adapter to activate (None: the weights as loaded, i.e. base or merged)."""
        name = name or self.default_model
        if name in self.adapter_names:
            return name
        if name in (self.merged_name, self.base_name) and (self.merged_name is None or name == self.merged_name):
            return None
        raise UnknownModelError(f"model {name!r} is not served here; available: {', '.join(self.model_names)}")

    def encode(self, prompt: str, special: bool | None = None) -> list[int]:
        """Token ids of a prompt. By default BOS etc. are added except for chat-template prompts, which
        carry their own special tokens; raw completions pass `special=True`."""
        special = self.prompter.kind != "chat" if special is None else special
        return list(self.tokenizer(prompt, add_special_tokens=special)["input_ids"])

    def instruction_ids(self, instruction: str, input: str | None = None) -> list[int]:  # noqa: A002
        return self.encode(self.prompter.generate_prompt(instruction, input or None))

    def chat_ids(self, messages: list[dict[str, str]]) -> list[int]:
        return self.encode(self.prompter.chat_prompt(messages))

    @property
    def template_stops(self) -> list[str]:
        """The chat template's end-of-turn; for alpaca-style templates the start of a next section
        ("\n### Instruction:"), where an under-trained model tends to go on with an invented exchange."""
        stops = list(self.prompter.stop_strings)
        template = getattr(self.prompter, "template", None)
        if template is not None:
            head = template.prompt_no_input.split("{instruction}")[0].rstrip()
            if head:
                stops.append("\n" + head.splitlines()[-1])
        return stops

    def with_template_stops(self, params: GenerationParams) -> GenerationParams:
        from dataclasses import replace

        return replace(params, stop=list(dict.fromkeys([*params.stop, *self.template_stops])))

    def check_length(self, prompt_ids: Sequence[int], params: GenerationParams) -> None:
        if self.context_length and len(prompt_ids) + params.max_new_tokens > self.context_length:
            raise PromptTooLongError(
                f"prompt of {len(prompt_ids)} tokens + max_new_tokens {params.max_new_tokens} exceeds the "
                f"model's context of {self.context_length} tokens")

    def adapter_context(self, adapter: str | None) -> Any:
        """Activate `adapter` on an unmerged PeftModel (None: the base weights) for one model call."""
        if not (hasattr(self.model, "disable_adapter") and hasattr(self.model, "set_adapter")):
            return contextlib.nullcontext()
        if adapter is None:
            return self.model.disable_adapter()
        self.model.set_adapter(adapter)
        return contextlib.nullcontext()
