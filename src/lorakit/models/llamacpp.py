"""A GGUF model run by llama.cpp (llama-cpp-python's low-level API): load, LoRA adapters, batched decoding.

`LlamaCppModel` owns one llama.cpp model and one context whose KV cache is shared by up to `n_seq`
sequences (one per concurrent request). `decode` runs one batch of (token, position, sequence, wants
logits) entries, which may mix prompt prefills of new sequences and single decode steps of running
ones, exactly as llama.cpp's server does; `logits(i)` reads the i-th requested output row (vocab,).
Token ids go in and logits come out: tokenizing, prompt templates and sampling stay in lorakit, so a
request gets the same prompt ids and the same sampling code under either back-end.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lorakit.errors import ConfigError, LorakitError

log = logging.getLogger("lorakit")
_LOG_CALLBACK: Any = None


def llama_cpp_module() -> Any:
    """llama_cpp, imported once with its C log routed to lorakit's logger (debug level)."""
    global _LOG_CALLBACK
    try:
        import llama_cpp as lc
    except ImportError as e:
        raise ConfigError(f"the llama.cpp back-end needs llama-cpp-python (pip install llama-cpp-python): {e}") \
            from None
    if _LOG_CALLBACK is None:
        @lc.llama_log_callback
        def _quiet(level: int, text: bytes, user_data: Any) -> None:
            if level in (2, 3):  # warnings and errors
                log.debug("llama.cpp: %s", text.decode("utf-8", "replace").rstrip())

        _LOG_CALLBACK = _quiet
        lc.llama_log_set(_LOG_CALLBACK, ctypes.c_void_p(0))
        lc.llama_backend_init()
    return lc


class LlamaCppModel:
    """One GGUF model + LoRA adapter GGUFs + a context for `n_seq` sequences sharing `n_ctx` cells."""

    def __init__(self, gguf: Path, adapters: dict[str, Path] | None = None, *, n_ctx: int = 2048,
                 n_seq: int = 1, n_threads: int | None = None, n_batch: int = 512, f32_cache: bool | None = None):
        from lorakit.machine import usable_cores

        lc = self.lc = llama_cpp_module()
        self.path = Path(gguf)
        mparams = lc.llama_model_default_params()
        self.model = lc.llama_model_load_from_file(os.fsencode(self.path), mparams)
        if not self.model:
            raise LorakitError(f"{self.path}: llama.cpp could not load this GGUF")
        self.vocab = lc.llama_model_get_vocab(self.model)
        self.n_vocab = int(lc.llama_vocab_n_tokens(self.vocab))
        self.n_batch = n_batch
        self.n_seq = max(1, n_seq)
        threads = n_threads or usable_cores()
        cparams = lc.llama_context_default_params()
        cparams.n_ctx, cparams.n_batch, cparams.n_ubatch = n_ctx, n_batch, n_batch
        cparams.n_seq_max = max(1, n_seq)
        cparams.n_threads = cparams.n_threads_batch = threads
        cparams.kv_unified = True  # one pool of cells shared by the sequences (admission reserves room)
        cparams.no_perf = True
        # llama.cpp's flash attention computes in f16 and its KV cache is f16 (measured: 7e-4 max logit error
        # on a tiny model, 7e-7 without): an f32 GGUF gets neither, so that it computes what the fp32 HF
        # model computes (verification, exact back-end runs)
        if f32_cache if f32_cache is not None else self._is_f32(lc):
            cparams.type_k = cparams.type_v = 0  # GGML_TYPE_F32
            cparams.flash_attn_type = 0  # LLAMA_FLASH_ATTN_TYPE_DISABLED
        self.ctx = lc.llama_init_from_model(self.model, cparams)
        if not self.ctx:
            lc.llama_model_free(self.model)
            raise LorakitError(f"{self.path}: llama.cpp could not create a context of {n_ctx} tokens")
        self.n_ctx = int(lc.llama_n_ctx(self.ctx))
        self.n_threads = threads
        self.memory = lc.llama_get_memory(self.ctx)
        self.batch = lc.llama_batch_init(n_batch, 0, 1)
        self.adapters: dict[str, Any] = {}
        for name, path in (adapters or {}).items():
            handle = lc.llama_adapter_lora_init(self.model, os.fsencode(path))
            if not handle:
                raise LorakitError(f"{path}: llama.cpp could not load this LoRA adapter on {self.path.name} "
                                   "(wrong base model?)")
            self.adapters[name] = handle
        self._active: tuple[str, ...] | None = None

    def _is_f32(self, lc: Any) -> bool:
        return int(lc.llama_model_ftype(self.model)) == 0 if hasattr(lc, "llama_model_ftype") else False

    # ---- adapters ---------------------------------------------------------------------------------
    def use_adapters(self, names: Sequence[str]) -> None:
        """Apply these adapters (scale 1 each, i.e. as merged) to the following decodes; () = the base."""
        key = tuple(names)
        if key == self._active:
            return
        n = len(key)
        handles = (self.lc.llama_adapter_lora_p_ctypes * max(n, 1))(*[self.adapters[k] for k in key])
        scales = (ctypes.c_float * max(n, 1))(*([1.0] * n))
        if self.lc.llama_set_adapters_lora(self.ctx, handles if n else None, n, scales if n else None) != 0:
            raise LorakitError(f"llama.cpp could not apply the adapters {', '.join(key)}")
        self._active = key

    # ---- decoding ---------------------------------------------------------------------------------
    def decode(self, entries: Sequence[tuple[int, int, int, bool]]) -> list[int]:
        """Run one batch of (token, position, sequence id, wants logits) entries (at most `n_batch`).
        Returns, for the entries that want logits, their output row for `logits`."""
        b = self.batch
        outputs = []
        for i, (token, pos, seq, want) in enumerate(entries):
            b.token[i], b.pos[i], b.n_seq_id[i] = token, pos, 1
            b.seq_id[i][0] = seq
            b.logits[i] = want
            if want:
                outputs.append(i)
        b.n_tokens = len(entries)
        code = self.lc.llama_decode(self.ctx, b)
        if code != 0:
            why = "no room left in the KV cache" if code == 1 else "error"
            raise LorakitError(f"llama.cpp decode failed (code {code}: {why})")
        return outputs

    def logits(self, row: int) -> Any:
        """The logits (vocab,) float32 numpy view of output `row` of the last decode (valid until the next)."""
        import numpy as np

        ptr = self.lc.llama_get_logits_ith(self.ctx, row)
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,))

    def forget(self, seq: int) -> None:
        """Drop sequence `seq` from the KV cache (its cells become free)."""
        self.lc.llama_memory_seq_rm(self.memory, seq, -1, -1)

    def sequence_logits(self, tokens: Sequence[int], seq: int = 0) -> Any:
        """Logits at every position (len(tokens), vocab) of one sequence, fed in chunks of `n_batch`;
        the sequence is forgotten afterwards."""
        import numpy as np

        out = np.empty((len(tokens), self.n_vocab), dtype=np.float32)
        self.forget(seq)
        try:
            for start in range(0, len(tokens), self.n_batch):
                chunk = tokens[start:start + self.n_batch]
                rows = self.decode([(int(t), start + j, seq, True) for j, t in enumerate(chunk)])
                for j, row in enumerate(rows):
                    out[start + j] = self.logits(row)
        finally:
            self.forget(seq)
        return out

    def close(self) -> None:
        lc = getattr(self, "lc", None)
        if lc is None:
            return
        if getattr(self, "batch", None) is not None:
            lc.llama_batch_free(self.batch)
            self.batch = None
        if getattr(self, "ctx", None):
            lc.llama_free(self.ctx)
            self.ctx = None
        for handle in getattr(self, "adapters", {}).values():
            lc.llama_adapter_lora_free(handle)
        self.adapters = {}
        if getattr(self, "model", None):
            lc.llama_model_free(self.model)
            self.model = None

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # interpreter shutdown
            self.close()

    def __enter__(self) -> LlamaCppModel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
