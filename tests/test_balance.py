"""BalancedOrder: the same random global batches as a seeded shuffle, split so processes get equal work."""

from __future__ import annotations

import json

import pytest
import torch

from lorakit.data.balance import BalancedOrder, example_cost, split_evenly


@pytest.fixture(scope="module")
def lengths(data_dir) -> list[int]:
    """Rough token lengths (characters / 4) of the shared English alpaca examples: 18-256 tokens."""
    records = json.loads((data_dir / "alpaca_en_demo.json").read_text())[:320]
    return [min(256, max(8, len(r["instruction"] + r["input"] + r["output"]) // 4)) for r in records]


def _micro_batches(order: list[int], size: int) -> list[list[int]]:
    return [order[i: i + size] for i in range(0, len(order), size)]


def _work(order, lengths, micro, accumulation, world) -> list[list[list[float]]]:
    """Per global batch, per accumulation slot: the work of each process's micro-batch, dealing micro-batches
    round-robin as accelerate does."""
    steps = []
    global_batch = micro * accumulation * world
    for start in range(0, len(order) - global_batch + 1, global_batch):
        mbs = _micro_batches(order[start: start + global_batch], micro)
        costs = [sum(example_cost(lengths[i]) for i in mb) for mb in mbs]
        steps.append([costs[slot * world: (slot + 1) * world] for slot in range(accumulation)])
    return steps


@pytest.mark.parametrize("micro,accumulation,world", [(4, 2, 2), (4, 1, 2), (2, 2, 3), (4, 4, 1)])
def test_global_batches_are_those_of_the_seeded_shuffle(lengths, micro, accumulation, world):
    sampler = BalancedOrder(lengths, micro, accumulation, world, seed=7)
    order = list(sampler)
    shuffled = torch.randperm(len(lengths), generator=torch.Generator().manual_seed(7)).tolist()
    assert sorted(order) == list(range(len(lengths))) and len(sampler) == len(lengths)
    global_batch = micro * accumulation * world
    for start in range(0, len(order), global_batch):  # each optimizer step trains on the same examples
        assert sorted(order[start: start + global_batch]) == sorted(shuffled[start: start + global_batch])
    tail = len(order) % global_batch
    if tail:  # a partial last batch stays as drawn
        assert order[-tail:] == shuffled[-tail:]


def test_processes_get_equal_work_where_a_random_split_does_not(lengths):
    micro, accumulation, world = 4, 2, 2
    balanced = _work(list(BalancedOrder(lengths, micro, accumulation, world, seed=42)), lengths,
                     micro, accumulation, world)
    shuffled = torch.randperm(len(lengths), generator=torch.Generator().manual_seed(42)).tolist()
    random_split = _work(shuffled, lengths, micro, accumulation, world)

    def idle_per_micro_batch(steps):  # processes wait for each other after every micro-batch
        slots = [work for step in steps for work in step]
        return sum(1 - min(w) / max(w) for w in slots) / len(slots)

    def idle_per_step(steps):  # ... and at every optimizer step
        totals = [[sum(col) for col in zip(*step, strict=True)] for step in steps]
        return sum(1 - min(t) / max(t) for t in totals) / len(totals)

    assert idle_per_micro_batch(random_split) > 0.15 and idle_per_step(random_split) > 0.08
    assert idle_per_micro_batch(balanced) < 0.03 and idle_per_step(balanced) < 0.02


def test_new_order_each_epoch_and_repeatable(lengths):
    sampler = BalancedOrder(lengths, 4, 2, 2, seed=3)
    first = list(sampler)
    assert list(sampler) == first  # resume replays the same epoch
    sampler.set_epoch(1)
    second = list(sampler)
    assert second != first and sorted(second) == sorted(first)
    assert list(BalancedOrder(lengths, 4, 2, 2, seed=4)) != first


def test_split_evenly_fills_every_group_exactly():
    costs = {i: float(c) for i, c in enumerate([100, 90, 10, 10, 10, 10, 5, 5])}
    groups = split_evenly(list(costs), costs, parts=2, size=4)
    assert sorted(len(g) for g in groups) == [4, 4]
    assert sorted(i for g in groups for i in g) == list(costs)
    assert sorted(sum(costs[i] for i in g) for g in groups) == [115.0, 125.0]  # the best split with 4 each
    assert not any({0, 1} <= set(g) for g in groups)  # the two heaviest never share a group


def test_trainer_uses_the_balanced_order_for_padding_free_batches(tiny_model_dir, tiny_alpaca_json, tmp_path):
    """The engine's Trainer draws from BalancedOrder; with --group-by-length it keeps HF's sampler."""
    from transformers import Trainer

    from lorakit.config import build_config
    from lorakit.train.config import FinetuneConfig
    from lorakit.train.finetune import finetune

    samplers = []
    real = Trainer.get_train_dataloader

    def spy(self):
        loader = real(self)
        samplers.append(type(self._get_train_sampler()).__name__)
        return loader

    Trainer.get_train_dataloader = spy
    try:
        for group in (False, True):
            finetune(build_config(FinetuneConfig, dict(
                base_model=str(tiny_model_dir), data_path=str(tiny_alpaca_json), output_dir=str(tmp_path / str(group)),
                batch_size=8, micro_batch_size=4, max_steps=1, val_set_size=0, group_by_length=group,
                precision="fp32")))
    finally:
        Trainer.get_train_dataloader = real
    assert samplers == ["BalancedOrder", "LengthGroupedSampler"]


def test_a_resumed_multi_process_run_gets_the_epoch_it_resumes_in(lengths):
    """Resuming mid-epoch wraps accelerate's per-process batch sampler once more to skip the batches already
    trained; set_epoch must still reach BalancedOrder there, or epoch 0's order would be replayed."""
    from accelerate.data_loader import prepare_data_loader, skip_first_batches
    from torch.utils.data import DataLoader

    from lorakit.train.trainers import expose_sampler

    sampler = BalancedOrder(lengths, 4, 2, 2, seed=5)
    loader = expose_sampler(prepare_data_loader(DataLoader(list(range(len(lengths))), batch_size=4, sampler=sampler),
                                                num_processes=2, process_index=1, put_on_device=False))
    skipped = skip_first_batches(loader, 3)
    skipped.set_epoch(3)
    assert sampler.epoch == 3
    order = BalancedOrder(lengths, 4, 2, 2, seed=5)
    order.set_epoch(3)
    expected = _micro_batches(list(order), 4)[1::2][3:]  # process 1's micro-batches of epoch 3, after 3 skipped
    assert [batch.tolist() for batch in skipped] == expected
