"""cqil_fx.plan, the explicit planning step: searched ahead of time, then found by backend="cqil" without the
model object, for a model inside a pipeline or serving object and for a compiled ``model.forward``."""

from __future__ import annotations

import logging

import pytest
import torch

import cqil_fx
from cqil_fx import CQILConfig, CQILConfigError, cqil_reference, make_backend
from cqil_fx.planning import cache as plan_cache
from cqil_fx.planning import default

from conftest import relative_error
from tiny_models import tiny_model, tokens

TOLERANCE = 1e-4


class Server:
    """A serving object that holds the model and calls it from a method of its own (no model on the stack
    of the compiled call but ``self.model`` inside another object)."""

    def __init__(self, model):
        self.model = model

    def answer(self, ids):
        return self.model(ids, use_cache=False).logits


def test_the_cache_follows_xdg_cache_home(monkeypatch, tmp_path):
    monkeypatch.delenv("CQIL_FX_PLAN_CACHE")
    monkeypatch.delenv("CQIL_FX_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert plan_cache.cache_dir() == tmp_path / "xdg" / "cqil_fx" / "plans"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/path")  # not absolute: ignored, as the XDG spec says
    assert plan_cache.cache_dir() == plan_cache.Path.home() / ".cache" / "cqil_fx" / "plans"


def test_a_planned_model_in_a_serving_object_compiles_its_plan_without_looking_for_the_model(small_self_text,
                                                                                            monkeypatch, caplog):
    model, ids = tiny_model("qwen2"), tokens()
    with caplog.at_level(logging.INFO, logger="cqil_fx"):
        plan = cqil_fx.plan(model, budget=0.5, progress=False)
    assert plan.groups and "plan for Qwen2ForCausalLM" in caplog.text

    def no_frame_walk(example_inputs):
        raise AssertionError("the backend looked for the model although a plan was chosen for its weights")

    monkeypatch.setattr(default, "find_model", no_frame_walk)
    server = Server(model)
    backend = make_backend(inner="aot_eager")  # no plan fields: what backend="cqil" does
    server.model.forward = torch.compile(server.model.forward, backend=backend)
    try:
        actual = server.answer(ids)
    finally:
        del server.model.forward
    report = backend.reports[-1]
    assert (report.source, report.plan) == ("chosen", plan)
    expected = cqil_reference(model, CQILConfig(plan=plan), ids, use_cache=False).logits
    assert relative_error(actual, expected) < TOLERANCE


def test_planning_again_with_another_budget_replaces_the_chosen_plan(small_self_text):
    model = tiny_model("llama")
    loose = cqil_fx.plan(model, budget=0.5, progress=False)
    tight = cqil_fx.plan(model, budget=0.0, progress=False)  # nothing fits a zero budget
    assert loose.groups and not tight.groups
    backend = make_backend(inner="aot_eager")
    torch.compile(model, backend=backend)(tokens(), use_cache=False)
    assert backend.reports[-1].fallback and backend.reports[-1].fallback.startswith("default plan")


def test_a_second_plan_call_reads_the_cache_instead_of_searching(small_self_text, monkeypatch):
    model = tiny_model("llama")
    first = cqil_fx.plan(model, budget=0.5, progress=False)
    monkeypatch.setattr(default, "plan_default", lambda *a, **k: pytest.fail("searched again"))
    assert cqil_fx.plan(model, budget=0.5, progress=False) == first


def test_plan_refuses_what_is_not_a_model_or_cannot_group():
    with pytest.raises(CQILConfigError, match="needs the model"):
        cqil_fx.plan("model")
    with pytest.raises(CQILConfigError, match="parallel=1"):
        cqil_fx.plan(tiny_model("llama"), parallel=1)
