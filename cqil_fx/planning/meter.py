"""What measures a plan for the search: one small interface, two implementations.

    meter = EagerMeter(model, batches, measure="kl")           # the model object, module hooks
    meter = GraphMeter(gm, example_inputs, calibration)        # a captured graph (graph_meter.py)
    meter.base, meter(plan), meter.similarity(), meter.copying(plan)

A :class:`Meter` gives the search (:func:`cqil_fx.planning.search.search_plan`)
everything it asks of a model: the original's value of the measure, a plan's
value, the block-input similarity that orders the windows, and the in-context
copying that :class:`~cqil_fx.planning.search.CopyingFloor` keeps. The eager
meter runs the model under the reference semantics; the graph meter runs
rewritten copies of the graph Dynamo captured. Both compute the same numbers
for the same plan and text, up to float rounding.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Protocol

import torch
from torch import nn

from ..config import Plan
from ..eager.quality import measure_copying, perplexity
from ..eager.reference import cqil_semantics
from ..eager.replay import BlockOutputs, first_group
from ..eager.similarity import SimilarityReport, measure_similarity
from .search import COPYING_SEED

MEASURES = ("perplexity", "kl")


class Meter(Protocol):
    """What the search needs from whoever runs the model."""

    base: float  # the original's value of the measure

    def __call__(self, plan: Plan) -> float:
        """The plan's value of the measure (perplexity, or exp of the mean KL to the original)."""

    def similarity(self) -> SimilarityReport:
        """Mean cosine similarity of the block inputs on the calibration text."""

    def copying(self, plan: Plan | None) -> float:
        """In-context copying under ``plan`` (None: the original)."""


class EagerMeter:
    """A plan's cost on fixed batches, on the model object: perplexity, or exp(mean KL) to the original.

    A plan is measured from its first group on (:mod:`cqil_fx.eager.replay`):
    the original's block outputs are recorded in the pass that measures the
    original, once. ``similarity_batches`` (default: ``batches``) are the
    batches the block-input similarity is averaged over.
    """

    def __init__(self, model: nn.Module, batches: Sequence[torch.Tensor], measure: str = "kl",
                 similarity_batches: Sequence[torch.Tensor] | None = None, progress: bool = False):
        self.model, self.batches, self.measure = model, list(batches), measure
        self.similarity_batches = list(similarity_batches) if similarity_batches is not None else self.batches
        self.progress = progress
        self.outputs = BlockOutputs(model)
        with torch.no_grad(), self.outputs.recording():  # the original, once
            if measure == "kl":
                self.reference = [_log_probs(model, ids) for ids in self.batches]
                self.base = 1.0
            else:
                self.base = perplexity(model, self.batches)

    def __call__(self, plan: Plan) -> float:
        if self.measure == "kl":
            return math.exp(self.kl(plan))
        start = first_group(plan)
        return perplexity(self.model, self.batches, plan, per_batch=lambda b: self.outputs.replayed(b, start))

    def kl(self, plan: Plan) -> float:
        """Mean KL(original || plan) over every position of every batch."""
        total, count = 0.0, 0
        with torch.no_grad(), cqil_semantics(self.model, plan):
            for b, (ids, reference) in enumerate(zip(self.batches, self.reference)):
                with self.outputs.replayed(b, first_group(plan)):
                    logp = _log_probs(self.model, ids)
                total += (reference.exp() * (reference - logp)).sum().item()
                count += reference[..., 0].numel()
        return total / count

    def similarity(self) -> SimilarityReport:
        return measure_similarity(self.model, self.similarity_batches, progress=self.progress)

    def copying(self, plan: Plan | None) -> float:
        return measure_copying(self.model, plan, seed=COPYING_SEED)


def _log_probs(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(model(ids, use_cache=False).logits.float(), dim=-1)
