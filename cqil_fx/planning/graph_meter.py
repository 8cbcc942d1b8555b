"""The graph meter: plans measured on the captured graph itself, for planning inside the backend.

    meter = GraphMeter(gm, example_inputs, calibration)   # calibration: batches of token ids
    meter.base, meter(plan), meter.similarity(), meter.copying(plan)   # the Meter interface (meter.py)

The Dynamo graph is a pure function of its placeholders, and its example
inputs are the real weights, so the backend can measure a candidate plan
without the model object: copy the graph, rewrite the copy, and run it on
calibration token ids put where the traced token ids were.  Block inputs for
the similarity ranking are recorded with a ``torch.fx.Interpreter``.

Graphs traced with dynamic shapes are not calibrated (their shapes are
symbols); the backend says so and uses the default plan.

The backend's searches keep :data:`~cqil_fx.planning.search.KEEP_COPYING` of
the original's in-context copying (:class:`~cqil_fx.planning.search.CopyingFloor`),
measured on repeated random sequences shaped like the traced token input
(:meth:`GraphMeter.copying`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
import torch.fx
from torch import nn

from ..config import Plan
from ..eager import quality
from ..eager.similarity import SimilarityAccumulator, SimilarityReport
from ..errors import UncalibratableGraphError
from ..passes import Block, find_blocks, rewritten_copy
from ..tokens import NextTokenLoss, token_windows
from .search import COPYING_SEED

log = logging.getLogger(__name__)


class GraphMeter:
    """Runs copies of a captured graph on calibration windows shaped like its token input (a
    :class:`~cqil_fx.planning.meter.Meter` measuring perplexity). ``blocks``: the graph's blocks
    (default: found again) for :meth:`similarity`."""

    measure = "perplexity"

    def __init__(self, gm: torch.fx.GraphModule, example_inputs: Sequence, calibration: Sequence[torch.Tensor],
                 blocks: Sequence[Block] | None = None):
        if any(not isinstance(x, torch.Tensor) for x in example_inputs):
            raise UncalibratableGraphError("the graph has symbolic-size inputs (dynamic shapes)")
        self.gm = gm
        self.example_inputs = list(example_inputs)
        self.token_index = token_input_index(gm)
        self.logits_index, self.vocab = _logits_output(gm)
        if self.example_inputs[self.token_index].shape[-1] < 2:
            raise UncalibratableGraphError("traced with one token per sequence: no next token to predict")
        self.windows = _windows_like(calibration, self.example_inputs[self.token_index])
        self.blocks = list(blocks) if blocks is not None else None
        self._last: tuple | None = None  # (groups, bypass, copy, constants) of the last uncorrected plan
        self._base: float | None = None

    @property
    def base(self) -> float:
        """The original graph's perplexity on the calibration windows (measured once)."""
        if self._base is None:
            self._base = self.perplexity()
        return self._base

    def __call__(self, plan: Plan) -> float:
        return self.perplexity(plan)

    def _graph(self, plan: Plan | None) -> tuple[torch.fx.GraphModule, tuple]:
        """The graph rewritten for ``plan`` and its constants. The copy for the last plan without
        corrections is reused: the search measures a plan's perplexity, then its copying."""
        if plan is None or not plan.groups:
            return self.gm, ()
        if plan.corrections:
            return rewritten_copy(self.gm, plan)
        if self._last is None or self._last[:2] != (plan.groups, plan.bypass):
            self._last = (plan.groups, plan.bypass, *rewritten_copy(self.gm, plan))
        return self._last[2], self._last[3]

    def inputs(self, window: torch.Tensor) -> list:
        args = list(self.example_inputs)
        args[self.token_index] = window
        return args

    def perplexity(self, plan: Plan | None = None) -> float:
        """Perplexity of the graph, rewritten for ``plan``, on the calibration windows."""
        gm, constants = self._graph(plan)
        loss = NextTokenLoss()
        with torch.no_grad():
            for window in self.windows:
                loss.add(gm(*self.inputs(window), *constants)[self.logits_index], window)
        return loss.perplexity

    def copying(self, plan: Plan | None = None, rows: int = 8) -> float:
        """In-context copying of the graph (rewritten for ``plan``): :func:`~cqil_fx.eager.quality.copying`
        on at least ``rows`` repeated random sequences (seed :data:`~cqil_fx.planning.COPYING_SEED`), each
        as long as the traced token input allows (after one fixed token when that length is odd)."""
        gm, constants = self._graph(plan)
        example = self.example_inputs[self.token_index]
        batch, length = (example.shape[0] if example.dim() > 1 else 1), example.shape[-1] // 2
        windows = -(-rows // batch)
        ids = quality.repeated_random_tokens(self.vocab, windows * batch, length, seed=COPYING_SEED,
                                     bos=None if example.shape[-1] % 2 == 0 else self.vocab // 4)
        shares = []
        with torch.no_grad():
            for window in ids.to(example.dtype).split(batch):
                logits = gm(*self.inputs(window.view(example.shape)), *constants)[self.logits_index]
                shares.append(quality.copying(logits.view(window.shape[0], window.shape[1], -1), window, length))
        return sum(shares) / len(shares)

    def similarity(self, blocks: Sequence[Block] | None = None) -> SimilarityReport:
        """Mean cosine similarity of block inputs (and the stack output) over the windows."""
        blocks = blocks if blocks is not None else (self.blocks or find_blocks(self.gm))
        watched = [b.input for b in blocks] + [blocks[-1].output]
        accumulator = SimilarityAccumulator()
        for window in self.windows:
            values = _Recorder(self.gm, set(watched)).record(*self.inputs(window))
            accumulator.add([values[w] for w in watched])
        return accumulator.report()


class _Recorder(torch.fx.Interpreter):
    def __init__(self, gm: torch.fx.GraphModule, watched: set):
        super().__init__(gm)
        self.watched = watched
        self.values: dict = {}

    def run_node(self, n: torch.fx.Node):
        value = super().run_node(n)
        if n in self.watched:
            self.values[n] = value
        return value

    def record(self, *args) -> dict:
        with torch.no_grad():
            self.run(*args)
        return self.values


def token_input_index(gm: torch.fx.GraphModule) -> int:
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target is nn.functional.embedding:
            ids = node.args[0]
            while isinstance(ids, torch.fx.Node) and ids.op != "placeholder" and ids.args:
                ids = ids.args[0]  # through views and reshapes of the token ids
            if isinstance(ids, torch.fx.Node) and ids.op == "placeholder":
                return placeholders.index(ids)
    raise UncalibratableGraphError("no placeholder of token ids feeds an embedding")


def _logits_output(gm: torch.fx.GraphModule) -> tuple[int, int]:
    """(the index of the (batch, tokens, vocab) logits among the graph's outputs, the vocabulary size)"""
    output = next(n for n in gm.graph.nodes if n.op == "output")
    values = output.args[0] if isinstance(output.args[0], (tuple, list)) else (output.args[0],)
    for i, v in enumerate(values):
        example = v.meta.get("example_value") if isinstance(v, torch.fx.Node) else None
        if isinstance(example, torch.Tensor) and example.dim() == 3 and example.is_floating_point():
            return i, example.shape[-1]
    raise UncalibratableGraphError("no (batch, tokens, vocab) logits among the graph outputs")


def _windows_like(calibration: Sequence[torch.Tensor], example: torch.Tensor) -> list[torch.Tensor]:
    """Calibration tokens cut into windows of the traced token input's shape."""
    flat = torch.cat([torch.as_tensor(t).flatten() for t in calibration]).to(example.dtype)
    if flat.numel() < example.numel():
        raise UncalibratableGraphError(
            f"calibration holds {flat.numel()} tokens, fewer than one traced input ({tuple(example.shape)})")
    return token_windows(flat, example.shape)
