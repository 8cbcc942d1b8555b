"""SmolLM2-135M on real text: Inductor-compiled CQIL logits equal the eager reference."""

import pytest
import torch

from cqil_fx import CQILConfig, cqil_reference, make_backend
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
