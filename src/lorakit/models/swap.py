"""Module swaps: replace submodules in place (same parameters, same state-dict keys)."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn


def swap_modules(model: nn.Module, replacement: Callable[[nn.Module], nn.Module | None]) -> int:
    """Replace each submodule m of `model` for which `replacement(m)` gives a module; returns how many."""
    targets = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()]
    swapped = 0
    for parent, name, child in targets:
        new = replacement(child)
        if new is not None:
            setattr(parent, name, new)
            swapped += 1
    return swapped
