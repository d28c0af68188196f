"""Which engine runs a front end's requests: `--backend torch` (transformers + PEFT) or `llamacpp`.

`auto` picks torch when an adapter trains embeddings/head (llama.cpp cannot apply those at run time) or
its base is not a family of the registry (models/families.py) or a GPU is present, else llama.cpp
(CPU-only machines: measured 3.4x the tokens/s of the torch engine on SmolLM2-135M with an all-linear
adapter, one bf16 stream: benchmarks/generate_speed.py --backends), falling back to torch when
llama-cpp-python is not installed.
"""

from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path
from typing import Any

from lorakit.errors import ConfigError

log = logging.getLogger("lorakit")


def resolve_backend(opts: Any) -> str:
    """'torch' or 'llamacpp' for these EngineOptions (explicit choices are checked, `auto` decided)."""
    from lorakit.export.gguf_lora import base_unsupported, trains_embeddings
    from lorakit.models import resolve_adapter_dir, resolve_model_dir

    choice = getattr(opts, "backend", "torch")
    specs = opts.adapter_specs()
    reasons = [why for _, p in specs if (why := trains_embeddings(resolve_adapter_dir(p)))]
    if specs and choice != "torch" and (why := base_unsupported(resolve_model_dir(opts.base_model))):
        reasons.append(why)
    quantized = getattr(opts, "quantization", "none") != "none"
    if choice == "llamacpp":
        if quantized:
            raise ConfigError("--quantization is bitsandbytes on the torch back-end; with --backend llamacpp "
                              "choose a quantized GGUF type instead (--gguf-type q8_0, q4_k_m, ...)")
        if reasons:
            raise ConfigError(f"--backend llamacpp cannot apply this adapter at run time: {reasons[0]}; merge it "
                              "(`lorakit merge`) and run the merged model, or use --backend torch")
        if getattr(opts, "num_beams", 1) > 1:
            from lorakit.generate.llamacpp_backend import BEAM_SEARCH_NOTE

            raise ConfigError(BEAM_SEARCH_NOTE)
        return "llamacpp"
    if choice == "torch":
        return "torch"
    import torch

    if reasons or quantized or torch.cuda.is_available() or getattr(opts, "num_beams", 1) > 1:
        return "torch"
    if importlib.util.find_spec("llama_cpp") is None:
        log.info("backend auto: llama-cpp-python is not installed, using torch")
        return "torch"
    return "llamacpp"


def gguf_type_for(opts: Any) -> str:
    """The GGUF weight type for the llama.cpp back-end: --gguf-type, else from --precision."""
    if getattr(opts, "gguf_type", "auto") != "auto":
        return opts.gguf_type
    if opts.precision == "auto":
        from lorakit.precision import bf16_supported

        return "bf16" if bf16_supported("cpu") else "f16"
    return {"fp32": "f32", "bf16": "bf16", "fp16": "f16"}[opts.precision]


def load_engine(opts: Any, merge: bool | None = None, **kwargs: Any):
    """The engine for `opts` on the back-end `resolve_backend` picks."""
    from lorakit.generate.runner import Engine

    if resolve_backend(opts) == "torch":
        return Engine.load(opts, merge=merge, **kwargs)
    return load_llamacpp_engine(opts, merge=merge, **kwargs)


def _kv_bytes_per_token(config: dict[str, Any]) -> int:
    heads = int(config["num_attention_heads"])
    head_dim = int(config.get("head_dim") or int(config["hidden_size"]) // heads)
    return 2 * int(config["num_hidden_layers"]) * int(config.get("num_key_value_heads") or heads) * head_dim * 2


def load_llamacpp_engine(opts: Any, merge: bool | None = None, max_batch_size: int = 16, **kwargs: Any):
    """Base model and adapters as (cached) GGUF files, run by llama.cpp behind `Engine`'s interface."""
    from lorakit.export.gguf_cache import cached_adapter_gguf, cached_model_gguf
    from lorakit.generate.llamacpp_backend import LlamaCppEngine
    from lorakit.models import (
        adapter_tokenizer_dir,
        ensure_pad_token,
        load_tokenizer,
        resolve_adapter_dir,
        resolve_model_dir,
    )
    from lorakit.models.adapter_check import check_adapters_fit_base
    from lorakit.models.llamacpp import LlamaCppModel
    from lorakit.prompts import get_prompter
    from lorakit.prompts.choose import choose_template

    merge = opts.merge if merge is None else merge
    specs = opts.adapter_specs()
    dirs = [resolve_adapter_dir(p) for _, p in specs]
    base_dir = resolve_model_dir(opts.base_model)
    check_adapters_fit_base(dirs, base_dir)  # headers only, before any GGUF is written (as the torch path does)
    tokenizer = load_tokenizer(base_dir, opts.tokenizer or adapter_tokenizer_dir(dirs), add_pad_token=False)
    ensure_pad_token(tokenizer)
    gguf_type = gguf_type_for(opts)
    base_gguf = cached_model_gguf(base_dir, gguf_type)
    adapters = {name: cached_adapter_gguf(d, base_dir, "f32") for (name, _), d in zip(specs, dirs, strict=True)}
    config = json.loads((base_dir / "config.json").read_text())
    single = min(int(config.get("max_position_embeddings") or 4096), 4096)
    n_seq = max(1, max_batch_size)
    n_ctx = max(single, min(single * n_seq, int(1e9 // _kv_bytes_per_token(config))))
    runner = LlamaCppModel(base_gguf, adapters, n_ctx=n_ctx, n_seq=n_seq)
    generation_config = None
    if (base_dir / "generation_config.json").is_file():
        from transformers import GenerationConfig

        generation_config = GenerationConfig.from_pretrained(base_dir)
    template = choose_template(opts.prompt_template, tokenizer, dirs)
    prompter = get_prompter(template, tokenizer)
    names = [n for n, _ in specs]
    base_name = opts.base_model if "/" not in opts.base_model else Path(opts.base_model).name
    log.info("engine: llama.cpp, %s (%s GGUF, %d threads)%s, template %r", base_name, gguf_type, runner.n_threads,
             f" + {', '.join(names)} ({'applied' if merge else 'selectable'})" if names else "", prompter.name)
    return LlamaCppEngine(runner, tokenizer, prompter, merged=names if merge else [], context_length=single,
                          generation_config=generation_config, base_name=base_name,
                          adapter_names=[] if merge else names,
                          merged_name="+".join(names) if merge and names else None,
                          max_batch_size=max_batch_size, **kwargs)
