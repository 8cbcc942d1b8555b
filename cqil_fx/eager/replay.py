"""Measuring a plan from its first group on: the blocks before it replay the original's outputs.

    outputs = BlockOutputs.of(model, batches)          # one forward per batch, every block's output kept
    with cqil_semantics(model, plan), outputs.replayed(b, first_group(plan)):
        model(batches[b], use_cache=False)             # blocks 0 .. first-1 return what they returned before

A plan changes nothing before its first group, and the planner measures many
plans on the same batches (screening windows, growing the plan, fitting each
candidate's corrections), so the residual stream at each block of the
original is computed once: within :meth:`BlockOutputs.replayed`, a block
before the first group returns its recorded output (a copy) instead of
computing it. The values are those of a full forward: the same eager ops run
on the same inputs from the first group on. Memory: one residual stream per
block and token of the batches.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from ..config import Plan
from ..stack import decoder_layers


def first_group(plan: Plan) -> int:
    """The first block a plan changes (the number of blocks if it has no group)."""
    return min((group[0] for group in plan.groups), default=plan.num_blocks)


class BlockOutputs:
    """Per batch, what every decoder block of the original model returned on it."""

    def __init__(self, model: nn.Module):
        self.layers = decoder_layers(model)
        self.calls: list[list] = []

    @classmethod
    def of(cls, model: nn.Module, batches: Sequence[torch.Tensor]) -> BlockOutputs:
        outputs = cls(model)
        with torch.no_grad(), outputs.recording():
            for ids in batches:
                model(ids, use_cache=False)
        return outputs

    @contextlib.contextmanager
    def recording(self) -> Iterator[None]:
        """Within the block, every call of the model appends the list of its blocks' outputs."""

        def record(i, module, args, output):
            if i == 0:
                self.calls.append([])
            self.calls[-1].append(_copied(output))  # a snapshot: later ops may write to what they were given

        handles = [layer.register_forward_hook(functools.partial(record, i)) for i, layer in enumerate(self.layers)]
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    @contextlib.contextmanager
    def replayed(self, batch: int, first: int) -> Iterator[None]:
        """Within the block, blocks ``0 .. first-1`` return what they returned on batch ``batch``."""
        for i in range(first):
            self.layers[i].forward = functools.partial(_replay, self.calls[batch][i])
        try:
            yield
        finally:
            for i in range(first):
                del self.layers[i].forward


def _replay(output, *args, **kwargs):
    return _copied(output)


def _copied(output):
    if isinstance(output, torch.Tensor):
        return output.clone()
    if type(output) is tuple:
        return tuple(_copied(o) for o in output)
    return output
