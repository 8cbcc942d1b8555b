"""The same exactness checks on CUDA (skipped without a GPU): local and concurrent (streams),
float32 and bfloat16, and the CUDA-graph replay of concurrent mode.  benchmarks/gpu_check.sh runs these
on a GPU machine."""

import copy

import pytest
import torch
from torch._dynamo.utils import counters

from cqil_fx import CQILConfig, cqil_reference, make_backend
from cqil_fx.tools.generation import compiled_twin
from cqil_fx.eager.reference import cqil_semantics

from conftest import relative_error, setitem_graph
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


@pytest.mark.parametrize(("family", "bypass"), [("llama", 1), ("gpt2", 0)])
def test_cuda_graph_replays_match_reference(family, bypass):
    """cuda_graphs=True: call 1 warms up, call 2 captures, later calls replay on new inputs."""
    torch.backends.cuda.matmul.allow_tf32 = False
    model = copy.deepcopy(tiny_model(family)).to("cuda")
    config = CQILConfig(start=2, end=6, bypass=bypass, mode="concurrent", cuda_graphs=True)
    compiled = torch.compile(model, backend=make_backend(config), dynamic=False)
    counters.clear()
    outputs = []
    with torch.no_grad():
        for seed in range(4):
            ids = tokens(seed=seed).cuda()
            outputs.append((compiled(ids, use_cache=False).logits, ids))
        for actual, ids in outputs:  # earlier outputs are not overwritten by later replays
            expected = cqil_reference(model, config, ids, use_cache=False).logits
            assert relative_error(actual, expected) <= TOLERANCE[torch.float32]
    assert counters["cqil"]["cuda_graph_captures"] == 1


def test_cuda_graph_replays_after_cublas_workspaces_are_cleared():
    """Inductor's CUDA graph trees clear cuBLAS's workspaces around each recording and torch frees a
    stream's workspaces when a graph captured on it dies (pytorch/pytorch#193402): our graph must not
    depend on them. Captured, then the workspaces cleared, the cache emptied and refilled with NaN,
    a replay still equals the reference."""
    torch.backends.cuda.matmul.allow_tf32 = False
    model = copy.deepcopy(tiny_model("llama")).to("cuda")
    config = CQILConfig(start=2, end=6, parallel=4, mode="concurrent", cuda_graphs=True)
    compiled = torch.compile(model, backend=make_backend(config), dynamic=False)
    counters.clear()
    with torch.no_grad():
        for seed in range(2):  # warm-up, capture
            compiled(tokens(seed=seed).cuda(), use_cache=False)
        torch._C._cuda_clearCublasWorkspaces()
        torch.cuda.empty_cache()
        filler = torch.full((64, 1 << 20), float("nan"), device="cuda")  # takes what was freed
        ids = tokens(seed=5).cuda()
        actual = compiled(ids, use_cache=False).logits
        torch.cuda.synchronize()
        del filler
        expected = cqil_reference(model, config, ids, use_cache=False).logits
    assert relative_error(actual, expected) <= TOLERANCE[torch.float32]
    assert counters["cqil"]["cuda_graph_captures"] == 1


def test_cuda_graph_static_cache_generate():
    """Decode steps replay one graph that writes the static KV cache in place; tokens equal the reference's."""
    torch.backends.cuda.matmul.allow_tf32 = False
    model = copy.deepcopy(tiny_model("llama")).to("cuda")
    config = CQILConfig(start=2, end=6, mode="concurrent", cuda_graphs=True)
    twin = compiled_twin(model, make_backend(config), dynamic=False)
    ids = tokens(batch=1).cuda()
    settings = dict(attention_mask=torch.ones_like(ids), max_new_tokens=8, min_new_tokens=8, do_sample=False,
                    cache_implementation="static", pad_token_id=0)
    counters.clear()
    with torch.no_grad():
        actual = twin.generate(ids, **settings)
        with cqil_semantics(model, config):
            expected = model.generate(ids, **settings)
    assert torch.equal(actual, expected)
    assert counters["cqil"]["cuda_graph_captures"] >= 1


def test_cuda_graph_copies_a_setitem_write_back_into_the_callers_tensor():
    """A graph that writes an input with ``t[i] = v`` (operator.setitem) must copy it back after a replay."""
    from cqil_fx.graph.executor import CudaGraphProgram
    from cqil_fx.passes import has_inplace_ops

    gm = setitem_graph()
    program = CudaGraphProgram(gm, pinned=[], mutates_inputs=has_inplace_ops(gm))
    assert program.mutates_inputs
    for step in range(4):  # warm-up, capture, replays; every call gets fresh tensors at new addresses
        x = torch.full((3,), float(step), device="cuda")
        cache = torch.zeros(2, 3, device="cuda")
        out = program(x, cache)
        torch.cuda.synchronize()
        assert torch.equal(out, x * 2)
        assert torch.equal(cache[0], x), step  # the caller sees the write, replayed or not
