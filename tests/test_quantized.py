"""Quantized weights (torchao tensor subclasses) through every path: given and default plans, local and
concurrent modes, corrections, the plan cache; SPMD in tests/test_spmd.py. Skipped without torchao.

Most cases compile with ``inner="aot_eager"`` (AOTAutograd traces the
subclasses' dispatch, the kernels stay eager's): the rewrite is under test,
held to the same 1e-4 as float weights. Weight-only int8 also compiles through
Inductor to what its own eager run computes (one case per mode here; the
real model in tests/test_real_model.py). int4 and dynamic int8 round
differently in Inductor's kernels than in eager (about 1e-2 between plain
compiled and eager on these models): that noise is the quantization's.
"""

from __future__ import annotations

import copy
import logging

import pytest
import torch

pytest.importorskip("torchao")

import cqil_fx  # noqa: E402
from cqil_fx import CQILConfig, cqil_reference, make_backend  # noqa: E402
from cqil_fx.eager.correction import fit_corrections  # noqa: E402
from cqil_fx.fingerprint import is_quantized, weights_fingerprint  # noqa: E402
from cqil_fx.stack import decoder_layers  # noqa: E402
from cqil_fx.tools.quant import QUANTIZATIONS, quantize  # noqa: E402

from conftest import relative_error  # noqa: E402
from tiny_models import tiny_model, tokens  # noqa: E402

TOLERANCE = 1e-4
FAMILIES = ("llama", "qwen2", "phi")


def quantized(family: str, name: str = "int8-weight-only", seed: int = 0) -> torch.nn.Module:
    model = copy.deepcopy(tiny_model(family, seed))
    if name == "int4-weight-only":
        model = model.to(torch.bfloat16)  # torchao's CPU int4 kernel reads bf16 activations
    quantize(model, name)
    assert is_quantized(decoder_layers(model)[0].mlp.fc1.weight if family == "phi"
                        else decoder_layers(model)[0].mlp.up_proj.weight)
    return model


def compiled_logits(model, backend, ids):
    return torch.compile(model, backend=backend)(ids, use_cache=False).logits.float()


# Every quantization in local mode; concurrent mode (segments compiled alone) with the one that is exact
# through Inductor too.
CASES = [(f, name, "local") for f in FAMILIES for name in QUANTIZATIONS] + [(f, "int8-weight-only", "concurrent")
                                                                           for f in FAMILIES]


@pytest.mark.parametrize(("family", "name", "mode"), CASES, ids=lambda v: str(v))
def test_a_given_plan_on_quantized_weights_equals_the_quantized_reference(family, name, mode):
    model, ids = quantized(family, name), tokens()
    config = CQILConfig(start=2, end=6, bypass=1 if family != "phi" and name == "int8-weight-only" else 0, mode=mode)
    backend = make_backend(config, inner="aot_eager")
    actual = compiled_logits(model, backend, ids)
    expected = cqil_reference(model, config, ids, use_cache=False).logits.float()
    assert backend.reports[-1].fallback is None and backend.reports[-1].mode == mode
    assert relative_error(actual, expected) < TOLERANCE
    assert relative_error(expected, model(ids, use_cache=False).logits.float()) > 0.05  # the plan changed it


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["local", "concurrent"])
def test_int8_weights_through_inductor_equal_the_quantized_reference(mode):
    model, ids = quantized("llama"), tokens()
    config = CQILConfig(start=2, end=6, bypass=1, mode=mode)
    actual = compiled_logits(model, make_backend(config), ids)
    assert relative_error(actual, cqil_reference(model, config, ids, use_cache=False).logits) < TOLERANCE


def test_int8_weights_reach_concurrent_segments_with_static_shapes():
    """The inner tensors of a quantized weight are compiled for their own sizes, not over symbols (the
    int8 data's conversion to float ran in kernels over symbolic sizes)."""
    from test_concurrent import static_shape_recorder

    model, ids = quantized("llama"), tokens()
    seen = []
    config = CQILConfig(groups=[[2, 3]], mode="concurrent")
    actual = compiled_logits(model, make_backend(config, inner=static_shape_recorder(seen)), ids)
    assert relative_error(actual, cqil_reference(model, config, ids, use_cache=False).logits) < TOLERANCE
    int8 = [v for v in seen if isinstance(v, torch.Tensor) and v.dtype == torch.int8]
    assert len(int8) >= 7 * 8  # every linear of every block, unwrapped to its int8 data
    assert all(isinstance(d, int) for v in seen if isinstance(v, torch.Tensor) for d in v.shape)


@pytest.mark.slow
def test_bf16_int8_weights_keep_inductors_int8_kernel_in_concurrent_segments():
    """With bf16 activations, Inductor replaces an int8 weight-only linear (convert the weight, ``mm``,
    scale) by one int8 kernel (``aten._weight_int8pack_mm``, counted as ``woq_matcher_count``) instead of
    converting every weight to a fresh bf16 buffer per call. Segments compiled alone must keep it: every
    linear of every segment matched, as in a plain compile of the whole model."""
    from torch._inductor.utils import fresh_cache

    model = quantize(copy.deepcopy(tiny_model("llama")).to(torch.bfloat16), "int8-weight-only")
    ids, config = tokens(), CQILConfig(groups=[[2, 3]], mode="concurrent")
    linears = 8 * 7 + 1  # 8 blocks of 7, the LM head
    with fresh_cache():
        plain = compiled_logits(model, "inductor", ids)
        assert torch._dynamo.utils.counters["inductor"]["woq_matcher_count"] == linears
        torch._dynamo.reset()
        torch._dynamo.utils.counters["inductor"].clear()
        backend = make_backend(config)
        actual = compiled_logits(model, backend, ids)
        # member 3's segment is member 2's graph and may come from Inductor's cache
        assert torch._dynamo.utils.counters["inductor"]["woq_matcher_count"] >= linears - 7
    assert backend.reports[-1].mode == "concurrent" and backend.reports[-1].fallback is None
    # bf16 rounds differently in Inductor's kernels than in eager: plain compile against eager is ~2e-2 here;
    # a wrong rewrite is off by the plan's own change (~0.5)
    eager = model(ids, use_cache=False).logits.float()
    expected = cqil_reference(model, config, ids, use_cache=False).logits.float()
    assert relative_error(actual, expected) < max(0.05, 2 * relative_error(plain, eager))
    assert relative_error(expected, eager) > 0.2


@pytest.mark.parametrize("family", FAMILIES)
def test_a_corrected_plan_on_quantized_weights_equals_its_reference(family):
    model, ids = quantized(family), tokens()
    plan = fit_corrections(model, CQILConfig(start=2, end=6).plan_for(8), [tokens(2, 16, seed=s) for s in (3, 4)],
                           low_rank=2)
    backend = make_backend(plan, mode="concurrent", inner="aot_eager")
    actual = compiled_logits(model, backend, ids)
    expected = cqil_reference(model, CQILConfig(plan=plan), ids, use_cache=False).logits
    assert relative_error(actual, expected) < TOLERANCE
    uncorrected = cqil_reference(model, CQILConfig(plan=plan.without_corrections()), ids, use_cache=False).logits
    assert relative_error(expected, uncorrected) > 1e-3


@pytest.mark.parametrize("family", ["llama", "phi"])  # a sequential and a parallel-residual family
def test_the_default_backend_on_quantized_weights_plans_and_equals_the_reference(family, small_self_text, caplog):
    """backend="cqil" with no arguments on an int8 model: searched once (the model found on the stack),
    cached under the quantized weights' fingerprint, found again by a second compile."""
    model, ids = quantized(family), tokens()
    backend = make_backend(budget=0.5, inner="aot_eager")
    with caplog.at_level(logging.INFO, logger="cqil_fx"):
        actual = compiled_logits(model, backend, ids)
    report = backend.reports[-1]
    assert report.fallback is None and report.source == "searched", report
    expected = cqil_reference(model, CQILConfig(plan=report.plan), ids, use_cache=False).logits
    assert relative_error(actual, expected) < TOLERANCE
    torch._dynamo.reset()
    again = make_backend(budget=0.5, inner="aot_eager")
    compiled_logits(model, again, ids)
    assert again.reports[-1].source == "cached" and again.reports[-1].plan == report.plan


def test_the_explicit_plan_step_on_quantized_weights_is_what_the_backend_uses(small_self_text):
    model, ids = quantized("llama"), tokens()
    plan = cqil_fx.plan(model, budget=0.5, progress=False)
    assert plan.groups
    backend = make_backend(inner="aot_eager")  # no plan fields: what backend="cqil" does
    actual = compiled_logits(model, backend, ids)
    report = backend.reports[-1]
    assert (report.source, report.plan) == ("chosen", plan)
    assert relative_error(actual, cqil_reference(model, CQILConfig(plan=plan), ids, use_cache=False).logits) < TOLERANCE


@pytest.mark.parametrize("name", QUANTIZATIONS)
def test_quantized_weights_have_a_fingerprint_of_their_own(name):
    def fingerprint(model):
        return weights_fingerprint([list(layer.parameters()) for layer in decoder_layers(model)])

    a, b = quantized("llama", name), quantized("llama", name)
    assert fingerprint(a) == fingerprint(b) is not None
    assert fingerprint(quantized("llama", name, seed=1)) != fingerprint(a)  # other weights
    assert fingerprint(a) != fingerprint(tiny_model("llama"))  # the float weights they came from


def test_a_weight_the_fingerprint_cannot_read_means_a_search_without_the_cache(small_self_text, caplog,
                                                                              monkeypatch):
    """A weight whose values cannot be read gives no cache key: the default plan is searched with one log
    line saying so, the compile goes on, and the next compile searches again instead of reading a cache."""
    from cqil_fx import fingerprint

    model, ids = quantized("llama"), tokens()
    meta = copy.copy(decoder_layers(model)[3].mlp.down_proj.weight)
    meta.qdata = torch.empty_like(meta.qdata, device="meta")
    assert fingerprint.weights_fingerprint([[meta]]) is None  # a component on the meta device cannot be read
    real = fingerprint.tensor_digest

    def unreadable_int8(t):  # every Int8Tensor unreadable, as a subclass of unknown layout would be
        if type(t).__name__ == "Int8Tensor":
            raise fingerprint.UnreadableWeight(type(t).__name__)
        return real(t)

    monkeypatch.setattr(fingerprint, "tensor_digest", unreadable_int8)
    sources = []
    for _ in range(2):
        torch._dynamo.reset()
        backend = make_backend(budget=0.5, inner="aot_eager")
        with caplog.at_level(logging.INFO, logger="cqil_fx"):
            actual = compiled_logits(model, backend, ids)
        sources.append(backend.reports[-1].source)
        plan = backend.reports[-1].plan
        assert relative_error(actual, cqil_reference(model, CQILConfig(plan=plan), ids, use_cache=False).logits) < TOLERANCE
    assert sources == ["searched", "searched"]
    assert "cannot be fingerprinted" in caplog.text
