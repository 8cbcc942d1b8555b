"""Compiled CQIL output equals the independent eager reference (cqil_fx.eager.reference).

Most cases compile with inner="eager" (the rewritten FX graph run as is: the
passes are what is under test); a few go through Inductor and aot_eager.
The tiny models' weights are large, so CQIL output differs from the original
model's by tens of percent while compiled and reference agree to ~1e-7.
"""

import pytest
import torch

from cqil_fx import CQILConfig, cqil_reference, make_backend

from conftest import relative_error
from tiny_models import FAMILIES, SEQUENTIAL, tiny_model, tokens

TOLERANCE = 1e-4
SPANS = {2: (2, 6), 3: (1, 7), 4: (0, 8)}  # uniform plans over the 8 tiny blocks


def run_cqil(model, config, ids, **kwargs):
    backend = make_backend(config)
    logits = torch.compile(model, backend=backend)(ids, use_cache=False, **kwargs).logits
    return logits, backend.reports


def assert_matches_reference(family, config, ids=None):
    model = tiny_model(family)
    ids = tokens() if ids is None else ids
    actual, reports = run_cqil(model, config, ids)
    expected = cqil_reference(model, config, ids, use_cache=False).logits
    original = model(ids, use_cache=False).logits
    assert relative_error(actual, expected) <= TOLERANCE
    # The rewrite really changed something: CQIL is not the original model.
    assert relative_error(expected, original) > 0.05
    assert reports[-1].fallback is None
    return reports[-1]


def legal_cases():
    for family in sorted(FAMILIES):
        for parallel in SPANS:
            for bypass in range(parallel if family in SEQUENTIAL else 1):
                yield family, parallel, bypass


@pytest.mark.parametrize(("family", "parallel", "bypass"), list(legal_cases()))
def test_uniform_plans(family, parallel, bypass):
    start, end = SPANS[parallel]
    config = CQILConfig(start=start, end=end, parallel=parallel, bypass=bypass, inner="eager")
    report = assert_matches_reference(family, config)
    assert len(report.rewrites) == (end - start) // parallel
    expected_edges = sum(min(k, bypass) for k in range(parallel)) * len(report.rewrites)
    assert report.bypass_edges == expected_edges


@pytest.mark.parametrize(
    ("family", "bypass"), [(f, 0) for f in sorted(FAMILIES)] + [(f, 1) for f in sorted(SEQUENTIAL)]
)
def test_non_uniform_explicit_plan(family, bypass):
    config = CQILConfig(groups=[[0, 1, 2], [4, 5], [6, 7]], bypass=bypass, inner="eager")
    report = assert_matches_reference(family, config, tokens(batch=3, length=9))
    assert [r.members for r in report.rewrites] == [(0, 1, 2), (4, 5), (6, 7)]


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_singleton_plan_is_the_plain_model(family):
    model, ids = tiny_model(family), tokens()
    config = CQILConfig(groups=[[i] for i in range(8)], inner="eager")
    actual, reports = run_cqil(model, config, ids)
    torch.testing.assert_close(actual, model(ids, use_cache=False).logits, rtol=0, atol=0)
    assert reports[-1].fallback and "no groups" in reports[-1].fallback


def test_rewritten_graph_structure():
    """Members read the group input; their old outputs are gone; one sum per group."""
    graphs = []

    def keep(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    model, ids = tiny_model("llama"), tokens()
    config = CQILConfig(groups=[[2, 3, 4]], bypass=1, inner=keep, mode="local")
    _, reports = run_cqil(model, config, ids)
    report = reports[-1]
    (rewrite,) = report.rewrites
    blocks = {b.index: b for b in report.blocks}  # as they are after the rewrite
    nodes = set(graphs[0].graph.nodes)
    x = rewrite.input
    assert blocks[1].output is x and blocks[5].input is rewrite.output  # neighbours read the group's ends
    for i in (2, 3, 4):
        assert blocks[i].input is x and blocks[i].output is None  # members read x; outputs erased
        assert blocks[i].delta is rewrite.deltas[i - 2] and blocks[i].delta in nodes
        assert blocks[i].mid.args[0] is x  # mid = x + a_i
        # the old block output mid_i + m_i is gone
        mid, mlp = blocks[i].mid, blocks[i].mlp
        assert not [n for n in nodes if n.op == "call_function" and n.args in ((mid, mlp), (mlp, mid))]
    assert rewrite.output.args == (x, rewrite.output.args[1])
    assert len(rewrite.deltas) == 3
    # bypass: block 3's MLP reads mid3 + a2, block 4's reads mid4 + a3.
    for i in (3, 4):
        (u,) = {a for user in blocks[i].mlp_inputs for a in user.args if isinstance(a, torch.fx.Node)}
        assert u.args == (blocks[i].mid, blocks[i - 1].attention)
    assert report.nodes_after == report.nodes_before + 3 + 3 + 2 - 3  # deltas, sums, bypass, erased outputs
    counters = torch._dynamo.utils.counters["cqil"]
    assert counters["groups_rewritten"] == 1 and counters["bypass_edges"] == 2 and counters["blocks_found"] == 8


@pytest.mark.parametrize("length", [5, 12, 23])
def test_several_prompt_lengths_through_one_compiled_model(length):
    model = tiny_model("qwen2")
    config = CQILConfig(start=2, end=6, bypass=1, inner="eager")
    compiled = torch.compile(model, backend=make_backend(config))
    for n in (length, length + 4, length + 9):  # the second length makes Dynamo go dynamic
        ids = tokens(batch=2, length=n, seed=n)
        expected = cqil_reference(model, config, ids, use_cache=False).logits
        assert relative_error(compiled(ids, use_cache=False).logits, expected) <= TOLERANCE


@pytest.mark.parametrize(
    ("family", "config"),
    [
        ("llama", CQILConfig(start=2, end=6, parallel=2, bypass=1)),
        ("gemma2", CQILConfig(start=1, end=7, parallel=3, bypass=2)),
        ("gpt2", CQILConfig(groups=[[0, 1, 2, 3], [5, 6]], bypass=1)),
        ("phi", CQILConfig(start=0, end=8, parallel=4)),
    ],
    ids=["llama", "gemma2", "gpt2", "phi"],
)
def test_inductor_matches_reference(family, config):
    assert_matches_reference(family, config)


def test_inductor_and_aot_eager_agree():
    model, ids = tiny_model("mistral"), tokens()
    config = CQILConfig(start=2, end=6, bypass=1)
    inductor, _ = run_cqil(model, config, ids)
    torch._dynamo.reset()
    aot, _ = run_cqil(model, CQILConfig(start=2, end=6, bypass=1, inner="aot_eager"), ids)
    assert relative_error(inductor, aot) <= TOLERANCE
