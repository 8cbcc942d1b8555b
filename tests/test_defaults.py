"""backend="cqil" with no arguments: a measured plan (self-written calibration text, KL, corrections),
the plan cache, the mode "auto" picks, and group corrections in every mode."""

import json
import logging
import os

import pytest
import torch

from cqil_fx import CQILConfig, Plan, cqil_reference, make_backend
from cqil_fx.planning import auto as planner
from cqil_fx.planning import cache as plan_cache
from cqil_fx.errors import CQILConfigError
from cqil_fx.eager.correction import LowRankEquations, NormalEquations, fit_corrections
from cqil_fx.planning.auto import plan_auto
from cqil_fx.planning.meter import EagerMeter as DistortionMeter
from cqil_fx.planning.self_text import self_generated_text
from cqil_fx.eager.reference import cqil_semantics
from cqil_fx.graph import modes as backend_module
from cqil_fx.graph.modes import execution_mode
from cqil_fx.stack import decoder_layers

from conftest import relative_error
from tiny_models import LAYERS, tiny_model, tokens

CALIBRATION = [tokens(batch=1, length=32, seed=s) for s in range(6)]


def test_self_generated_text_is_windows_of_the_model_and_deterministic_for_a_seed():
    model = tiny_model("llama")
    first = self_generated_text(model, tokens=96, window=32, seed=3)
    assert [w.shape for w in first] == [torch.Size([1, 32])] * 3
    assert all(w.dtype == torch.long and int(w.max()) < model.config.vocab_size for w in first)
    again = self_generated_text(model, tokens=96, window=32, seed=3)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    other = self_generated_text(model, tokens=96, window=32, seed=4)
    assert not all(torch.equal(a, b) for a, b in zip(first, other))


def test_more_windows_than_sequences_at_a_time_are_written_in_rounds_of_one_window_each():
    model = tiny_model("llama")
    written = self_generated_text(model, tokens=96, window=16, seed=3, batch=2)  # 6 windows, 3 rounds
    assert [w.shape for w in written] == [torch.Size([1, 16])] * 6
    assert all(torch.equal(a, b) for a, b in zip(written, self_generated_text(model, tokens=96, window=16,
                                                                                seed=3, batch=2)))
    assert len({tuple(w.flatten().tolist()) for w in written}) == 6  # each round samples anew


def test_self_written_text_from_openings_starts_each_round_with_the_next_opening():
    model = tiny_model("llama")
    openings = [torch.tensor([5, 6, 7]), torch.tensor([9])]
    written = self_generated_text(model, tokens=128, window=16, seed=3, openings=openings)  # 8 windows, batch 4
    assert [w.shape for w in written] == [torch.Size([1, 16])] * 8
    starts = [w[0, :3].tolist() if i < 4 else w[0, :1].tolist() for i, w in enumerate(written)]
    assert starts == [[5, 6, 7]] * 4 + [[9]] * 4  # round 1 from the first opening, round 2 from the second
    assert len({tuple(w.flatten().tolist()) for w in written}) == 8
    assert all(torch.equal(a, b) for a, b in zip(written, self_generated_text(
        model, tokens=128, window=16, seed=3, openings=openings)))
    with pytest.raises(CQILConfigError, match="shorter than the window"):
        self_generated_text(model, tokens=128, window=16, openings=[torch.arange(16)])


@pytest.mark.parametrize(("measure", "correct"), [("kl", True), ("kl", False), ("perplexity", True)])
def test_the_search_keeps_its_budget_on_what_it_measured(measure, correct):
    model = tiny_model("qwen2")
    search = plan_auto(model, CALIBRATION, budget=0.3, bypass=(0,), measure=measure, correct=correct,
                       progress=False)
    assert search.plan.groups and search.cost <= 0.3
    assert bool(search.plan.corrections) == correct
    # The promise is the plan's own cost, measured again independently on the held-out half.
    held = CALIBRATION[1::2] if correct else CALIBRATION
    assert DistortionMeter(model, held, measure)(search.plan) / search.base_perplexity - 1 == pytest.approx(
        search.cost, rel=1e-5)


@pytest.mark.parametrize("family", ["llama", "gemma2", "phi"])
def test_the_meter_starts_at_the_first_group_and_measures_what_a_full_forward_does(family):
    """The blocks before a plan's first group replay the original's outputs: the values equal an
    independent full forward (perplexity; KL against the reference logits), and those blocks compute nothing."""
    from cqil_fx.eager.quality import perplexity

    model = tiny_model(family)
    first_block = decoder_layers(model)[0]
    kl_meter, ppl_meter = DistortionMeter(model, CALIBRATION, "kl"), DistortionMeter(model, CALIBRATION, "perplexity")
    calls = []
    hook = next(first_block.children()).register_forward_hook(lambda *a: calls.append(1))
    try:
        for groups in [((2, 3),), ((5, 6), (3, 4)), ()]:
            plan = Plan(LAYERS, groups, 0)
            calls.clear()
            kl, ppl = kl_meter.kl(plan), ppl_meter(plan)
            assert not calls  # block 0's submodules never ran: no plan here starts there
            assert ppl == pytest.approx(perplexity(model, CALIBRATION, plan=plan), rel=1e-6)
            total = count = 0.0
            with torch.no_grad():
                for ids in CALIBRATION:
                    p = torch.log_softmax(model(ids, use_cache=False).logits.float(), -1)
                    q = torch.log_softmax(cqil_reference(model, plan, ids, use_cache=False).logits.float(), -1)
                    total, count = total + float((p.exp() * (p - q)).sum()), count + p[..., 0].numel()
            assert kl == pytest.approx(total / count, rel=1e-5, abs=1e-9)
            assert (kl == 0) == (not groups)
    finally:
        hook.remove()
    assert not any("forward" in vars(layer) for layer in decoder_layers(model))  # the stand-ins are gone


@pytest.mark.parametrize("family", ["llama", "phi"])
def test_fitting_from_the_first_group_to_the_last_gives_the_corrections_of_whole_forwards(family):
    """fit_corrections replays the blocks before the first group and stops at the last group's sum: the
    corrections equal those of normal equations gathered from whole forwards, and block 7 never runs."""
    from cqil_fx.eager import correction
    from cqil_fx.eager.replay import BlockOutputs

    model = tiny_model(family)
    layers = decoder_layers(model)
    plan = Plan(LAYERS, ((5, 6), (2, 3)), 0)
    # The reference: whole forwards under the plan's semantics, every group's x, deltas and call seen.
    equations = {}
    for ids in CALIBRATION:
        seen = {}
        with torch.no_grad(), cqil_semantics(model, plan, observe=lambda g, x, d, call: seen.update({g: (x, d, call)})):
            model(ids, use_cache=False)
        with torch.no_grad():
            for g, (x, deltas, (args, kwargs)) in seen.items():
                target = x
                for i in plan.groups[g]:
                    target = correction._call_layer(layers[i], target, args, kwargs)
                equations.setdefault(g, NormalEquations(len(deltas), x.shape[-1])).add(x, deltas, target)
    expected = [equations[g].solve(0.0) for g in range(len(plan.groups))]
    calls = []
    hooks = [layers[i].register_forward_pre_hook(lambda m, a, i=i: calls.append(i)) for i in (0, 7)]
    try:
        outputs = BlockOutputs.of(model, CALIBRATION)
        calls.clear()
        fitted = {"whole": fit_corrections(model, plan, CALIBRATION, ridge=0.0)}
        assert calls == [0] * len(CALIBRATION)  # block 0 ran, block 7 (after the last group) never did
        calls.clear()
        fitted["replayed"] = fit_corrections(model, plan, CALIBRATION, ridge=0.0, outputs=outputs)
        assert calls == [0] * len(CALIBRATION)  # the replaying stand-in is called through the hooks
    finally:
        for h in hooks:
            h.remove()
    for how, plan_fitted in fitted.items():
        for want, got in zip(expected, plan_fitted.corrections):
            torch.testing.assert_close(torch.tensor(got.scale), torch.tensor(want.scale), rtol=1e-5, atol=1e-7,
                                       msg=how)
            torch.testing.assert_close(torch.tensor(got.bias), torch.tensor(want.bias), rtol=1e-5, atol=1e-6,
                                       msg=how)


def test_a_correction_brings_the_group_closer_to_the_blocks_one_after_the_other():
    model = tiny_model("llama")
    plan = Plan(LAYERS, ((2, 3), (5, 6)), 0)
    fitted = fit_corrections(model, plan, CALIBRATION, ridge=0.0)
    assert all(c is not None and len(c.scale) == 2 and c.hidden_size == 32 for c in fitted.corrections)
    ids = tokens(seed=11)  # not among the calibration batches
    original = model(ids, use_cache=False).logits
    plain = cqil_reference(model, plan, ids, use_cache=False).logits
    corrected = cqil_reference(model, fitted, ids, use_cache=False).logits
    assert relative_error(corrected, original) < relative_error(plain, original)


def test_normal_equations_recover_a_known_affine_map_and_ridge_pulls_towards_none():
    torch.manual_seed(0)
    x, d0, d1 = torch.randn(3, 500, 4)
    scale0, scale1, bias = torch.tensor([0.5, 1, 2, -1.0]), torch.tensor([1.5, 0, 1, 2.0]), torch.arange(4.0)
    eq = NormalEquations(2, 4)
    eq.add(x, [d0, d1], x + scale0 * d0 + scale1 * d1 + bias)
    exact = eq.solve(ridge=0.0)
    torch.testing.assert_close(torch.tensor(exact.scale), torch.stack([scale0, scale1]), atol=1e-6, rtol=0)
    torch.testing.assert_close(torch.tensor(exact.bias), bias, atol=1e-6, rtol=0)
    pulled = eq.solve(ridge=100.0)
    assert (torch.tensor(pulled.scale) - 1).abs().sum() < (torch.tensor(exact.scale) - 1).abs().sum()


def test_low_rank_equations_recover_a_known_map_and_keep_its_strongest_directions():
    torch.manual_seed(0)
    d0, d1 = torch.randn(2, 2000, 6)
    w = torch.randn(12, 2) @ torch.randn(2, 6)  # rank 2: concat(d0, d1) @ w
    eq = LowRankEquations(2, 6)
    for a, b in zip(d0.split(500), d1.split(500)):  # accumulated over batches
        eq.add([a, b], torch.cat([a, b], -1) @ w)
    exact = eq.solve(rank=2, ridge=0.0)
    assert [tuple(d.shape) for d in exact.down] == [(6, 2), (6, 2)] and tuple(exact.up.shape) == (2, 6)
    torch.testing.assert_close(torch.cat(exact.down) @ exact.up, w, atol=1e-4, rtol=0)
    one = eq.solve(rank=1, ridge=0.0)  # the fitted values' strongest direction, and only it
    fitted, kept = torch.cat([d0, d1], -1) @ w, torch.cat([d0, d1], -1) @ torch.cat(one.down) @ one.up
    assert torch.linalg.matrix_rank(torch.cat(one.down) @ one.up) == 1
    assert 0.05 < float((fitted - kept).norm() / fitted.norm()) < 0.95
    assert eq.solve(rank=64, ridge=0.0).rank == 6  # at most the hidden size


@pytest.mark.parametrize("family", ["llama", "gpt2", "phi"])
def test_a_low_rank_term_fitted_on_enough_text_brings_unseen_logits_closer_than_the_affine_one(family):
    model = tiny_model(family)
    plan = Plan(LAYERS, ((2, 3), (5, 6)), 0)
    calibration = [tokens(batch=2, length=32, seed=s) for s in range(20)]  # 1,280 tokens for 64 x 32 maps
    affine = fit_corrections(model, plan, calibration)
    low_rank = fit_corrections(model, plan, calibration, low_rank=8)
    assert all(c.low_rank.rank == 8 and c.scale == a.scale for c, a in zip(low_rank.corrections, affine.corrections))
    ids = tokens(seed=111)  # not among the calibration batches
    with torch.no_grad():
        original = model(ids, use_cache=False).logits
        errors = [relative_error(cqil_reference(model, p, ids, use_cache=False).logits, original)
                  for p in (plan, affine, low_rank)]
    assert errors[2] < errors[1] < errors[0], errors


def test_a_low_rank_term_that_does_not_fit_its_correction_is_refused():
    from cqil_fx.config import GroupCorrection, LowRank

    factors = LowRank((torch.zeros(4, 2), torch.zeros(4, 2)), torch.zeros(2, 4))
    GroupCorrection(((1.0,) * 4, (1.0,) * 4), (0.0,) * 4, factors)
    with pytest.raises(CQILConfigError, match="low-rank term of 2 members and width 4"):
        GroupCorrection(((1.0,) * 5, (1.0,) * 5), (0.0,) * 5, factors)
    with pytest.raises(CQILConfigError, match="low-rank term of 2 members"):
        GroupCorrection(((1.0,) * 4,) * 3, (0.0,) * 4, factors)
    with pytest.raises(CQILConfigError, match=r"\(hidden, rank\) factor per member"):
        LowRank((torch.zeros(4, 2), torch.zeros(4, 3)), torch.zeros(2, 4))
    with pytest.raises(CQILConfigError, match="low_rank must be 0"):
        fit_corrections(tiny_model("llama"), Plan(LAYERS, ((2, 3),), 0), CALIBRATION[:1], low_rank=-1)


@pytest.mark.parametrize("mode", ["local", "concurrent"])
@pytest.mark.parametrize("low_rank", [0, 4])
@pytest.mark.parametrize(("family", "bypass"), [("llama", 1), ("gpt2", 0), ("phi", 0)])
def test_corrected_plans_compile_to_the_corrected_reference(family, bypass, low_rank, mode):
    model = tiny_model(family)
    plan = fit_corrections(model, Plan(LAYERS, ((1, 2), (3, 4), (6, 7)), bypass), CALIBRATION[:2], low_rank=low_rank)
    ids = tokens(seed=5)
    backend = make_backend(plan, mode=mode, inner="eager")
    actual = torch.compile(model, backend=backend)(ids, use_cache=False).logits
    expected = cqil_reference(model, plan, ids, use_cache=False).logits
    assert relative_error(actual, expected) <= 1e-5
    assert relative_error(expected, cqil_reference(model, plan.without_corrections(), ids, use_cache=False).logits) > 1e-3
    assert backend.reports[-1].mode == mode


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["local", "concurrent"])
def test_corrected_plans_compile_to_the_corrected_reference_with_inductor(mode):
    """Inductor's result is called with the inputs unpacked, the corrections' constants after them
    (it carries a ``_boxed_call`` flag that is not true of it: the default backend in local mode,
    i.e. on one CPU thread or on CUDA without reduce-overhead, once passed them as one list)."""
    model = tiny_model("llama")
    plan = fit_corrections(model, Plan(LAYERS, ((1, 2), (3, 4)), 0), CALIBRATION[:2], low_rank=4)
    ids = tokens(seed=5)
    backend = make_backend(plan, mode=mode)
    actual = torch.compile(model, backend=backend)(ids, use_cache=False).logits
    expected = cqil_reference(model, plan, ids, use_cache=False).logits
    assert relative_error(actual, expected) <= 1e-4
    assert backend.reports[-1].mode == mode


@pytest.mark.parametrize("low_rank", [0, 4])
def test_a_corrected_plan_round_trips_through_json(tmp_path, low_rank):
    model = tiny_model("llama")
    plan = fit_corrections(model, Plan(LAYERS, ((2, 3), (5, 6)), 0), CALIBRATION[:2], low_rank=low_rank)
    plan.save(tmp_path / "plan.json")
    loaded = Plan.load(tmp_path / "plan.json")
    assert loaded == plan and loaded != plan.without_corrections()
    data = json.loads((tmp_path / "plan.json").read_text())
    assert data["corrections"][0]["bias"] == list(plan.corrections[0].bias)
    assert ("low_rank" in data["corrections"][0]) == bool(low_rank)
    ids = tokens(seed=5)
    with torch.no_grad():  # bit for bit the same model
        assert torch.equal(cqil_reference(model, loaded, ids, use_cache=False).logits,
                           cqil_reference(model, plan, ids, use_cache=False).logits)


def test_a_plan_whose_low_rank_factors_are_damaged_is_refused(tmp_path):
    from cqil_fx.errors import CQILConfigError

    plan = fit_corrections(tiny_model("llama"), Plan(LAYERS, ((2, 3),), 0), CALIBRATION[:1], low_rank=4)
    data = plan.to_dict()
    for damage, message in [(dict(up=data["corrections"][0]["low_rank"]["up"][:-8]), "not a cqil_fx plan|not float32"),
                            (dict(dtype="bfloat16"), "stored as float32"),
                            (dict(rank=5), "rank 5 cannot have factors of \\[128, 128, 128\\]"),
                            (dict(rank=8), "width 16 does not fit a correction of 2 members and width 32")]:
        broken = json.loads(json.dumps(data))
        broken["corrections"][0]["low_rank"].update(damage)
        with pytest.raises(CQILConfigError, match=message):
            Plan.from_dict(broken)


def test_cli_correct_refuses_a_plan_named_twice_or_not_at_all_and_a_negative_rank(capsys):
    from cqil_fx.tools.cli import main

    for argv, message in [([], "name the plan to correct once"),
                          (["--start", "20", "--end", "28", "--plan", "p.json"], "name the plan to correct once"),
                          (["--start", "20", "--end", "28", "--low-rank", "-1"], "the rank is 0 or more")]:
        with pytest.raises(SystemExit) as info:
            main(["correct", *argv])
        assert info.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.real_model
def test_cli_correct_fits_writes_and_measures_a_low_rank_plan(smollm2, tmp_path, capsys):
    from cqil_fx.tools.cli import main

    out = tmp_path / "plan.json"
    assert main(["correct", "--start", "26", "--end", "28", "--data", "self", "--self-tokens", "256",
                 "--low-rank", "8", "--held-out", "1", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    plan = Plan.load(out)
    assert plan.groups == ((26, 27),) and plan.corrections[0].low_rank.rank == 8
    assert "calibration 256 tokens (self)" in printed and "1 corrected (low rank 8)" in printed
    for row in ("original", "uncorrected", "scale and bias", "corrected (low rank 8)"):
        assert f"held-out perplexity {row}" in printed


# --------------------------------------------------------------------------- the plan cache


def _key(model, budget=0.1):
    layers = decoder_layers(model)
    return plan_cache.PlanKey.of(["sequential"] * len(layers), [list(l.parameters()) for l in layers], budget, 2,
                                 search=planner.default_search_settings())


def test_plan_cache_hits_and_misses(tmp_path, monkeypatch):
    model = tiny_model("llama")
    plan = Plan(LAYERS, ((2, 3),), 0)
    assert plan_cache.load_plan(_key(model), tmp_path) is None
    plan_cache.store_plan(_key(model), plan, {"cost": 0.05}, tmp_path)
    assert plan_cache.load_plan(_key(model), tmp_path) == (plan, {"cost": 0.05})
    assert plan_cache.load_plan(_key(model, budget=0.2), tmp_path) is None  # another budget
    changed = tiny_model("llama", seed=1)  # another model of the same shape
    assert plan_cache.load_plan(_key(changed), tmp_path) is None
    monkeypatch.setattr(planner, "SAFETY", 0.8)  # the search changed: its old answers do not count
    assert plan_cache.load_plan(_key(model), tmp_path) is None


def test_plan_cache_ignores_corrupt_and_foreign_entries_with_a_warning(tmp_path, caplog):
    model = tiny_model("llama")
    path = plan_cache.entry_path(_key(model), tmp_path)
    path.write_text("{not json")
    with caplog.at_level(logging.WARNING, logger="cqil_fx"):
        assert plan_cache.load_plan(_key(model), tmp_path) is None
    assert "ignoring the plan cache entry" in caplog.text
    other = plan_cache.entry_path(_key(model, budget=0.3), tmp_path)
    plan_cache.store_plan(_key(model, budget=0.3), Plan(LAYERS, ((2, 3),), 0), None, tmp_path)
    os.replace(other, path)  # a valid entry under the wrong name
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="cqil_fx"):
        assert plan_cache.load_plan(_key(model), tmp_path) is None
    assert "another key" in caplog.text


def test_an_unwritable_plan_cache_means_no_cache_not_a_failure(tmp_path, caplog):
    blocked = tmp_path / "file"
    blocked.write_text("")  # a file where the directory should be
    with caplog.at_level(logging.WARNING, logger="cqil_fx"):
        assert plan_cache.store_plan(_key(tiny_model("llama")), Plan(LAYERS, (), 0), None, blocked / "d") is None
    assert "cannot write the plan cache" in caplog.text


def test_the_cache_directory_moves_with_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("CQIL_FX_PLAN_CACHE", str(tmp_path / "a"))
    assert plan_cache.cache_dir() == tmp_path / "a"
    monkeypatch.delenv("CQIL_FX_PLAN_CACHE")
    monkeypatch.setenv("CQIL_FX_CACHE", str(tmp_path / "root"))
    assert plan_cache.cache_dir() == tmp_path / "root" / "plans"


# --------------------------------------------------------------------------- the default backend


def test_default_backend_searches_once_then_reuses_the_cached_plan(small_self_text, caplog):
    model, ids = tiny_model("llama"), tokens()
    with caplog.at_level(logging.INFO, logger="cqil_fx"):
        first = make_backend(inner="eager")
        actual = torch.compile(model, backend=first)(ids, use_cache=False).logits
    report = first.reports[-1]
    assert report.source == "searched" and report.plan.groups and report.plan.corrections
    assert report.cost is not None and report.cost <= planner.SAFETY * 0.10 + 1e-9
    expected = cqil_reference(model, report.plan, ids, use_cache=False).logits
    assert relative_error(actual, expected) <= 1e-5
    assert any("searched" in r.getMessage() and "mode" in r.getMessage() for r in caplog.records)
    torch._dynamo.reset()
    second = make_backend(inner="eager", mode="local")
    torch.compile(model, backend=second)(ids, use_cache=False)
    assert second.reports[-1].source == "cached" and second.reports[-1].plan == report.plan


class _PlainLM(torch.nn.Module):
    """A causal LM that is not a transformers model: returns its logits as a tensor, takes no use_cache."""

    def __init__(self, vocab: int = 100, width: int = 32, depth: int = 6):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, width)
        self.layers = torch.nn.ModuleList(_PlainBlock(width) for _ in range(depth))
        self.head = torch.nn.Linear(width, vocab)

    def forward(self, ids):
        x = self.embed(ids)
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


class _PlainBlock(torch.nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.ln1, self.ln2 = torch.nn.LayerNorm(width), torch.nn.LayerNorm(width)
        self.attn = torch.nn.Linear(width, width)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(width, 4 * width), torch.nn.GELU(), torch.nn.Linear(4 * width, width))

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


@pytest.mark.parametrize("length", [16, 256])
def test_default_backend_on_a_model_its_search_cannot_run_plans_on_the_graph_or_compiles_unchanged(caplog, length):
    """The eager search calls a transformers causal LM; another module gets a WARNING and the graph's own
    search on its first inputs (256 tokens or more), else the graph unchanged: never a crash."""
    torch.manual_seed(0)
    model, ids = _PlainLM().eval(), torch.randint(0, 100, (1, length))
    backend = make_backend(inner="eager", mode="local")
    with caplog.at_level(logging.INFO, logger="cqil_fx"), torch.no_grad():
        actual = torch.compile(model, backend=backend)(ids)
    assert "the default plan's search cannot run _PlainLM (AttributeError" in caplog.text
    report = backend.reports[-1]
    if length < 256:
        assert report.fallback and "a model object the search cannot run" in report.fallback, report
        torch.testing.assert_close(actual, model(ids), rtol=0, atol=1e-5)
    else:
        assert report.source == "searched on the first inputs" and report.plan.groups, report
        assert relative_error(actual, cqil_reference(model, report.plan, ids)) <= 1e-5


def test_default_backend_without_a_model_or_enough_tokens_compiles_unchanged(caplog):
    model, ids = tiny_model("gpt2"), tokens()
    backend = make_backend(inner="eager")
    gm_holder = []

    def capture(gm, example_inputs):
        gm_holder.append((gm, example_inputs))
        return gm.forward

    torch.compile(model, backend=capture)(ids, use_cache=False)
    gm, inputs = gm_holder[0]
    with caplog.at_level(logging.INFO, logger="cqil_fx"):
        compiled = _call_without_model_on_stack(backend, gm, inputs)
    assert backend.reports[-1].fallback and "default plan" in backend.reports[-1].fallback
    assert "fewer than 256" in caplog.text
    torch.testing.assert_close(compiled(*inputs)[0], model(ids, use_cache=False).logits, rtol=0, atol=1e-5)


def _call_without_model_on_stack(backend, gm, inputs):
    """The backend on a captured graph whose weights are plain tensors: no module owns them."""
    return backend(gm, [x.detach().clone() if isinstance(x, torch.Tensor) else x for x in inputs])


# --------------------------------------------------------------------------- mode="auto"


def _inputs(device):
    return [torch.empty(2, 3, device="meta" if device != "cpu" else "cpu")]


@pytest.mark.parametrize(("threads", "device", "compile_mode", "expected"), [
    (2, "cpu", None, ("concurrent", False)),
    (1, "cpu", None, ("local", False)),
    (2, "cuda", None, ("local", False)),
    (2, "cuda", "reduce-overhead", ("concurrent", True)),
])
def test_auto_picks_the_mode_measured_fastest(monkeypatch, threads, device, compile_mode, expected):
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    monkeypatch.setattr(backend_module, "device_of", lambda inputs: torch.device(device))
    choice = execution_mode(CQILConfig(), _inputs(device), compile_mode)
    assert (choice.mode, choice.cuda_graphs) == expected and choice.why
    assert execution_mode(CQILConfig(mode="local"), _inputs(device), compile_mode).mode == "local"


@pytest.mark.parametrize("family", ["llama", "gpt2", "phi"])
def test_the_model_and_its_graph_have_the_same_plan_cache_key(family):
    """`cqil-fx plan --default` (the model) fills the entry the backend (the graph) looks up."""
    from cqil_fx.eager.reference import branches_of
    from cqil_fx.planning.default import graph_plan_key, model_plan_key
    from cqil_fx.passes import find_blocks

    model = tiny_model(family)
    captured = []
    torch.compile(model, backend=lambda gm, inputs: captured.append((gm, inputs)) or gm.forward)(
        tokens(), use_cache=False)
    gm, inputs = captured[0]
    config = CQILConfig(budget=0.1)
    kinds = [branches_of(layer).kind for layer in decoder_layers(model)]
    assert graph_plan_key(gm, inputs, find_blocks(gm), config) == model_plan_key(model, kinds, config)


def test_inspect_shows_the_default_plan_and_where_it_came_from(small_self_text):
    from cqil_fx.tools.inspect import inspect_model

    report = inspect_model(tiny_model("llama"), tokens(batch=1))
    assert "plan source: default plan, searched" in str(report)
    again = inspect_model(tiny_model("llama"), tokens(batch=1))
    assert "plan source: default plan, cached" in str(again) and again.plan == report.plan


def test_a_decode_graph_reuses_the_prefill_graphs_plan(small_self_text):
    """Static-cache generate: the decode graph takes the KV caches as inputs; the plan key reads weights only."""
    from cqil_fx.tools.generation import compiled_twin

    model = tiny_model("llama")
    backend = make_backend(inner="eager")
    twin = compiled_twin(model, backend)
    ids = tokens(batch=1, length=8)
    with torch.no_grad():
        twin.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, min_new_tokens=3, do_sample=False,
                      cache_implementation="static", pad_token_id=0)
    sources = [r.source for r in backend.reports if r.fallback is None]
    assert sources[0] == "searched" and len(sources) >= 2 and set(sources[1:]) == {"cached"}
