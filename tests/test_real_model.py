"""SmolLM2-135M on real text: Inductor-compiled CQIL logits equal the eager reference; the shipped
adapters reproduce their documented quality."""

import copy
import json
from pathlib import Path

import pytest
import torch

from cqil_fx import CQILConfig, Plan, cqil_reference, make_backend
from cqil_fx.eager.distill import load_recovered
from cqil_fx.eager.quality import measure_copying, perplexity
from cqil_fx.errors import RecoveredWeightsError
from cqil_fx.tools.models import token_batches

from conftest import relative_error


@pytest.mark.real_model
def test_smollm2_cqil_logits_equal_reference_on_real_text(smollm2):
    model, tokenizer = smollm2
    ids = token_batches(tokenizer, "evaluation", seq_len=300, num_batches=1)[0]
    config = CQILConfig(start=12, end=28, parallel=2, bypass=1)
    backend = make_backend(config)
    with torch.no_grad():
        actual = torch.compile(model, backend=backend)(ids, use_cache=False).logits
        expected = cqil_reference(model, config, ids, use_cache=False).logits
        original = model(ids, use_cache=False).logits
    report = backend.reports[-1]
    assert len(report.blocks) == 30 and len(report.rewrites) == 8 and report.bypass_edges == 8
    assert relative_error(actual, expected) <= 1e-4
    assert relative_error(expected, original) > 0.05  # 8 of 30 block-times saved is not free


SHIPPED = Path(__file__).resolve().parents[1] / "adapters" / "smollm2-135m-s12-e28-p2"


@pytest.mark.real_model
def test_shipped_adapters_reproduce_their_documented_perplexity(smollm2):
    """The adapters in the repository load onto SmolLM2 under their own plan only, and give the held-out
    (licence text) perplexity their recovery.json (and docs/notes/distillation.md) reports."""
    model, tokenizer = smollm2
    summary = json.loads((SHIPPED / "recovery.json").read_text())
    recovered = copy.deepcopy(model)
    plan = load_recovered(recovered, SHIPPED)
    assert plan == Plan.from_json(json.dumps(summary["plan"])) and plan.saved_blocks == 8
    held_out = token_batches(tokenizer, "licenses", 256, 24)
    assert perplexity(recovered, held_out, plan=plan) == pytest.approx(summary["perplexity"]["recovered"], rel=1e-4)
    # ... and copy as docs/results/quality.md (written by `cqil-fx eval --recovered` with them) reports
    rows = json.loads((SHIPPED.parents[1] / "docs" / "results" / "quality.json").read_text())["rows"]
    documented = next(r for r in rows if r["name"] == "recovered S12-E28 P2 D0")
    assert documented["perplexity"] == pytest.approx(summary["perplexity"]["recovered"], rel=1e-4)
    assert measure_copying(recovered, plan) == pytest.approx(documented["copying"], abs=1e-6)
    with pytest.raises(RecoveredWeightsError, match="recovers"):
        load_recovered(copy.deepcopy(model), SHIPPED, plan=CQILConfig(start=12, end=28, parallel=4))
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.model.layers[0].mlp.down_proj.weight[0, 0] += 1.0
    with pytest.raises(RecoveredWeightsError, match="another base model"):
        load_recovered(other, SHIPPED)


@pytest.mark.real_model
@pytest.mark.slow
def test_int8_smollm2_with_a_plan_equals_its_reference_on_the_quantized_model(smollm2):
    """torchao int8 weight-only SmolLM2 through Inductor in concurrent mode: the logits equal the plan's eager
    reference on the quantized model (the quantized model is its own reference)."""
    pytest.importorskip("torchao")
    from cqil_fx.tools.quant import quantize

    model, tokenizer = smollm2
    int8 = quantize(copy.deepcopy(model), "int8-weight-only")
    ids = token_batches(tokenizer, "evaluation", seq_len=64, num_batches=1)[0]
    config = CQILConfig(start=12, end=28, parallel=2, mode="concurrent")
    backend = make_backend(config)
    with torch.no_grad():
        actual = torch.compile(int8, backend=backend)(ids, use_cache=False).logits
        expected = cqil_reference(int8, config, ids, use_cache=False).logits
    assert backend.reports[-1].fallback is None and len(backend.reports[-1].rewrites) == 8
    assert relative_error(actual, expected) <= 1e-4
