"""mode="concurrent": segments on worker threads give the numbers of mode="local"."""

import subprocess
import sys
import textwrap
import threading

import pytest
import torch

from cqil_fx import CQILConfig, cqil_reference, make_backend
from cqil_fx.graph import executor
from cqil_fx.graph.executor import ConcurrentProgram
from cqil_fx.tools.inspect import capture_graph
from cqil_fx.passes import apply_plan
from cqil_fx.passes import find_blocks
from cqil_fx.passes.module_stack import layer_of
from cqil_fx.passes.segments import split_segments

from conftest import relative_error, setitem_graph
from test_omp_team import four_threads, openmp_region, team  # noqa: F401 - four_threads and team are fixtures
from tiny_models import tiny_model, tokens


def compiled(model, **fields):
    return torch.compile(model, backend=make_backend(CQILConfig(mode="concurrent", **fields)))


def layers_of(gm: torch.fx.GraphModule) -> frozenset[int]:
    """The decoder layers whose ops a segment holds."""
    return frozenset(layer_of(n).index for n in gm.graph.nodes if n.op == "call_function" and layer_of(n) is not None)


def is_member() -> bool:
    """Compiling a member segment: members get their thread count, shared segments Inductor's default (-1)."""
    return torch._inductor.config.cpp.threads >= 1


def spying_on_members(armed: list, spy):
    """An inner compiler (eager) whose member segments call ``spy(layers)`` before running, once ``armed[0]``."""

    def inner(gm, example_inputs):
        if not is_member():
            return gm.forward
        layers = layers_of(gm)

        def run(*args):
            if armed[0]:
                spy(layers)
            return gm.forward(*args)

        return run

    return inner


@pytest.fixture(params=["openmp-team", "member-teams", "thread-pool"])
def runner(request, monkeypatch):
    """Run a test with members on the OpenMP team (one thread each), as teams of two threads (four threads:
    a group of two gets 4 // 2 each, one of three still 1), and on the thread pool (no OpenMP runtime)."""
    if request.param == "thread-pool":
        monkeypatch.setattr(executor, "openmp_team", lambda: None)
    elif executor.openmp_team() is None:
        pytest.skip("no OpenMP runtime in this process")
    elif request.param == "member-teams":
        request.getfixturevalue("four_threads")
    return request.param


@pytest.mark.parametrize(
    ("family", "groups", "bypass"),
    [("llama", [[1, 2], [4, 5]], 0), ("llama", [[1, 2, 3], [5, 6]], 1), ("gemma2", [[2, 3, 4]], 2),
     ("gpt2", [[0, 1], [2, 3], [6, 7]], 1), ("phi", [[1, 2, 3], [4, 5]], 0), ("qwen2", [[3, 4, 5]], 0)],
)
def test_concurrent_equals_local_and_reference(family, groups, bypass, runner):
    model, ids = tiny_model(family), tokens(batch=3, length=10)
    config = CQILConfig(groups=groups, bypass=bypass, inner="eager")
    actual = compiled(model, groups=groups, bypass=bypass, inner="eager")(ids, use_cache=False).logits
    torch._dynamo.reset()
    local = torch.compile(model, backend=make_backend(config, mode="local"))(ids, use_cache=False).logits
    torch.testing.assert_close(actual, local, rtol=0, atol=0)
    expected = cqil_reference(model, config, ids, use_cache=False).logits
    assert relative_error(actual, expected) <= 1e-4


def test_concurrent_with_inductor():
    model, ids = tiny_model("mistral"), tokens()
    actual = compiled(model, start=2, end=6, bypass=1)(ids, use_cache=False).logits
    expected = cqil_reference(model, CQILConfig(start=2, end=6, bypass=1), ids, use_cache=False).logits
    assert relative_error(actual, expected) <= 1e-4
    # shared before and after (the first group's sum is folded into the second group) + members x phases
    assert torch._dynamo.utils.counters["cqil"]["segments"] == 2 + 2 * 2 * 2


def fx_graph_cache(*events: str) -> tuple[int, ...]:
    """Inductor's FX graph cache counters, read afresh: Inductor's pattern-matcher set-up (run again after
    ``fresh_cache`` clears its caches) puts a new ``counters["inductor"]`` in place, so a held one goes stale."""
    return tuple(torch._dynamo.utils.counters["inductor"][f"fxgraph_cache_{event}"] for event in events)


def test_segments_use_inductors_caches():
    """Every segment goes through Inductor's FX graph cache: members of one shape compile once, and a
    second compile of the same model (a second process, after a reset) compiles nothing."""
    from torch._inductor.utils import fresh_cache

    model, ids = tiny_model("llama"), tokens()
    expected = cqil_reference(model, CQILConfig(groups=[[2, 3]]), ids, use_cache=False).logits
    with fresh_cache():
        first = compiled(model, groups=[[2, 3]])(ids, use_cache=False).logits
        # shared, member 2, member 3 (the same graph as member 2: a hit), shared
        assert fx_graph_cache("bypass", "miss", "hit") == (0, 3, 1)
        torch._dynamo.reset()
        torch._dynamo.utils.counters["inductor"].clear()
        second = compiled(model, groups=[[2, 3]])(ids, use_cache=False).logits
        assert fx_graph_cache("miss", "hit") == (0, 4)
    assert relative_error(first, expected) <= 1e-4
    torch.testing.assert_close(second, first, rtol=0, atol=0)


def static_shape_recorder(seen: list):
    """An inner compiler (AOTAutograd, eager kernels) that records the value of every placeholder of the
    graphs it is handed after AOTAutograd has made its inputs fake: what Inductor would generate code for."""
    from torch._dynamo.backends.common import aot_autograd

    def record(gm, example_inputs):
        seen.extend(n.meta["val"] for n in gm.graph.nodes if n.op == "placeholder")
        return gm.forward

    return aot_autograd(fw_compiler=record)


def test_segments_are_compiled_for_the_static_shapes_of_their_inputs():
    """A concurrent program runs static graphs only; its segments, weights included, must not be compiled
    over symbolic sizes (AOTAutograd gives a real input's sizes symbols of the context's shape env)."""
    model, ids = tiny_model("llama"), tokens()
    seen = []
    actual = compiled(model, groups=[[2, 3]], inner=static_shape_recorder(seen))(ids, use_cache=False).logits
    expected = cqil_reference(model, CQILConfig(groups=[[2, 3]]), ids, use_cache=False).logits
    assert relative_error(actual, expected) <= 1e-4
    tensors = [v for v in seen if isinstance(v, torch.Tensor)]
    assert len(tensors) > 20  # the weights of 8 blocks, the activations
    symbolic = [tuple(v.shape) for v in tensors if not all(isinstance(d, int) for d in v.shape)]
    assert not symbolic, f"segments compiled over symbolic sizes: {symbolic[:5]}"


@pytest.mark.parametrize("bypass", [0, 1])
def test_segments_hold_one_member_each(bypass):
    model, ids = tiny_model("llama"), tokens()
    gm = capture_graph(model, ids, use_cache=False)
    blocks = find_blocks(gm)
    plan = CQILConfig(groups=[[2, 3, 4]], bypass=bypass).plan_for(len(blocks))
    split = split_segments(apply_plan(gm, blocks, plan))
    members = [s for s in split.segments.values() if not s.shared]
    assert len(members) == 3 * (2 if bypass else 1)
    assert sum(s.shared for s in split.segments.values()) == 2
    for name, segment in split.segments.items():
        layers = layers_of(split.module.get_submodule(name))
        if not segment.shared:
            assert layers == {2 + segment.member}
    program = ConcurrentProgram(split)
    assert [len(step) for step in program.steps] == ([1, 3, 3, 1] if bypass else [1, 3, 1])


@pytest.mark.parametrize("bypass", [0, 1])
def test_a_sum_between_two_groups_is_folded_into_the_second(bypass):
    """[[1, 2], [3, 4]]: no shared segment between the groups; the members of both run as one run of steps."""
    model, ids = tiny_model("llama"), tokens()
    gm = capture_graph(model, ids, use_cache=False)
    blocks = find_blocks(gm)
    split = split_segments(apply_plan(gm, blocks, CQILConfig(groups=[[1, 2], [3, 4]], bypass=bypass).plan_for(len(blocks))))
    program = ConcurrentProgram(split)
    phases = 2 if bypass else 1
    assert [len(step) for step in program.steps] == [1] + [2] * 2 * phases + [1]
    first, steps, last = program.runs
    assert first.segment.shared and last.segment.shared and len(steps) == 2 * phases
    deltas = {call.node for call in steps[phases - 1]}  # the first group's last phase
    for call in steps[phases]:  # each member of the second group reads both deltas and makes the sum itself
        sources = {a.args[0] if a.op == "call_function" else a for a in call.node.all_input_nodes}
        assert deltas <= sources
        assert layers_of(split.module.get_submodule(call.node.target)) == {2, 3 + call.segment.member}


def test_a_low_rank_correction_runs_in_each_members_segment_and_the_sum_still_folds():
    """Member k's term (d_k * s_k + (d_k @ D_k) @ U) is made of the member's own nodes: its two matmuls
    run in its segment, beside the member's block, not in a shared segment after the group."""
    from cqil_fx.eager.correction import fit_corrections

    model, ids = tiny_model("llama"), tokens()
    gm = capture_graph(model, ids, use_cache=False)
    blocks = find_blocks(gm)
    plan = CQILConfig(groups=[[1, 2], [3, 4]]).plan_for(len(blocks))
    plan = fit_corrections(model, plan, [tokens(seed=s) for s in range(2)], low_rank=4)
    split = split_segments(apply_plan(gm, blocks, plan))
    for name, segment in split.segments.items():
        matmuls = [n for n in split.module.get_submodule(name).graph.nodes if n.target is torch.matmul]
        assert len(matmuls) == (0 if segment.shared else 2), name
    assert [len(step) for step in ConcurrentProgram(split).steps] == [1, 2, 2, 1]


@pytest.mark.parametrize("failing_layer", [2, 3, 5])
def test_member_exception_reaches_the_caller_and_the_executor_survives(failing_layer, runner):
    """Two consecutive groups run as one run of steps.  An error in a member of either step, on the
    calling thread or another, reaches the caller once its step is over; no later step starts."""
    failing = [False]
    ran = []

    def inner(gm, example_inputs):
        member = is_member()
        layer = max(layers_of(gm))  # a member of the second group also holds the first group's sum

        def run(*args):
            ran.append(layer)
            if member and failing[0] and layer == failing_layer:
                raise ValueError(f"layer {failing_layer} failed")
            return gm.forward(*args)

        return run

    model, ids = tiny_model("gpt2"), tokens()
    fast = compiled(model, groups=[[2, 3], [4, 5]], inner=inner)
    first = fast(ids, use_cache=False).logits
    failing[0] = True
    ran.clear()
    with pytest.raises(ValueError, match=f"layer {failing_layer} failed"):
        fast(ids, use_cache=False)
    step = {2, 3} if failing_layer < 4 else {4, 5}
    assert step <= set(ran)  # the other member of the step still ran to its end
    assert not {4, 5} & set(ran) or failing_layer > 3  # an error in the first step: the second never started
    failing[0] = False
    # float32's default tolerance, not bit equality: MKL's GEMM may round differently from one call to the
    # next (its results depend on the buffers' alignment unless MKL_CBWR fixes a code path); once in a full
    # run of the suite the thread-pool runner's logits differed by 1e-6 from the first call's
    torch.testing.assert_close(fast(ids, use_cache=False).logits, first)


def test_members_run_at_the_same_time_on_distinct_threads(runner):
    """Each member waits at a barrier for the other: this only returns if both run at once."""
    barrier = threading.Barrier(2, timeout=30)
    threads, armed = {}, [False]  # compiling runs each segment once, alone: no barrier then

    def meet(layers):
        threads[layers] = (threading.get_ident(), torch.is_grad_enabled())
        barrier.wait()

    inner = spying_on_members(armed, meet)
    model, ids = tiny_model("llama"), tokens()
    fast = compiled(model, groups=[[2, 3]], inner=inner)
    with torch.no_grad():  # grad mode is guarded: compile under the mode of the measured call
        fast(ids, use_cache=False)
        armed[0] = True
        actual = fast(ids, use_cache=False).logits
    (first, grad_first), (second, grad_second) = threads.values()
    assert first != second and not grad_first and not grad_second  # the caller's no_grad reached both
    expected = cqil_reference(model, CQILConfig(groups=[[2, 3]]), ids, use_cache=False).logits
    assert relative_error(actual, expected) <= 1e-4


def test_segments_are_compiled_with_the_cpp_wrapper_members_single_threaded():
    """segment_settings on CPU: every segment one C++ call that releases the GIL (the wrapper built apart from
    the kernels, at a lower optimisation level); members on one OpenMP thread."""
    seen = []

    def inner(gm, example_inputs):
        config = torch._inductor.config
        seen.append((config.cpp.threads, config.cpp_wrapper and config.cpp_wrapper_build_separate))
        return gm.forward

    model, ids = tiny_model("qwen2"), tokens()
    compiled(model, groups=[[1, 2, 3]], inner=inner)(ids, use_cache=False)
    threads = torch._inductor.config.cpp.threads
    assert seen == [(threads, True), (1, True), (1, True), (1, True), (threads, True)]
    assert not torch._inductor.config.cpp_wrapper  # patched only while compiling
    assert not torch._inductor.config.cpp_wrapper_build_separate


@pytest.mark.parametrize("threads", [2, 4, 16])
def test_members_of_a_group_of_p_get_threads_over_p(threads):
    """member_threads: T // P, at least 1, from the calling thread's count at compile time; one thread where
    there is no OpenMP runtime and on other devices. Sixteen threads and P = 2: eight each."""
    if executor.openmp_team() is None:
        pytest.skip("no OpenMP runtime in this process")
    before = torch.get_num_threads()
    torch.set_num_threads(threads)  # a count only: no region is opened here
    try:
        assert [executor.member_threads(p, "cpu") for p in (2, 3, 4)] == [max(1, threads // p) for p in (2, 3, 4)]
        assert executor.member_threads(2, "cuda") == 1
    finally:
        torch.set_num_threads(before)


def test_each_member_segment_is_compiled_for_its_share_of_the_threads(four_threads):
    """Four threads, groups of two and three: shared segments with Inductor's default (all threads), members
    of the group of two with cpp.threads = 2, of the group of three with 1 (4 // 3)."""
    seen = []

    def inner(gm, example_inputs):
        seen.append((sorted(layers_of(gm)), torch._inductor.config.cpp.threads, torch._inductor.config.cpp_wrapper))
        return gm.forward

    model, ids = tiny_model("llama"), tokens()
    compiled(model, groups=[[1, 2], [4, 5, 6]], inner=inner)(ids, use_cache=False)
    default = torch._inductor.config.cpp.threads
    assert [threads for _, threads, _ in seen] == [default, 2, 2, default, 1, 1, 1, default]
    assert [layers for layers, threads, _ in seen if threads != default] == [[1], [2], [4], [5], [6]]
    assert all(wrapper for *_, wrapper in seen)


@pytest.mark.parametrize("threads", [2, 4])
def test_members_open_regions_of_their_share_of_the_threads(team, threads):
    """Inside a member, what a parallel region opened there gets (what ATen's ops and Inductor's kernels get).
    Two threads, P = 2: today's members, one thread each, inside the team's region (a region opened there
    has one thread). Four threads: each member outside any region, its regions two threads wide, the same
    two threads at every call; the caller keeps its four."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    seen, armed = {}, [False]

    inner = spying_on_members(armed, lambda layers: seen.setdefault(layers, []).append(openmp_region(team)))
    try:
        model, ids = tiny_model("llama"), tokens()
        fast = compiled(model, groups=[[2, 3]], inner=inner)
        fast(ids, use_cache=False)
        armed[0] = True
        fast(ids, use_cache=False)
        fast(ids, use_cache=False)
        assert torch.get_num_threads() == threads
    finally:
        torch.set_num_threads(before)
    assert len(seen) == 2
    for first, second in seen.values():
        if threads == 2:
            assert first["in_parallel"] and first["threads"] == 1
        else:
            assert not first["in_parallel"] and first["threads"] == first["torch_threads"] == 2
            assert second == first  # a pool kept for the member's thread: no threads created per region
    if threads == 4:
        (first, _), (second, _) = seen.values()
        assert not first["ids"] & second["ids"]  # two teams of their own


def test_members_of_two_threads_with_inductor(four_threads):
    """Inductor kernels compiled for two threads, run by members of two threads (with the C++ wrapper)."""
    model, ids = tiny_model("mistral"), tokens()
    actual = compiled(model, groups=[[2, 3]])(ids, use_cache=False).logits
    expected = cqil_reference(model, CQILConfig(groups=[[2, 3]]), ids, use_cache=False).logits
    assert relative_error(actual, expected) <= 1e-4
    assert torch._dynamo.utils.counters["cqil"]["cpp_wrapper_fallbacks"] == 0


def test_segment_that_fails_with_the_cpp_wrapper_is_compiled_without_it(caplog):
    def inner(gm, example_inputs):
        if torch._inductor.config.cpp_wrapper and torch._inductor.config.cpp.threads == 1:
            raise RuntimeError("no cpp_wrapper for you")
        return gm.forward

    model, ids = tiny_model("llama"), tokens()
    with caplog.at_level("WARNING", logger="cqil_fx.graph.executor"):
        actual = compiled(model, groups=[[2, 3]], inner=inner)(ids, use_cache=False).logits
    expected = cqil_reference(model, CQILConfig(groups=[[2, 3]]), ids, use_cache=False).logits
    assert relative_error(actual, expected) <= 1e-4
    assert torch._dynamo.utils.counters["cqil"]["cpp_wrapper_fallbacks"] == 2
    assert caplog.text.count("failed with Inductor's cpp_wrapper (RuntimeError: no cpp_wrapper for you)") == 2


@pytest.mark.parametrize("inner", ["eager", "inductor"])
def test_repeated_calls_and_lengths(inner):
    """The first length compiles static segments; later lengths make Dynamo go dynamic,
    and a dynamic graph runs in local mode (segments are compiled for concrete sizes)."""
    model = tiny_model("llama")
    config = CQILConfig(start=2, end=6, bypass=1)
    fast = compiled(model, start=2, end=6, bypass=1, inner=inner)
    for n in (4, 9, 9, 13, 4):
        ids = tokens(batch=2, length=n, seed=n)
        expected = cqil_reference(model, config, ids, use_cache=False).logits
        assert relative_error(fast(ids, use_cache=False).logits, expected) <= 1e-4
    counters = torch._dynamo.utils.counters["cqil"]
    assert counters["graphs"] == 2 and counters["concurrent_fallbacks"] == 1


def test_cuda_graphs_on_cpu_runs_the_plain_program(caplog):
    """cuda_graphs=True is for CUDA inputs; on CPU the program runs as usual, with one INFO line."""
    model, ids = tiny_model("llama"), tokens()
    with caplog.at_level("INFO", logger="cqil_fx.graph"):
        actual = compiled(model, start=2, end=6, inner="eager", cuda_graphs=True)(ids, use_cache=False).logits
    expected = cqil_reference(model, CQILConfig(start=2, end=6), ids, use_cache=False).logits
    assert relative_error(actual, expected) <= 1e-4
    assert "cuda_graphs=True but the graph's inputs are not on a CUDA device" in caplog.text
    assert torch._dynamo.utils.counters["cqil"]["cuda_graph_captures"] == 0


def test_process_exits_cleanly_after_concurrent_runs(tmp_path):
    script = textwrap.dedent("""
        import sys, torch
        sys.path.insert(0, %r)
        from tiny_models import tiny_model, tokens
        from cqil_fx import make_backend
        model = tiny_model("llama")
        fast = torch.compile(model, backend=make_backend(start=2, end=6, mode="concurrent", inner="eager"))
        fast(tokens(), use_cache=False)
        print("done")
    """ % str(__import__("pathlib").Path(__file__).parent))
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().endswith("done")


def test_has_inplace_ops():
    from cqil_fx.passes import has_inplace_ops

    def writes(x, cache):
        cache.index_copy_(0, torch.tensor([0]), x)
        return x * 2

    def pure(x, cache):
        return torch.add(x, cache)

    assert has_inplace_ops(torch.fx.symbolic_trace(writes))
    assert not has_inplace_ops(torch.fx.symbolic_trace(pure))
    aten = torch.fx.Graph()
    a = aten.placeholder("a")
    aten.output(aten.call_function(torch.ops.aten.add_.Tensor, (a, a)))
    assert has_inplace_ops(torch.fx.GraphModule(torch.nn.Module(), aten))


def test_setitem_counts_as_in_place_so_a_cuda_graph_copies_the_input_back():
    """``t[i] = v`` writes ``t``: the one in-place rule (cqil_fx.passes.mutation) says so, and the
    backend hands that answer to CudaGraphProgram, which copies dynamic inputs back after a replay."""
    from cqil_fx.passes import has_inplace_ops, mutates_in_place

    gm = setitem_graph()
    (setitem,) = [n for n in gm.graph.nodes if n.op == "call_function" and "setitem" in str(n.target)]
    assert mutates_in_place(setitem) and has_inplace_ops(gm)
    assert not any(mutates_in_place(n) for n in gm.graph.nodes if n is not setitem)
