"""Property-based: any legal plan and bypass distance compiles to the reference's numbers."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cqil_fx import CQILConfig, cqil_reference, make_backend

from conftest import relative_error
from tiny_models import LAYERS, SEQUENTIAL, tiny_model, tokens


@st.composite
def plans(draw, sequential: bool):
    """A cover of the blocks by consecutive runs of 1..4 blocks, and a legal bypass."""
    groups, start = [], 0
    while start < LAYERS:
        size = draw(st.integers(1, min(4, LAYERS - start)))
        groups.append(list(range(start, start + size)))
        start += size
    largest = max(map(len, groups))
    bypass = draw(st.integers(0, largest - 1)) if sequential else 0
    return CQILConfig(groups=groups, bypass=bypass, inner="eager")


def check(family, config, batch, length):
    torch._dynamo.reset()
    model, ids = tiny_model(family), tokens(batch=batch, length=length)
    actual = torch.compile(model, backend=make_backend(config))(ids, use_cache=False).logits
    expected = cqil_reference(model, config, ids, use_cache=False).logits
    assert relative_error(actual, expected) <= 1e-4


PROPERTY_SETTINGS = settings(
    max_examples=8, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@pytest.mark.parametrize("family", [f for f in SEQUENTIAL if f in ("llama", "gemma2")])
@PROPERTY_SETTINGS
@given(config=plans(sequential=True), batch=st.integers(1, 3), length=st.integers(1, 16))
def test_sequential_family_any_plan(family, config, batch, length):
    check(family, config, batch, length)


@PROPERTY_SETTINGS
@given(config=plans(sequential=False), batch=st.integers(1, 3), length=st.integers(1, 16))
def test_parallel_family_any_plan(config, batch, length):
    check("gptj", config, batch, length)
