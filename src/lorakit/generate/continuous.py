"""Continuous batching: requests join and leave a running decode batch between steps.

With HF `generate`, a batch is fixed once started, so a request arriving a moment too late waits for the
whole batch to finish (see docs/design.md#continuous-batching-in-lorakits-own-decode-loop).
`RunningBatch` runs its own decode loop instead: new requests are prefilled (as one left-padded batch)
and their KV cache is concatenated to the running one; finished rows are dropped at once.
Invariants, for B rows and L cached positions:

- `ids`, `mask` (B, L): the tokens whose keys/values are in `cache`, left-padded (mask 0 = padding);
- `next` (B,): each row's newest token, sampled but not yet fed to the model;
- position of a row's token = number of real tokens before it (as HF generate computes from the mask).

Sampling and stopping reuse `RowSampler` and `TokenStream`, so a request gets the same tokens here as
through `run_batch` (greedy: the same as HF generate on the prompt alone).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from lorakit.generate.batch import stop_token_ids
from lorakit.generate.params import Request
from lorakit.generate.sampling import RowSampler, TokenStream, make_generator


class RunningBatch:
    """The rows being decoded now; `add` admits requests, `step` advances every row by one token."""

    def __init__(self, model: Any, tokenizer: Any, on_finish: Callable[[Request], None]):
        self.model, self.tokenizer, self.on_finish = model, tokenizer, on_finish
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.eos_ids = set(stop_token_ids(tokenizer, [], model))
        self._reset()

    def _reset(self) -> None:
        self.requests: list[Request] = []
        self.streams: list[TokenStream] = []
        self.generators: list[torch.Generator | None] = []
        self.cache: Any = None
        self.ids = self.mask = self.next = None

    def __len__(self) -> int:
        return len(self.requests)

    def _pick(self, ids: torch.Tensor, mask: torch.Tensor, logits: torch.Tensor, rows: Sequence[int]) -> torch.Tensor:
        """Next token per row (B,): RowSampler's per-row penalty/sampling, then argmax."""
        starts = (mask.shape[1] - mask.sum(dim=1)).tolist()
        sampler = RowSampler([self.requests[i].params for i in rows], starts, [self.generators[i] for i in rows],
                             generated=[len(self.streams[i].tokens) for i in rows])
        return sampler(ids, logits).argmax(dim=-1)

    def add(self, requests: Sequence[Request]) -> None:
        """Prefill `requests` together and merge them into the running batch."""
        from transformers import DynamicCache

        width = max(len(r.prompt_ids) for r in requests)
        ids = torch.full((len(requests), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(requests), width), dtype=torch.long)
        for i, r in enumerate(requests):
            ids[i, width - len(r.prompt_ids):] = torch.tensor(r.prompt_ids, dtype=torch.long)
            mask[i, width - len(r.prompt_ids):] = 1
        cache = DynamicCache(config=self.model.config)
        positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
        device = self.model.device
        out = self.model(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=positions.to(device),
                         past_key_values=cache, use_cache=True, logits_to_keep=1)
        first = len(self.requests)
        for r in requests:
            stops = stop_token_ids(self.tokenizer, r.params.stop, self.model)
            stops = [t for t in stops if not (r.params.ignore_eos and t in self.eos_ids)]
            self.requests.append(r)
            self.streams.append(TokenStream(self.tokenizer, r.params, stops, r.on_text, r.cancelled))
            self.generators.append(make_generator(r.params.seed) if r.params.temperature > 0 else None)
        rows = list(range(first, len(self.requests)))
        tokens = self._pick(ids.to(device), mask.to(device), out.logits[:, -1, :], rows).cpu()
        self._merge(out.past_key_values, ids, mask, tokens)
        self._push(tokens, rows)

    def _merge(self, cache: Any, ids: torch.Tensor, mask: torch.Tensor, tokens: torch.Tensor) -> None:
        if self.cache is None or self.ids is None or self.ids.shape[0] == 0:
            self.cache, self.ids, self.mask, self.next = cache, ids, mask, tokens
            return
        length = max(self.ids.shape[1], ids.shape[1])

        def left_pad(t: torch.Tensor, dim: int, value: float) -> torch.Tensor:
            missing = length - t.shape[dim]
            if missing == 0:
                return t
            shape = list(t.shape)
            shape[dim] = missing
            return torch.cat([torch.full(shape, value, dtype=t.dtype, device=t.device), t], dim=dim)

        for old, new in zip(self.cache.layers, cache.layers, strict=True):
            old.keys = torch.cat([left_pad(old.keys, 2, 0), left_pad(new.keys, 2, 0)], dim=0)
            old.values = torch.cat([left_pad(old.values, 2, 0), left_pad(new.values, 2, 0)], dim=0)
        self.ids = torch.cat([left_pad(self.ids, 1, self.pad_id), left_pad(ids, 1, self.pad_id)], dim=0)
        self.mask = torch.cat([left_pad(self.mask, 1, 0), left_pad(mask, 1, 0)], dim=0)
        self.next = torch.cat([self.next, tokens])

    def step(self) -> None:
        """Feed every row's newest token; sample the following one; drop rows that finished."""
        device = self.model.device
        self.ids = torch.cat([self.ids, self.next[:, None]], dim=1)
        self.mask = torch.cat([self.mask, torch.ones_like(self.next)[:, None]], dim=1)
        positions = self.mask.sum(dim=1, keepdim=True) - 1
        out = self.model(input_ids=self.next[:, None].to(device), attention_mask=self.mask.to(device),
                         position_ids=positions.to(device), past_key_values=self.cache, use_cache=True)
        rows = list(range(len(self.requests)))
        self.next = self._pick(self.ids.to(device), self.mask.to(device), out.logits[:, -1, :], rows).cpu()
        self._push(self.next, rows)

    def _push(self, tokens: torch.Tensor, rows: Sequence[int]) -> None:
        for i, token in zip(rows, tokens.tolist(), strict=True):
            self.streams[i].push(token)
        self._prune()

    def fail_all(self, error: BaseException | None) -> None:
        """End every row: with `error`, or (None) as cancelled (shutdown)."""
        for r, s in zip(self.requests, self.streams, strict=True):
            r.error = error
            r.text, r.completion_tokens, r.finish_reason = s.text, len(s.tokens), s.finish_reason or "cancelled"
            self.on_finish(r)
        self._reset()

    def _prune(self) -> None:
        keep = [i for i, s in enumerate(self.streams) if not s.done]
        if len(keep) == len(self.streams):
            return
        for r, s in zip(self.requests, self.streams, strict=True):
            if s.done:
                r.text, r.completion_tokens, r.finish_reason = s.text, len(s.tokens), s.finish_reason
                self.on_finish(r)
        self.requests = [self.requests[i] for i in keep]
        self.streams = [self.streams[i] for i in keep]
        self.generators = [self.generators[i] for i in keep]
        if not keep:
            self.cache = self.ids = self.mask = self.next = None
            return
        index = torch.tensor(keep, dtype=torch.long)
        self.ids, self.mask, self.next = self.ids[index], self.mask[index], self.next[index]
        # columns that are padding in every remaining row are dropped (less attention work)
        start = int((self.mask.shape[1] - self.mask.sum(dim=1)).min())
        self.ids, self.mask = self.ids[:, start:], self.mask[:, start:]
        for layer in self.cache.layers:
            layer.keys = layer.keys[index.to(layer.keys.device), :, start:]
            layer.values = layer.values[index.to(layer.values.device), :, start:]
