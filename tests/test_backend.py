"""The backend as users meet it: fallback, errors inside torch.compile, registration."""

import logging

import pytest
import torch

import cqil_fx
from cqil_fx import CQILConfig, CQILPlanError, cqil_backend, cqil_reference, make_backend

from conftest import relative_error
from tiny_models import tiny_model, tokens


def exception_chain(error):
    while error is not None:
        yield error
        error = error.__cause__ or error.__context__


def test_public_names():
    for name in ("cqil_backend", "make_backend", "CQILConfig"):
        assert name in cqil_fx.__all__ and hasattr(cqil_fx, name)


def test_graph_without_blocks_compiles_unchanged_with_one_log_line(caplog):
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 8))
    x = torch.randn(4, 8)
    with caplog.at_level(logging.INFO, logger="cqil_fx"):
        actual = torch.compile(mlp, backend=cqil_backend)(x)
    lines = [r.getMessage() for r in caplog.records if r.name.startswith("cqil_fx")]
    assert len(lines) == 1
    assert "unchanged: no decoder blocks found" in lines[0]
    torch._dynamo.reset()
    expected = torch.compile(mlp, backend="inductor")(x)
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)
    assert torch._dynamo.utils.counters["cqil"]["fallbacks"] == 1


def test_graph_break_inside_the_stack_falls_back(caplog):
    model, ids = tiny_model("llama"), tokens()
    layer = model.model.layers[3]
    handle = layer.register_forward_pre_hook(lambda *a: torch._dynamo.graph_break())
    try:
        backend = make_backend(start=2, end=6, inner="eager")
        with caplog.at_level(logging.INFO, logger="cqil_fx"):
            actual = torch.compile(model, backend=backend)(ids, use_cache=False).logits
        expected = model(ids, use_cache=False).logits
    finally:
        handle.remove()
    torch.testing.assert_close(actual, expected)
    # Dynamo compiles the pieces around the break separately; none holds a whole stack.
    assert len(backend.reports) >= 2 and all(r.fallback for r in backend.reports)
    lines = [r.getMessage() for r in caplog.records if r.name.startswith("cqil_fx")]
    assert len(lines) == len(backend.reports) and all("unchanged" in line for line in lines)


@pytest.mark.parametrize(
    ("family", "config", "error", "message"),
    [
        ("llama", CQILConfig(groups=[[6, 7, 8]], inner="eager"), CQILPlanError, "block index 8 is out of range"),
        ("phi", CQILConfig(start=2, end=6, bypass=1, inner="eager"), CQILPlanError, "parallel-residual"),
        ("gptj", CQILConfig(groups=[[0, 1, 2]], bypass=2, inner="eager"), CQILPlanError, "use bypass=0"),
    ],
)
def test_plan_errors_stay_visible_through_torch_compile(family, config, error, message):
    compiled = torch.compile(tiny_model(family), backend=make_backend(config))
    with pytest.raises(Exception) as info:
        compiled(tokens(), use_cache=False)
    ours = [e for e in exception_chain(info.value) if isinstance(e, error)]
    assert ours and message in str(ours[0])
    assert isinstance(info.value.inner_exception, error) and message in str(info.value)
    # The eager reference refuses the same plans with the same error.
    with pytest.raises(error, match=message):
        cqil_reference(tiny_model(family), config, tokens(), use_cache=False)


def test_registered_name_runs_the_measured_default_plan(small_self_text):
    assert torch._dynamo.lookup_backend("cqil") is cqil_backend
    model, ids = tiny_model("llama"), tokens()
    actual = torch.compile(model, backend="cqil")(ids, use_cache=False).logits
    report = cqil_backend.reports[-1]
    assert report.source == "searched" and report.mode == "concurrent"  # two threads on CPU
    expected = cqil_reference(model, report.plan, ids, use_cache=False).logits
    assert relative_error(actual, expected) <= 1e-4
    assert relative_error(expected, model(ids, use_cache=False).logits) > 1e-3


def test_a_default_config_has_no_fixed_plan():
    with pytest.raises(cqil_fx.CQILConfigError, match="measured at compile time"):
        CQILConfig().plan_for(8)


def test_mode_auto_and_local_run_the_local_rewrite():
    model, ids = tiny_model("gpt2"), tokens()
    for mode in ("auto", "local"):
        torch._dynamo.reset()
        config = CQILConfig(start=2, end=6, mode=mode, inner="eager")
        actual = torch.compile(model, backend=make_backend(config))(ids, use_cache=False).logits
        expected = cqil_reference(model, config, ids, use_cache=False).logits
        assert relative_error(actual, expected) <= 1e-4
