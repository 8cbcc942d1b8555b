"""Similarity, perplexity, layer removal and the automatic planner on tiny models."""

import copy
import math

import pytest
import torch

from cqil_fx import CQILConfig, CQILConfigError, CQILPlanError, Plan, cqil_reference, make_backend
from cqil_fx.planning.graph_meter import GraphMeter
from cqil_fx.tools.inspect import capture_graph
from cqil_fx.planning.auto import plan_auto
from cqil_fx.eager.quality import measure_copying, perplexity, removed_blocks
from cqil_fx.eager.similarity import measure_similarity, save_heatmap
from cqil_fx.passes import find_blocks
from cqil_fx.eager.similarity import SimilarityReport
from cqil_fx.planning.search import search_plan

from conftest import relative_error
from tiny_models import LAYERS, tiny_model, tokens

CALIBRATION = [tokens(batch=2, length=16, seed=s) for s in range(3)]


def test_similarity_matrix_and_influence():
    report = measure_similarity(tiny_model("llama"), CALIBRATION, progress=False)
    m = report.matrix
    assert m.shape == (LAYERS + 1, LAYERS + 1) and report.tokens == 3 * 2 * 16
    torch.testing.assert_close(m, m.T)
    torch.testing.assert_close(m.diagonal(), torch.ones(LAYERS + 1))
    torch.testing.assert_close(report.influence, 1 - m.diagonal(1))
    assert report.group_similarity((2, 3, 4)) == pytest.approx(float(m[2, 3:5].mean()))


def test_similarity_on_the_graph_equals_the_hooked_eager_pass():
    model = tiny_model("gpt2")
    ids = CALIBRATION[0]
    gm = capture_graph(model, ids, use_cache=False)
    example_inputs = _real_inputs(model, gm, ids)
    graph_report = GraphMeter(gm, example_inputs, CALIBRATION).similarity(find_blocks(gm))
    eager_report = measure_similarity(model, CALIBRATION, progress=False)
    torch.testing.assert_close(graph_report.matrix, eager_report.matrix, atol=1e-5, rtol=0)


def _real_inputs(model, gm, ids):
    """What Dynamo passes a backend: captured again with a backend that keeps example_inputs."""
    kept = []

    def keep(g, example_inputs):
        kept.extend(example_inputs)
        return g.forward

    torch._dynamo.reset()
    torch.compile(model, backend=keep)(ids, use_cache=False)
    return kept


def test_heatmap_png(tmp_path):
    report = measure_similarity(tiny_model("llama"), CALIBRATION[:1], progress=False)
    save_heatmap(report, str(tmp_path / "h.png"))
    assert (tmp_path / "h.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_perplexity_matches_the_compiled_backend():
    """The eval's number for a plan equals perplexity computed from compiled CQIL logits."""
    model, ids = tiny_model("llama"), CALIBRATION[0]
    config = CQILConfig(groups=[[1, 2], [4, 5, 6]], bypass=1, inner="eager")
    logits = torch.compile(model, backend=make_backend(config))(ids, use_cache=False).logits
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    assert perplexity(model, [ids], plan=config) == pytest.approx(math.exp(nll.item()), rel=1e-4)
    assert perplexity(model, [ids], plan=config) != pytest.approx(perplexity(model, [ids]), rel=1e-3)


def test_removed_blocks_equal_a_model_without_them():
    model, ids = tiny_model("llama"), CALIBRATION[0]
    shorter = copy.deepcopy(model)
    del shorter.model.layers[5]
    del shorter.model.layers[2]
    shorter.config.num_hidden_layers -= 2
    with removed_blocks(model, [2, 5]):
        actual = model(ids, use_cache=False).logits
    torch.testing.assert_close(actual, shorter(ids, use_cache=False).logits)
    with pytest.raises(ValueError, match=r"cannot remove blocks \[8\]"):
        perplexity(model, [ids], removed=[8])


@pytest.mark.parametrize("budget", [0.0, 0.02, 0.5])
def test_planner_respects_its_budget_with_legal_plans(budget):
    model = tiny_model("qwen2")
    search = plan_auto(model, CALIBRATION, parallel=2, budget=budget, progress=False)
    plan = search.plan
    assert search.perplexity <= search.base_perplexity * (1 + budget)
    # The reported perplexity is that of the plan, re-measured independently.
    assert perplexity(model, CALIBRATION, plan=plan) == pytest.approx(search.perplexity, rel=1e-6)
    CQILConfig(groups=plan.groups, bypass=plan.bypass).plan_for(LAYERS)  # legal
    assert all(len(g) == 2 for g in plan.groups)
    # Every window left out either failed alone or would have broken the budget with the chosen ones.
    limit = search.base_perplexity * (1 + budget)
    assert all(t.perplexity > limit for t in search.trials if not t.accepted and len(t.groups) == 1
               and t.perplexity == min(u.perplexity for u in search.trials if u.groups == t.groups))
    if budget == 0.5:
        assert plan.saved_blocks >= 2


def test_beam_finds_two_windows_where_greedy_growth_keeps_one():
    """Windows (0,1), (1,2), (2,3) costing 2 %, 1 %, 2 % alone and adding up, at a 4.5 % budget: greedy
    growth keeps the cheapest, (1,2), which overlaps both others; a beam of 2 also grows (0,1) and finds
    (0,1) + (2,3) at 4 %."""
    alone = {(0, 1): 0.02, (1, 2): 0.01, (2, 3): 0.02}
    similarity = SimilarityReport(torch.ones(5, 5), tokens=1)
    measured = []

    def evaluate(groups, bypass):
        measured.append(groups)
        return 10.0 * (1 + sum(alone[g] for g in groups))

    greedy = search_plan(4, 2, 0.045, (0,), similarity, 10.0, evaluate, progress=False)
    assert greedy.plan.groups == ((1, 2),)
    beam = search_plan(4, 2, 0.045, (0,), similarity, 10.0, evaluate, progress=False, beam=2)
    assert beam.plan.groups == ((0, 1), (2, 3)) and beam.perplexity == pytest.approx(10.4)
    screen = sorted((w,) for w in alone)
    assert sorted(measured[:3]) == screen  # greedy: the screen; its growth measured nothing new
    assert sorted(measured[3:6]) == screen  # the beam: the screen ...
    assert measured[6:] == [((0, 1), (2, 3))]  # ... and no window alone again
    with pytest.raises(CQILConfigError, match="beam=0"):
        search_plan(4, 2, 0.045, (0,), similarity, 10.0, evaluate, progress=False, beam=0)


@pytest.mark.parametrize("beam", [1, 2])
def test_plans_that_are_not_admissible_are_not_kept(beam):
    """Windows (0,1), (1,2), (2,3) as in the test above, at an 8 % budget, where every plan of them fits:
    greedy growth keeps (1, 2) alone; refused by ``admissible``, it keeps (0,1) + (2,3), as the beam does."""
    alone = {(0, 1): 0.02, (1, 2): 0.01, (2, 3): 0.02}
    similarity = SimilarityReport(torch.ones(5, 5), tokens=1)
    asked, measured = [], []

    def evaluate(groups, bypass):
        measured.append(groups)
        return 10.0 * (1 + sum(alone[g] for g in groups))

    def admissible(groups, bypass):
        asked.append(groups)
        return (1, 2) not in groups

    free = search_plan(4, 2, 0.08, (0,), similarity, 10.0, evaluate, progress=False, beam=beam)
    assert free.plan.groups == (((1, 2),) if beam == 1 else ((0, 1), (2, 3)))
    measured.clear()
    search = search_plan(4, 2, 0.08, (0,), similarity, 10.0, evaluate, progress=False, beam=beam,
                         admissible=admissible)
    assert sorted(measured[:3]) == sorted((w,) for w in alone)  # the screen, and no window alone again
    assert all(len(g) > 1 for g in measured[3:])
    assert search.plan.groups == ((0, 1), (2, 3)) and search.perplexity == pytest.approx(10.4)
    assert ((1, 2),) in asked  # the cheapest window alone is asked, and refused
    assert not any(t.accepted for t in search.trials if (1, 2) in t.groups and len(t.groups) > 1)
    refused = [t for t in search.trials if t.groups == ((1, 2),)]
    assert refused[0].accepted and not refused[-1].accepted  # within budget when screened; refused when grown


def test_keep_copying_keeps_only_plans_that_copy_enough(monkeypatch):
    """``measure_copying`` stood in for (tiny random models do not copy): a plan grouping block 2 copies
    half as well as the original; with ``keep_copying=0.9`` no such plan is kept."""
    import cqil_fx.planning.meter as planner

    seeds = set()

    def copying(model, plan=None, seed=0):
        seeds.add(seed)
        return 0.5 if plan is not None and any(2 in g for g in plan.groups) else 1.0

    model = tiny_model("qwen2")
    free = plan_auto(model, CALIBRATION, parallel=2, budget=0.5, progress=False)
    assert any(2 in g for g in free.plan.groups), free.plan  # without a floor block 2 is grouped
    monkeypatch.setattr(planner, "measure_copying", copying)
    for beam in (1, 2):
        search = plan_auto(model, CALIBRATION, parallel=2, budget=0.5, progress=False, beam=beam, keep_copying=0.9)
        assert search.plan.groups and not any(2 in g for g in search.plan.groups), search.plan
        assert search.perplexity <= search.base_perplexity * 1.5
    assert seeds == {planner.COPYING_SEED} != {0}  # not the sequences the quality reports measure
    # a model that copies nothing (below MIN_COPYING) has nothing to keep: no floor
    monkeypatch.setattr(planner, "measure_copying", lambda model, plan=None, seed=0: 0.01 if plan is None else 0.0)
    assert plan_auto(model, CALIBRATION, parallel=2, budget=0.5, progress=False, keep_copying=0.9).plan == free.plan
    with pytest.raises(CQILConfigError, match="keep_copying=1.5"):
        plan_auto(model, CALIBRATION, keep_copying=1.5, progress=False)


def test_beam_search_on_a_model_keeps_its_budget():
    model = tiny_model("qwen2")
    search = plan_auto(model, CALIBRATION, parallel=2, budget=0.3, progress=False, beam=3)
    greedy = plan_auto(model, CALIBRATION, parallel=2, budget=0.3, progress=False)
    assert search.perplexity <= search.base_perplexity * 1.3
    assert perplexity(model, CALIBRATION, plan=search.plan) == pytest.approx(search.perplexity, rel=1e-6)
    CQILConfig(groups=search.plan.groups, bypass=search.plan.bypass).plan_for(LAYERS)  # legal
    assert search.plan.saved_blocks >= 1 and greedy.plan.saved_blocks >= 1


def test_bigger_budget_saves_at_least_as_much():
    model = tiny_model("mistral")
    small = plan_auto(model, CALIBRATION, budget=0.01, progress=False)
    large = plan_auto(model, CALIBRATION, budget=0.5, progress=False)
    assert large.plan.saved_blocks >= small.plan.saved_blocks


def test_backend_plans_on_the_graph_like_the_eager_planner():
    model = tiny_model("llama")
    eager = plan_auto(model, CALIBRATION, parallel=2, budget=0.3, progress=False)
    backend = make_backend(plan="auto", calibration=CALIBRATION, budget=0.3, inner="eager")
    ids = CALIBRATION[0]
    logits = torch.compile(model, backend=backend)(ids, use_cache=False).logits
    assert backend.reports[-1].plan == eager.plan
    expected = cqil_reference(model, eager.plan, ids, use_cache=False).logits
    assert relative_error(logits, expected) <= 1e-4


@pytest.mark.parametrize("length", [16, 17])
def test_copying_on_the_graph_equals_the_eager_models(length, monkeypatch):
    """GraphMeter.copying: repeated random sequences shaped like the traced input (2 x length: four
    windows for 8 rows), scored on the logits the eager model gives on them, with and without a plan."""
    from cqil_fx.eager import quality
    from cqil_fx.planning.search import COPYING_SEED

    model, ids = tiny_model("llama"), tokens(batch=2, length=length)
    gm = capture_graph(model, ids, use_cache=False)
    runner = GraphMeter(gm, _real_inputs(model, gm, ids), CALIBRATION)
    vocab = model.config.vocab_size
    rows = quality.repeated_random_tokens(vocab, 8, length // 2, seed=COPYING_SEED,
                                          bos=vocab // 4 if length % 2 else None)
    assert rows.shape == (8, length)
    scored = []
    real = quality.copying
    monkeypatch.setattr(quality, "copying", lambda logits, ids, n: scored.append((logits, ids, n)) or real(logits, ids, n))
    for plan in (None, Plan(LAYERS, ((2, 3),), 0)):
        scored.clear()
        share = runner.copying(plan)
        assert [torch.equal(w, i) and n == length // 2 for w, (_, i, n) in zip(rows.split(2), scored)] == [True] * 4
        with torch.no_grad():
            for window, (logits, _, _) in zip(rows.split(2), scored):
                eager = (cqil_reference(model, plan, window, use_cache=False) if plan else
                         model(window, use_cache=False)).logits
                assert relative_error(logits, eager) <= 1e-5
        assert share == pytest.approx(sum(real(*s) for s in scored) / 4)


def test_the_search_on_the_graph_keeps_the_original_copying(monkeypatch):
    """GraphMeter.copying stood in for: plans grouping block 2 copy half as well; the backend's
    search on the graph keeps none of them (its floor is KEEP_COPYING)."""
    def stand_in(self, plan=None, rows=8):
        return 0.5 if plan is not None and any(2 in g for g in plan.groups) else 1.0

    model, ids = tiny_model("llama"), CALIBRATION[0]
    free = make_backend(plan="auto", calibration=CALIBRATION, budget=0.3, inner="eager")
    torch.compile(model, backend=free)(ids, use_cache=False)
    assert any(2 in g for g in free.reports[-1].plan.groups), free.reports[-1]
    torch._dynamo.reset()
    monkeypatch.setattr(GraphMeter, "copying", stand_in)
    floored = make_backend(plan="auto", calibration=CALIBRATION, budget=0.3, inner="eager")
    torch.compile(model, backend=floored)(ids, use_cache=False)
    plan = floored.reports[-1].plan
    assert plan.groups and not any(2 in g for g in plan.groups), plan


def test_plan_json_round_trip_and_use(tmp_path):
    plan = Plan(LAYERS, ((1, 2), (4, 5, 6)), 1)
    path = tmp_path / "plan.json"
    plan.save(path)
    loaded = Plan.load(path)
    assert loaded == plan and repr(loaded) == repr(plan)
    model, ids = tiny_model("llama"), CALIBRATION[0]
    backend = make_backend(loaded, inner="eager")
    logits = torch.compile(model, backend=backend)(ids, use_cache=False).logits
    assert relative_error(logits, cqil_reference(model, plan, ids, use_cache=False).logits) <= 1e-4
    with pytest.raises(CQILConfigError, match="not a cqil_fx plan"):
        Plan.from_json('{"groups": [[1, 2]]}')
    with pytest.raises(CQILConfigError, match=r"group \[1, 3\] is not consecutive"):
        Plan.from_json('{"num_blocks": 8, "groups": [[1, 3]], "bypass": 0}')


def test_plan_for_another_model_is_refused():
    with pytest.raises(CQILPlanError, match="made for 30 decoder blocks, but the model has 8"):
        CQILConfig(plan=Plan(30, ((12, 13),), 0)).plan_for(8)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (dict(plan="auto"), "plan='auto' needs calibration="),
        (dict(plan="auto", calibration=CALIBRATION, parallel=1), "needs parallel >= 2"),
        (dict(plan="best"), "must be a Plan, 'auto' or None"),
        (dict(plan=Plan(8, ((1, 2),), 0), start=1, end=3), "give plan=... or groups="),
        (dict(plan=Plan(8, ((1, 2),), 0), bypass=1), "carries its own bypass"),
        (dict(budget=-0.1), "budget=-0.1 must be a number >= 0"),
        (dict(calibration=CALIBRATION, bypass=1), "the automatic planner chooses the bypass distance"),
    ],
)
def test_bad_plan_fields(fields, message):
    with pytest.raises(CQILConfigError, match=message):
        CQILConfig(**fields)


def test_copying_is_the_share_of_the_second_occurrence_predicted():
    from cqil_fx.eager.quality import copying, repeated_random_tokens

    ids = repeated_random_tokens(100, count=3, length=5, bos=1)
    assert ids.shape == (3, 11) and torch.equal(ids[:, 1:6], ids[:, 6:]) and (ids[:, 0] == 1).all()
    assert not torch.equal(ids, repeated_random_tokens(100, count=3, length=5, bos=1, seed=1))
    following = torch.nn.functional.one_hot(ids.roll(-1, dims=1), 100).float()  # ranks each next token first
    assert copying(following, ids, 5) == 1.0
    assert copying(torch.zeros(3, 11, 100), ids, 5) == 0.0  # argmax 0: never one of the random ids
    following[0, 7] = following[0, 8]  # one of the 3 x 4 predicted tokens wrong
    assert copying(following, ids, 5) == pytest.approx(11 / 12)
    with pytest.raises(CQILConfigError, match="length 1"):
        repeated_random_tokens(100, length=1)


def test_quality_study_writes_its_report(tmp_path):
    from cqil_fx.eager.quality import QualityProbe
    from cqil_fx.tools.study import run_study, write_report

    model = tiny_model("llama")
    probe = QualityProbe(model, CALIBRATION[:2], tokens(batch=2, length=6, seed=9), new_tokens=4)
    rows, similarity = run_study(model, CALIBRATION, probe, budgets=(0.5,), screen=4, default=False,
                                 spans=((2, 6),), beam=2)
    assert rows[0].method == "original" and rows[0].next_token == 1.0 and rows[0].greedy == 1.0
    assert all(0.0 <= r.copying <= 1.0 for r in rows)
    assert rows[0].copying == measure_copying(model)  # the probe's sequences are measure_copying's
    plan = CQILConfig(start=2, end=6).plan_for(8)
    assert next(r.copying for r in rows if r.name == "uniform S2-E6 P2 D0") == measure_copying(model, plan)
    assert {r.method for r in rows} == {"original", "cqil", "removal"}
    assert {"uniform S2-E6 P2 D0", "uniform S2-E6 P2 D0 corrected", "auto P2 KL corrected +10%",
            "auto P2 KL corrected +10% beam 2"} <= {r.name for r in rows}
    assert all(r.promise is not None for r in rows if r.name.startswith("auto"))
    removal_counts = {r.saved_blocks for r in rows if r.method == "removal"}
    assert {r.saved_blocks for r in rows if r.method == "cqil" and r.saved_blocks} <= removal_counts
    write_report(rows, similarity, tmp_path, "cqil-fx eval --test", {"calibration": 96, "evaluation": 64})
    text = (tmp_path / "quality.md").read_text()
    assert "    cqil-fx eval --test" in text and "| original | original | 0 |  |" in text
    assert "Targets:" in text and "promised" in text and "| copying |" in text
    for name in ("quality.png", "similarity.png", "quality.json"):
        assert (tmp_path / name).stat().st_size > 0


def test_planner_argument_errors():
    with pytest.raises(CQILConfigError, match="parallel=1"):
        plan_auto(tiny_model("llama"), CALIBRATION, parallel=1, progress=False)
    with pytest.raises(CQILConfigError, match="budget=-1"):
        plan_auto(tiny_model("llama"), CALIBRATION, budget=-1, progress=False)


def test_one_token_graph_falls_back_to_the_default_plan(caplog, small_self_text):
    import logging

    backend = make_backend(calibration=CALIBRATION, inner="eager")
    with caplog.at_level(logging.WARNING, logger="cqil_fx"):
        torch.compile(tiny_model("llama"), backend=backend)(CALIBRATION[0][:, :1], use_cache=False)
    assert "no next token to predict" in caplog.text
    assert backend.reports[-1].source == "searched"  # the measured default plan, on self-written text
