"""CQILConfig and Plan: every user mistake raises our ValueError subclass naming the field."""

import pytest

from cqil_fx import CQILConfig, CQILConfigError, CQILPlanError, Plan, make_backend
from cqil_fx.config import default_span


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (dict(groups=[[3, 5]]), r"group \[3, 5\] is not consecutive"),
        (dict(groups=[[3, 4], [4, 5]]), r"group \[4, 5\] overlaps"),
        (dict(groups=[[2, 3, 4], [3]]), r"overlaps"),
        (dict(groups=[[]]), "empty group"),
        (dict(groups=[[1, "2"]]), "groups='2' must be an int"),
        (dict(groups=[[-1, 0]]), "groups=-1 must be >= 0"),
        (dict(groups=5), "must be a list of lists"),
        (dict(groups=[[1, 2]], start=1, end=3), "either groups=... or start=/end="),
        (dict(groups=[[1, 2], [4, 5, 6]], bypass=3), r"bypass=3 must be smaller than the largest group \(3 blocks\)"),
        (dict(start=2, end=6, parallel=2, bypass=2), "bypass=2 must be smaller than parallel=2"),
        (dict(start=2, end=7, parallel=2), r"\(end - start\) = 5 is not a multiple of parallel=2"),
        (dict(start=6, end=2), "end=2 must be greater than start=6"),
        (dict(start=2), "give start= and end= together"),
        (dict(parallel=0), "parallel=0 must be >= 1"),
        (dict(parallel=2.0), "parallel=2.0 must be an int"),
        (dict(bypass=-1), "bypass=-1 must be >= 0"),
        (dict(mode="fast"), "mode='fast' is unknown; use one of auto, local, concurrent, spmd"),
        (dict(inner="tensorrt"), "inner='tensorrt' is unknown"),
        (dict(transport="tcp"), "transport='tcp' is unknown; use one of auto, process_group, shared_memory"),
        (dict(collective_timeout=0), "collective_timeout=0 must be a positive number of seconds"),
        (dict(cuda_graphs=1), "cuda_graphs=1 must be True or False"),
        (dict(cuda_graphs=True), "cuda_graphs=True applies to mode='concurrent'; with mode='auto'"),
        (dict(tensor_parallel=1), "tensor_parallel=1 must be True or False"),
        (dict(tp_fallback=True), "tp_fallback=True applies to tensor_parallel=True"),
        (dict(check_inputs=-1), "check_inputs=-1 must be >= 0"),
        (dict(check_inputs=True), "check_inputs=True must be an int"),
        (dict(tensor_parallel=True, mode="concurrent"), "tensor_parallel=True splits blocks over the ranks of "
                                                        "mode='spmd'; with mode='concurrent'"),
    ],
)
def test_bad_config_raises_naming_the_field(fields, message):
    with pytest.raises(CQILConfigError, match=message):
        CQILConfig(**fields)
    with pytest.raises(ValueError):  # a ValueError subclass, catchable as such
        make_backend(**fields)


def test_out_of_range_indices_are_caught_when_block_count_is_known():
    config = CQILConfig(groups=[[6, 7, 8]])
    with pytest.raises(CQILPlanError, match=r"block index 8 is out of range: the model has 8 decoder blocks \(0..7\)"):
        config.plan_for(8)
    with pytest.raises(CQILPlanError, match="block index 30"):
        CQILConfig(start=28, end=32).plan_for(30)


def test_uniform_plan_matches_the_paper():
    plan = CQILConfig(start=20, end=28, parallel=2, bypass=1).plan_for(30)
    assert plan == Plan(30, ((20, 21), (22, 23), (24, 25), (26, 27)), 1)
    assert plan.saved_blocks == 4
    assert repr(plan) == "Plan(30 blocks: [20-21] [22-23] [24-25] [26-27], bypass 1, saves 4 block-times)"


def test_explicit_groups_drop_singletons_and_sort():
    plan = CQILConfig(groups=[[8, 9], [3, 4, 5], [6]]).plan_for(12)
    assert plan.groups == ((3, 4, 5), (8, 9))
    assert plan.saved_blocks == 3
    assert plan.cover() == [(0,), (1,), (2,), (3, 4, 5), (6,), (7,), (8, 9), (10,), (11,)]


@pytest.mark.parametrize(
    ("blocks", "parallel", "span"),
    [(30, 2, (12, 28)), (30, 4, (12, 28)), (30, 3, (13, 28)), (8, 2, (4, 6)), (4, 2, (2, 2)), (1, 2, (0, 0))],
)
def test_default_span_is_the_middle_of_the_stack(blocks, parallel, span):
    assert default_span(blocks, parallel) == span
    if span[1] - span[0] < parallel:
        return  # too few blocks for a group: the quality study leaves such a width out
    plan = CQILConfig(start=span[0], end=span[1], parallel=parallel).plan_for(blocks)
    assert all(span[0] <= i < span[1] for g in plan.groups for i in g)
    assert all(len(g) == parallel for g in plan.groups)


def test_backend_keeps_config_and_overrides():
    base = CQILConfig(start=2, end=6)
    backend = make_backend(base, bypass=1, inner="eager")
    assert backend.config == CQILConfig(start=2, end=6, bypass=1, inner="eager")
    with pytest.raises(CQILConfigError, match="bypass=2"):
        make_backend(base, bypass=2)


def test_config_is_frozen():
    with pytest.raises(Exception):
        CQILConfig().parallel = 3
