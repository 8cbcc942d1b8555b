"""The planning stage's entry for one captured graph: find the blocks, choose the plan.

    outcome = plan_graph(gm, config, example_inputs)   # Planned(blocks, plan, source, cost), or Unchanged(why)

The backend calls this, then applies the plan with
:func:`cqil_fx.passes.apply_plan`. Which plan: the one ``config`` names, the
automatic search on ``calibration=`` (:func:`cqil_fx.planning.auto.search_graph_plan`),
or the default plan (:mod:`cqil_fx.planning.default`).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence

import torch.fx
from torch._dynamo.utils import counters

from ..config import CQILConfig, Plan
from ..errors import UnrecognisedBlockError
from ..passes import Block, find_blocks
from .auto import search_graph_plan
from .default import default_plan

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Planned:
    """The blocks found and the plan chosen for them, with where it came from ("given", "searched",
    "cached", ...) and its promised cost on the calibration text, when one was measured."""

    blocks: list[Block]
    plan: Plan
    source: str = "given"
    cost: float | None = None


@dataclasses.dataclass(frozen=True)
class Unchanged:
    """Why a graph is compiled as it is (with what was found, if anything)."""

    why: str
    blocks: tuple[Block, ...] = ()
    plan: Plan | None = None
    level: int = logging.INFO


def plan_graph(gm: torch.fx.GraphModule, config: CQILConfig,
               example_inputs: Sequence = ()) -> Planned | Unchanged:
    """The blocks of ``gm`` and the plan ``config`` gives for them, or why the graph stays as it is.

    ``example_inputs`` (real tensors, as Dynamo passes them) are needed only
    for automatic planning, which runs copies of the graph on calibration data.
    """
    try:
        blocks = find_blocks(gm)
    except UnrecognisedBlockError as e:
        return Unchanged(f"decoder blocks not understood ({e})", level=logging.WARNING)
    if not blocks:
        return Unchanged("no decoder blocks found")
    counters["cqil"]["blocks_found"] += len(blocks)
    if config.wants_auto_plan:
        search = search_graph_plan(gm, example_inputs, blocks, config)
        if search is not None:
            log.info("cqil: automatic plan %s", search)
            return _planned(blocks, search.plan, "searched on calibration=", search.cost)
    if config.wants_default_plan or config.wants_auto_plan:  # an uncalibratable graph gets the default
        found = default_plan(gm, example_inputs, blocks, config)
        if found.plan is None:
            return Unchanged(f"default plan: {found.why}", tuple(blocks))
        return Planned(blocks, found.plan, found.source, found.cost)
    return _planned(blocks, plan_for_blocks(blocks, config), "given")


def _planned(blocks: list[Block], plan: Plan, source: str, cost: float | None = None) -> Planned | Unchanged:
    if not plan.groups:
        return Unchanged(f"{plan} has no groups of two or more blocks", tuple(blocks), plan)
    plan.check_block_kinds({b.index: b.kind for b in blocks})
    return Planned(blocks, plan, source, cost)


def plan_for_blocks(blocks: Sequence[Block], config: CQILConfig) -> Plan:
    """The plan ``config`` gives for these blocks, checked against their kinds."""
    plan = config.plan_for(len(blocks))
    plan.check_block_kinds({b.index: b.kind for b in blocks})
    return plan
