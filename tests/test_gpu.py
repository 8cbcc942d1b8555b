"""The same exactness checks on CUDA (skipped without a GPU): local and concurrent (streams),
float32 and bfloat16.  benchmarks/gpu_check.sh runs these on a GPU machine."""

import copy

import pytest
import torch

from cqil_fx import CQILConfig, cqil_reference, make_backend

from conftest import relative_error
from tiny_models import tiny_model, tokens

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

# Inductor's Triton kernels vs cuBLAS/eager: float32 matmuls may use TF32-free paths but
# fuse differently; bfloat16 keeps ~3 significant digits through 8 scaled-up blocks.
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 3e-2}


@pytest.mark.parametrize(
    ("family", "bypass", "mode", "dtype"),
    [("llama", 1, mode, dtype) for mode in ("local", "concurrent") for dtype in (torch.float32, torch.bfloat16)]
    + [("gpt2", 0, "concurrent", torch.float32), ("phi", 0, "concurrent", torch.bfloat16)],
)
def test_cuda_matches_reference(family, bypass, mode, dtype):
    torch.backends.cuda.matmul.allow_tf32 = False
    model = copy.deepcopy(tiny_model(family)).to("cuda", dtype)  # the cached CPU model stays as it is
    ids = tokens().cuda()
    config = CQILConfig(start=2, end=6, bypass=bypass, mode=mode)
    with torch.no_grad():
        actual = torch.compile(model, backend=make_backend(config))(ids, use_cache=False).logits
        expected = cqil_reference(model, config, ids, use_cache=False).logits
    assert relative_error(actual.float(), expected.float()) <= TOLERANCE[dtype]
