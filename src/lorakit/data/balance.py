"""Training order for data-parallel padding-free batches: random global batches, evenly split.

The processes of a DDP run wait for each other at every optimizer step (the gradient all-reduce) and,
with HF Trainer's own token count, at every micro-batch (the engine's Trainer gathers that count once
per step instead), so a step lasts as long as the heaviest process's share of it. With padding-free
rows a micro-batch's work is its tokens (plus attention's quadratic term), and a random split of
alpaca-style data is uneven (docs/performance.md#balanced-micro-batches-under-ddp).

`BalancedOrder` draws the same kind of order as a random sampler (a seeded permutation per epoch,
cut into global batches) and only rearranges the examples inside each global batch: into micro-batches
of equal work (heaviest example first, each to the lightest micro-batch with room), micro-batches of
similar work side by side in the same accumulation slot. The examples of every optimizer step are
unchanged, and so is the loss (averaged over the step's tokens), whichever micro-batch holds an
example. accelerate deals micro-batches round-robin (micro-batch j of the order goes to process
j % world_size), which is the layout `__iter__` produces.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import Sampler

# An example of T tokens costs about T * (1 + T / 1300) token-units of work (attention's share grows with
# T; measured: docs/performance.md#balanced-micro-batches-under-ddp).
ATTENTION_LENGTH_SCALE = 1300.0


def example_cost(length: int) -> float:
    """Work units of one example of `length` tokens: tokens plus attention's share growing with length."""
    return length * (1.0 + length / ATTENTION_LENGTH_SCALE)


def split_evenly(items: Sequence[int], costs: dict[int, float], parts: int, size: int) -> list[list[int]]:
    """`parts` groups of exactly `size` items with near-equal total cost (greedy, heaviest first)."""
    groups: list[list[int]] = [[] for _ in range(parts)]
    totals = [0.0] * parts
    for item in sorted(items, key=lambda i: costs[i], reverse=True):
        open_groups = [g for g in range(parts) if len(groups[g]) < size]
        target = min(open_groups, key=lambda g: totals[g])
        groups[target].append(item)
        totals[target] += costs[item]
    return groups


class BalancedOrder(Sampler[int]):
    """Indices of a seeded random order, each global batch arranged so that every process gets the
    same amount of work (see the module docstring). A trailing partial global batch stays as drawn."""

    def __init__(self, lengths: Sequence[int], micro_batch_size: int, accumulation: int, world_size: int,
                 seed: int):
        self.lengths = list(lengths)
        self.micro_batch_size = micro_batch_size
        self.accumulation = accumulation
        self.world_size = world_size
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:  # called by Trainer/accelerate: a new order per epoch
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(len(self.lengths), generator=generator).tolist()
        global_batch = self.micro_batch_size * self.accumulation * self.world_size
        for start in range(0, len(order), global_batch):
            batch = order[start: start + global_batch]
            yield from self.arrange(batch) if len(batch) == global_batch else batch

    def arrange(self, batch: list[int]) -> list[int]:
        """One global batch -> the same indices, micro-batch after micro-batch in accelerate's dealing order."""
        costs = {i: example_cost(self.lengths[i]) for i in batch}
        micro = split_evenly(batch, costs, self.accumulation * self.world_size, self.micro_batch_size)
        micro.sort(key=lambda group: sum(costs[i] for i in group), reverse=True)
        order: list[int] = []
        for slot in range(self.accumulation):  # micro-batch `slot` of every process: the next world_size groups
            groups = micro[slot * self.world_size: (slot + 1) * self.world_size]
            if slot % 2:  # snake order: the heavier group of a slot goes to alternating processes
                groups.reverse()
            order += [i for group in groups for i in group]
        return order
