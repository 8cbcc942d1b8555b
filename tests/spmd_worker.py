"""What each rank of the SPMD tests runs; tests/test_spmd.py starts the processes.

Every scenario is a function ``(rank, world_size) -> dict`` run inside an
initialised gloo process group; the dict (or the exception it raised) is
written to ``<dir>/rank<r>.pt`` for the test to assert on.
"""

from __future__ import annotations

import copy
import os
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parent))

from tiny_models import tiny_model, tokens  # noqa: E402

from cqil_fx import CQILConfig, cqil_reference, make_backend  # noqa: E402
from cqil_fx.eager.correction import fit_corrections  # noqa: E402
from cqil_fx.graph.distributed import parameter_bytes, release_other_members  # noqa: E402
from cqil_fx.passes import layer_of  # noqa: E402

# (family, bypass D, inner compiler, transport)
EXACTNESS_CASES = [("llama", 1, "inductor", "auto"), ("gemma2", 1, "aot_eager", "process_group"),
                   ("gpt2", 0, "aot_eager", "shared_memory"), ("phi", 0, "aot_eager", "process_group")]
SPAN = dict(start=2, end=6, parallel=2)


def recording(inner: str, graphs: list):
    """An inner compiler that keeps the graph it is handed (the rank's placed graph)."""
    compile_inner = torch._dynamo.lookup_backend(inner)

    def compile_(gm, example_inputs):
        graphs.append(gm)
        return compile_inner(gm, example_inputs)

    return compile_


def collectives(gm) -> dict[str, int]:
    """Collectives in a placed graph, whichever transport carries them."""
    names = [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]
    kinds = dict(all_reduce=("_c10d_functional.all_reduce.", "cqil.shm_all_reduce.", "cqil.pg_all_reduce."),
                 all_gather=("_c10d_functional.all_gather_into_tensor.", "cqil.shm_all_gather.", "cqil.pg_all_gather.",
                             "cqil.shm_linear_all_gather."))
    return {kind: sum(any(p in t for p in prefixes) for t in names) for kind, prefixes in kinds.items()}


def _gather_dims(gm) -> list[int]:
    """The dim each all_gather of transport ``cqil::*`` concatenates along, in graph order
    (``shm_linear_all_gather``: the last dim of its linear's output)."""
    ops = (torch.ops.cqil.shm_all_gather.default, torch.ops.cqil.pg_all_gather.default)
    fused = torch.ops.cqil.shm_linear_all_gather.default
    return [n.args[0].meta["example_value"].dim() - 1 if n.target is fused
            else n.args[3] if len(n.args) > 3 else n.kwargs.get("dim", 0)
            for n in gm.graph.nodes if n.target in (*ops, fused)]


def exactness(rank: int, world_size: int) -> dict:
    results = {}
    ids = tokens(batch=2, length=9)
    for family, bypass, inner, transport in EXACTNESS_CASES:
        started = time.perf_counter()
        torch._dynamo.reset()
        model = copy.deepcopy(tiny_model(family))
        config = CQILConfig(**SPAN, bypass=bypass, inner=inner)
        with torch.no_grad():
            original = model(ids, use_cache=False).logits
            reference = cqil_reference(model, config, ids, use_cache=False).logits
            local = torch.compile(model, backend=make_backend(config, mode="local", inner="eager"))(
                ids, use_cache=False).logits
            torch._dynamo.reset()
            bytes_before = parameter_bytes(model)
            release_other_members(model, config)
            graphs: list = []
            backend = make_backend(config, mode="spmd", inner=recording(inner, graphs), transport=transport)
            spmd = torch.compile(model, backend=backend)(ids, use_cache=False).logits
        layers = {ref.index for n in graphs[0].graph.nodes if n.op != "placeholder" and not _reads_collective(n)
                  and (ref := layer_of(n))}
        results[(family, bypass, inner, transport)] = dict(
            spmd=spmd, local=local, reference=reference, original=original, layers=layers,
            collectives=collectives(graphs[0]), placement=backend.reports[0].placement,
            transport=backend.reports[0].transport,
            bytes_before=bytes_before, bytes_after=parameter_bytes(model))
        print(f"rank {rank}: {family} D{bypass} {inner} {transport} in {time.perf_counter() - started:.1f} s", file=sys.stderr)
    results["corrected"] = corrected(ids)
    return results


def corrected(ids: torch.Tensor, tensor_parallel: bool = False) -> dict:
    """A plan with affine and low-rank corrections, bypass 1: each rank adds its member's term (computed
    in the member's own nodes) to the all-reduce and the bias after it."""
    torch._dynamo.reset()
    model = copy.deepcopy(tiny_model("llama"))
    calibration = [tokens(batch=1, length=32, seed=s) for s in range(3)]
    plan = fit_corrections(model, CQILConfig(**SPAN, bypass=1).plan_for(8), calibration, low_rank=4)
    with torch.no_grad():
        reference = cqil_reference(model, plan, ids, use_cache=False).logits
        uncorrected = cqil_reference(model, plan.without_corrections(), ids, use_cache=False).logits
        graphs: list = []
        backend = make_backend(plan, mode="spmd", inner=recording("aot_eager", graphs), transport="shared_memory",
                               tensor_parallel=tensor_parallel)
        spmd = torch.compile(model, backend=backend)(ids, use_cache=False).logits
    return dict(spmd=spmd, reference=reference, uncorrected=uncorrected, plan=plan.to_json(),
                collectives=collectives(graphs[0]),  # the blocks whose projections this rank computes:
                layers={ref.index for n in graphs[0].graph.nodes
                        if n.target is torch.nn.functional.linear and (ref := layer_of(n))})


# (family, bypass D, inner compiler, transport, plan): tensor_parallel=True; "tp-only" is a plan without groups
# Phi's LM head has a bias: over shared memory it runs in cqil::shm_linear_all_gather's addmm; LLaMA's
# runs compiled by Inductor (the op an extern call, the LM head's weight a view of the parameter).
TP_CASES = [("llama", 1, "inductor", "shared_memory", "groups"), ("qwen2", 0, "aot_eager", "process_group", "groups"),
            ("gemma2", 1, "aot_eager", "shared_memory", "groups"), ("phi", 0, "aot_eager", "shared_memory", "groups"),
            ("mistral", 0, "aot_eager", "process_group", "tp-only")]


def tensor_parallel(rank: int, world_size: int) -> dict:
    """tensor_parallel=True: each case's logits, the reference's, and what the rank's graph holds."""
    results = {}
    ids = tokens(batch=2, length=9)
    for family, bypass, inner, transport, plan in TP_CASES:
        started = time.perf_counter()
        torch._dynamo.reset()
        model = copy.deepcopy(tiny_model(family))
        config = CQILConfig(**SPAN, bypass=bypass) if plan == "groups" else CQILConfig(groups=[])
        with torch.no_grad():
            reference = cqil_reference(model, config, ids, use_cache=False).logits
            graphs: list = []
            backend = make_backend(config, mode="spmd", inner=recording(inner, graphs), transport=transport,
                                   tensor_parallel=True)
            spmd = torch.compile(model, backend=backend)(ids, use_cache=False).logits
        report = backend.reports[0]
        results[(family, bypass, inner, transport, plan)] = dict(
            spmd=spmd, reference=reference, collectives=collectives(graphs[0]), sharding=report.sharding,
            placement=report.placement, reported=report.collectives, narrows=_narrowed(graphs[0]),
            gather_dims=_gather_dims(graphs[0]), linear_gathers=len(graphs[0].graph.find_nodes(
                op="call_function", target=torch.ops.cqil.shm_linear_all_gather.default)))
        print(f"rank {rank}: TP {family} D{bypass} {inner} {transport} {plan} in "
              f"{time.perf_counter() - started:.1f} s", file=sys.stderr)
    # One token of batch 1 (a decode step without a cache): every traced size that is 1 must not be
    # taken for the heads when the pass finds where a view splits them.
    step = tokens(batch=1, length=1)
    with torch.no_grad():
        results["decode"] = dict(spmd=torch.compile(model, backend=backend)(step, use_cache=False).logits,
                                 reference=cqil_reference(model, config, step, use_cache=False).logits)
    # 6 heads and 3 KV heads over 2 ranks, tp_fallback=True: attention whole on every rank, MLP split.
    torch._dynamo.reset()
    model = _heads("llama", 6, 3)
    config = CQILConfig(**SPAN)
    graphs = []
    fallback = make_backend(config, mode="spmd", inner=recording("aot_eager", graphs), tensor_parallel=True,
                            tp_fallback=True)
    with torch.no_grad():
        results["fallback"] = dict(spmd=torch.compile(model, backend=fallback)(ids, use_cache=False).logits,
                                   reference=cqil_reference(model, config, ids, use_cache=False).logits,
                                   collectives=collectives(graphs[0]), sharding=fallback.reports[0].sharding)
    results["corrected"] = corrected(ids, tensor_parallel=True)
    results["weights"] = rank_weights(rank, world_size)  # in the same processes: one start-up fewer
    return results


def rank_weights(rank: int, world_size: int) -> dict:
    """Each rank builds the model on the meta device and reads only its tensors from a safetensors file."""
    from cqil_fx.graph.weights import load_rank_weights

    out = {}
    full = tiny_model("llama")
    path = Path(os.environ["CQIL_TEST_DIR"]) / "llama"
    if rank == 0:
        full.save_pretrained(path)
    dist.barrier()
    ids = tokens(batch=2, length=9)
    for tp in (True, False):
        torch._dynamo.reset()
        config = CQILConfig(**SPAN, bypass=1, mode="spmd", inner="aot_eager", tensor_parallel=tp)
        model, loaded = load_rank_weights(full.config, path, config)
        graphs: list = []
        with torch.no_grad():
            reference = cqil_reference(full, config, ids, use_cache=False).logits
            spmd = torch.compile(model, backend=make_backend(config, inner=recording("aot_eager", graphs)))(
                ids, use_cache=False).logits
        out[tp] = dict(spmd=spmd, reference=reference, loaded=loaded, narrows=_narrowed(graphs[0]),
                       collectives=collectives(graphs[0]))
    # The embedding tied to the LM head (SmolLM2, Qwen2.5-0.5B): one table, split once, read by both.
    torch.manual_seed(0)
    tied_config = copy.deepcopy(full.config)
    tied_config.tie_word_embeddings = True
    tied = type(full)(tied_config).eval()
    path = Path(os.environ["CQIL_TEST_DIR"]) / "llama-tied"
    if rank == 0:
        tied.save_pretrained(path)
    dist.barrier()
    torch._dynamo.reset()
    config = CQILConfig(**SPAN, bypass=1, mode="spmd", inner="aot_eager", tensor_parallel=True)
    model, loaded = load_rank_weights(tied_config, path, config)
    graphs = []
    with torch.no_grad():
        reference = cqil_reference(tied, config, ids, use_cache=False).logits
        spmd = torch.compile(model, backend=make_backend(config, inner=recording("aot_eager", graphs)))(
            ids, use_cache=False).logits
    out["tied"] = dict(spmd=spmd, reference=reference, loaded=loaded, collectives=collectives(graphs[0]),
                       same=model.lm_head.weight is model.get_input_embeddings().weight,
                       rows=model.lm_head.weight.shape[0], whole=sum(p.numel() * 4 for p in tied.parameters()))
    return out


def _narrowed(gm) -> dict[str, tuple]:
    """Placeholder name -> (dim, start, length) of every weight slice in the graph."""
    return {n.args[0].name: tuple(n.args[1:]) for n in gm.graph.nodes if n.target is torch.narrow}


def _reads_collective(node) -> bool:
    """The group's output ``x + all_reduce(d)``: shared, though it carries the last member's stack."""
    import cqil_fx.graph.distributed  # noqa: F401 - registers torch.ops.cqil (both transports)

    reduced = (torch.ops._c10d_functional.wait_tensor.default, torch.ops.cqil.shm_all_reduce.default,
               torch.ops.cqil.pg_all_reduce.default)
    return any(getattr(a, "target", None) in reduced for a in node.args)


def _compile_error(config: CQILConfig) -> dict:
    model = copy.deepcopy(tiny_model("llama"))
    try:
        torch.compile(model, backend=make_backend(config, inner="aot_eager"))(tokens(), use_cache=False)
    except Exception as e:  # noqa: BLE001 - the test asserts on what came out
        return dict(error=_unwrap(e))
    return dict(error=None)


def _heads(family: str, heads: int, kv_heads: int):
    """``family``'s tiny model with other head counts (head_dim 8)."""
    import transformers
    from tiny_models import FAMILIES

    config_cls, model_cls, kwargs, _ = FAMILIES[family]
    config = getattr(transformers, config_cls)(**dict(kwargs, hidden_size=8 * heads, num_attention_heads=heads,
                                                      num_key_value_heads=kv_heads, vocab_size=96))
    torch.manual_seed(0)
    return getattr(transformers, model_cls)(config).eval().requires_grad_(False)


def _tp_error(model, dynamic: bool = False) -> dict:
    torch._dynamo.reset()  # each model's own graphs, with static shapes
    try:
        if dynamic:  # a second shape: Dynamo compiles a dynamic graph
            torch.compile(model, backend=make_backend(groups=[], mode="spmd", inner="eager", collective_timeout=20,
                                                      tensor_parallel=True))(tokens(length=7), use_cache=False)
        torch.compile(model, backend=make_backend(groups=[], mode="spmd", inner="eager", tensor_parallel=True,
                                                  collective_timeout=20))(tokens(), use_cache=False)
    except Exception as e:  # noqa: BLE001 - the test asserts on what came out
        return dict(error=_unwrap(e))
    return dict(error=None)


def compile_errors(rank: int, world_size: int) -> dict:
    """A plan whose groups do not have one member per rank; then ranks with different plans;
    tensor parallelism over head counts that do not divide by the world size, and over GPT-2's Conv1D."""
    start = 2 if rank == 0 else 4
    return dict(
        ranks_disagree=ranks_disagree(rank, world_size),
        kv_heads_3=_tp_error(_heads("llama", 6, 3)),
        heads_3=_tp_error(_heads("qwen2", 3, 3)),
        conv1d=_tp_error(copy.deepcopy(tiny_model("gpt2"))),
        dynamic=_tp_error(copy.deepcopy(tiny_model("llama")), dynamic=True),
        parallel_not_world=_compile_error(CQILConfig(start=2, end=5, parallel=3, mode="spmd", collective_timeout=20)),
        plans_disagree=_compile_error(CQILConfig(start=start, end=start + 2, mode="spmd", collective_timeout=20)),
    )


def _first_call_then(rank: int, then_on_rank1, transport: str) -> dict:
    model = copy.deepcopy(tiny_model("llama"))
    fast = torch.compile(model, backend=make_backend(**SPAN, mode="spmd", inner="aot_eager", collective_timeout=4,
                                                     transport=transport))
    fast(tokens(), use_cache=False)  # compiles and runs once with both ranks alive
    dist.barrier()
    if rank == 1:
        then_on_rank1()
    started = time.perf_counter()
    try:
        fast(tokens(), use_cache=False)
    except Exception as e:  # noqa: BLE001
        return dict(error=_unwrap(e), seconds=time.perf_counter() - started)
    return dict(error=None, seconds=time.perf_counter() - started)


def ranks_disagree(rank: int, world_size: int) -> dict:
    """Rank 0 passes 16 tokens, rank 1 20: at compile time (static shapes), and at a shared-memory collective."""
    from cqil_fx.graph import shm

    out = {}
    model = copy.deepcopy(tiny_model("llama"))
    fast = torch.compile(model, backend=make_backend(**SPAN, mode="spmd", inner="eager", collective_timeout=20,
                                                     tensor_parallel=True))
    try:
        fast(tokens(batch=1, length=16 + 4 * rank), use_cache=False)
        out["compile"] = dict(error=None)
    except Exception as e:  # noqa: BLE001
        out["compile"] = dict(error=_unwrap(e))
    channel = shm.open_channel(dist.group.WORLD, rank, world_size, shm.capacity_for(4096), timeout=20)
    try:
        shm.shm_all_reduce(torch.ones(1, 16 + 4 * rank, 8), channel)
        out["collective"] = dict(error=None)
    except Exception as e:  # noqa: BLE001
        out["collective"] = dict(error=_unwrap(e))
    out["after"] = shm.shm_all_reduce(torch.ones(2, 3), channel)  # the channel still works afterwards
    return out


def inputs_disagree(rank: int, world_size: int) -> dict:
    """Run-time input checks (``check_inputs``): the same shape with other token ids (shared memory), and
    other lengths through one dynamic graph (process group), each before the graph's first collective."""
    out = {}
    model = copy.deepcopy(tiny_model("llama"))
    ids = tokens(batch=1, length=12)
    fast = torch.compile(model, backend=make_backend(**SPAN, mode="spmd", inner="eager", collective_timeout=20))
    with torch.no_grad():
        fast(ids, use_cache=False)  # the same inputs on both ranks: compiled and checked
        try:
            fast(ids if rank == 0 else ids.flip(-1), use_cache=False)  # same shape, other token ids
            out["values"] = dict(error=None)
        except Exception as e:  # noqa: BLE001
            out["values"] = dict(error=_unwrap(e))
    torch._dynamo.reset()
    fast = torch.compile(model, backend=make_backend(**SPAN, mode="spmd", inner="eager", collective_timeout=20,
                                                     transport="process_group"), dynamic=True)
    with torch.no_grad():
        fast(tokens(batch=1, length=12), use_cache=False)
        try:  # one dynamic graph serves both lengths: no recompile, so no compile-time agreement
            fast(tokens(batch=1, length=16 + 4 * rank), use_cache=False)
            out["shapes"] = dict(error=None)
        except Exception as e:  # noqa: BLE001
            out["shapes"] = dict(error=_unwrap(e))
    return out


def compile_histories_differ(rank: int, world_size: int) -> dict:
    """Rank 0 alone compiles the same forward on two lengths first (as a script timing the original on one
    rank does), so Dynamo's automatic dynamic shapes make its SPMD graph dynamic; rank 1's is static. At the
    second length rank 0 calls its graph while rank 1 compiles another: CQILDistributedError, saying why."""
    model = copy.deepcopy(tiny_model("llama"))
    with torch.no_grad():
        if rank == 0:
            warm = torch.compile(copy.deepcopy(model), backend="eager")
            for length in (12, 16):
                warm(tokens(batch=1, length=length), use_cache=False)
        fast = torch.compile(model, backend=make_backend(**SPAN, mode="spmd", inner="eager", collective_timeout=20,
                                                         transport="process_group"))
        fast(tokens(batch=1, length=12), use_cache=False)
        try:
            fast(tokens(batch=1, length=20), use_cache=False)
            return dict(error=None)
        except Exception as e:  # noqa: BLE001
            return dict(error=_unwrap(e))


def rank_dies(rank: int, world_size: int) -> dict:
    return _first_call_then(rank, lambda: os._exit(3), "process_group")


def rank_hangs(rank: int, world_size: int) -> dict:
    return _first_call_then(rank, lambda: time.sleep(12), "shared_memory")


def _unwrap(e: BaseException) -> tuple[str, str]:
    inner = getattr(e, "inner_exception", None) or e  # BackendCompilerFailed carries ours
    return type(inner).__name__, str(inner)


def main(rank: int, world_size: int, scenario: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    os.environ["CQIL_TEST_DIR"] = out_dir
    dist.init_process_group("gloo", init_method=f"file://{out_dir}/store", rank=rank, world_size=world_size)
    try:
        result = globals()[scenario](rank, world_size)
    except Exception:  # noqa: BLE001 - reported to the test, which fails with the traceback
        result = dict(crash=traceback.format_exc())
    torch.save(result, f"{out_dir}/rank{rank}.pt")
    dist.destroy_process_group()


def medium_llama():
    """A random LLaMA big enough that a block costs milliseconds (latency tests)."""
    import transformers

    config = transformers.LlamaConfig(vocab_size=512, hidden_size=512, intermediate_size=2048, num_hidden_layers=8,
                                      num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=256)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval().requires_grad_(False)


def inductor_one_thread(gm, example_inputs):
    from torch._inductor.compile_fx import compile_fx

    with torch._inductor.config.patch({"cpp.threads": 1}):
        return compile_fx(gm, example_inputs)


def latency(rank: int, world_size: int) -> dict:
    """Rank 0 times the original (one thread) against SPMD CQIL (all 8 blocks in 4 groups), interleaved."""
    from cqil_fx.tools.testing import compare_latency

    model = medium_llama()
    ids = torch.randint(0, 512, (1, 128), generator=torch.Generator().manual_seed(0))
    original = torch.compile(copy.deepcopy(model), backend=inductor_one_thread, dynamic=False)
    release_other_members(model, CQILConfig(start=0, end=8))
    spmd = torch.compile(model, dynamic=False, backend=make_backend(start=0, end=8, mode="spmd",
                                                                    inner=inductor_one_thread))
    comparisons = []
    for _ in range(2):  # a second measurement only where the first falls short (noise), on both ranks
        baseline = original if rank == 0 else (lambda *a, **k: None)  # rank 1 only takes part in SPMD calls
        comparisons.append(compare_latency(baseline, spmd, ids, use_cache=False, reps=9))
        again = torch.tensor([comparisons[-1].reduction < LATENCY_MIN_REDUCTION if rank == 0 else 0])
        dist.broadcast(again, src=0)
        if not again.item():
            break
    return dict(comparisons=comparisons)


LATENCY_MIN_REDUCTION = 0.15


def generation(rank: int, world_size: int, tensor_parallel: bool = False, cache: str = "static",
               family: str = "llama") -> dict:
    """Greedy generate() with a ``cache`` ("static" or "dynamic") KV cache through the SPMD backend; the
    oracle recomputes without a cache."""
    from test_generate import greedy_without_cache, left_padded, small_model

    model = copy.deepcopy(small_model(family))
    config = CQILConfig(groups=[[1, 2]], bypass=1)
    ids, mask = left_padded(batch=2, length=7, pads=(0, 3))
    expected, _ = greedy_without_cache(model, config, ids, mask)
    release_other_members(model, config)
    if cache == "static":
        model.generation_config.cache_implementation = "static"
    graphs = []
    backend = make_backend(config, mode="spmd", inner=recording("aot_eager", graphs), collective_timeout=60,
                           tensor_parallel=tensor_parallel)
    model.forward = torch.compile(model.forward, backend=backend)
    with torch.no_grad():
        runs = [model.generate(ids, attention_mask=mask, max_new_tokens=expected.shape[1] - ids.shape[1],
                               do_sample=False, pad_token_id=0, return_dict_in_generate=True)
                for _ in range(2)]  # the second reuses (resets) the static cache
    layers = runs[-1].past_key_values.layers
    return dict(tokens=runs[0].sequences, again=runs[1].sequences, expected=expected,
                reports=[repr(r) for r in backend.reports], placements=[r.placement for r in backend.reports],
                cache_elements=[layer.keys.untyped_storage().nbytes() // layer.keys.element_size()
                                for layer in layers],
                other_projections=[_projections_of(gm, 2 - rank) for gm in graphs],
                own_projections=[_projections_of(gm, 1 + rank) for gm in graphs])


PROJECTIONS = (torch._C._nn.linear, torch.nn.functional.linear, torch.addmm, torch.matmul)


def _projections_of(gm, layer: int) -> list[str]:
    """The matrix products of decoder layer ``layer`` in ``gm``."""
    return [n.name for n in gm.graph.nodes
            if n.target in PROJECTIONS and (ref := layer_of(n)) is not None and ref.index == layer]


def dynamic_generation(rank: int, world_size: int, family: str = "llama") -> dict:
    """:func:`generation` with transformers' default (dynamic) cache."""
    return generation(rank, world_size, cache="dynamic", family=family)


def dynamic_generation_gemma2(rank: int, world_size: int) -> dict:
    return dynamic_generation(rank, world_size, family="gemma2")


def dynamic_generation_gpt2(rank: int, world_size: int) -> dict:
    return dynamic_generation(rank, world_size, family="gpt2")


def tp_generation(rank: int, world_size: int) -> dict:
    """:func:`generation` with the ungrouped blocks and the LM head tensor-parallel."""
    return generation(rank, world_size, tensor_parallel=True)


def loaded_tp_generation(rank: int, world_size: int, cache: str = "static", in_memory: bool = False) -> dict:
    """generate() with a ``cache`` ("static" or "dynamic") KV cache of a model each rank loaded with
    :func:`load_rank_weights` (TP), or sharded in memory from whole weights with :func:`shard_rank_weights`
    (``in_memory``), and the number of key/value heads each layer's cache holds."""
    from test_generate import greedy_without_cache, left_padded, small_model

    from cqil_fx.graph.weights import load_rank_weights, shard_rank_weights

    full = small_model("llama")
    config = CQILConfig(groups=[[1, 2]], bypass=1, mode="spmd", inner="aot_eager", collective_timeout=60,
                        tensor_parallel=True)
    ids, mask = left_padded(batch=2, length=7, pads=(0, 3))
    expected, _ = greedy_without_cache(full, config, ids, mask)
    if in_memory:
        model = copy.deepcopy(full)
        weights = shard_rank_weights(model, config)
    else:
        path = Path(os.environ["CQIL_TEST_DIR"]) / "small-llama"
        if rank == 0:
            full.save_pretrained(path)
        dist.barrier()
        model, weights = load_rank_weights(full.config, path, config)
    if cache == "static":
        model.generation_config.cache_implementation = "static"
    backend = make_backend(config)
    model.forward = torch.compile(model.forward, backend=backend)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=expected.shape[1] - ids.shape[1],
                             do_sample=False, pad_token_id=0, return_dict_in_generate=True)
    return dict(tokens=out.sequences, expected=expected, reports=[repr(r) for r in backend.reports],
                cache_heads=[layer.keys.shape[1] for layer in out.past_key_values.layers],
                cache_elements=[layer.keys.untyped_storage().nbytes() // layer.keys.element_size()
                                for layer in out.past_key_values.layers],
                kv_heads=full.config.num_key_value_heads, weights=weights,
                parameters={n: (tuple(p.shape), p.untyped_storage().nbytes(), getattr(p, "_cqil_shard", None))
                            for n, p in model.named_parameters()})


def loaded_tp_dynamic_generation(rank: int, world_size: int) -> dict:
    """:func:`loaded_tp_generation` with transformers' default (dynamic) cache."""
    return loaded_tp_generation(rank, world_size, cache="dynamic")


def sharded_tp_dynamic_generation(rank: int, world_size: int) -> dict:
    """:func:`loaded_tp_dynamic_generation` with the whole model sharded in memory (:func:`shard_rank_weights`)."""
    return loaded_tp_generation(rank, world_size, cache="dynamic", in_memory=True)


# --------------------------------------------------------------------------- planning under torch.distributed

PLAN_TIMEOUT = 3.0  # collective_timeout of the planning scenarios: rank 0's search takes longer


def _small_default_search(monkeypatch_rank0_delay: float) -> dict:
    """Make the default plan's search affordable, and slower than PLAN_TIMEOUT on rank 0; count searches."""
    from cqil_fx.planning import auto, self_text

    self_text.SELF_TOKENS, self_text.SELF_WINDOW = 256, 32
    calls = {"searches": 0}
    real = auto.plan_default

    def slow(*args, **kwargs):
        calls["searches"] += 1
        time.sleep(monkeypatch_rank0_delay)
        return real(*args, **kwargs)

    import cqil_fx.planning.default as default

    default.plan_default = slow
    return calls


def plan_on_rank0(rank: int, world_size: int) -> dict:
    """cqil_fx.plan on every rank: rank 0 searches (for longer than the collective timeout), rank 1 receives
    the plan; then backend="cqil" finds it on both ranks and the SPMD logits equal the reference."""
    import cqil_fx

    os.environ["CQIL_FX_PLAN_CACHE"] = f"{os.environ['CQIL_TEST_DIR']}/cache{rank}"  # a cache per rank
    calls = _small_default_search(2 * PLAN_TIMEOUT if rank == 0 else 0.0)
    model, ids = tiny_model("llama"), tokens()
    start = time.perf_counter()
    plan = cqil_fx.plan(model, budget=0.5, collective_timeout=PLAN_TIMEOUT, progress=False)
    waited = time.perf_counter() - start
    backend = make_backend(budget=0.5, collective_timeout=PLAN_TIMEOUT)
    logits = torch.compile(model, backend=backend)(ids, use_cache=False).logits
    reference = cqil_reference(model, CQILConfig(plan=plan), ids, use_cache=False).logits
    report = backend.reports[-1]
    return dict(plan=plan.to_json(), waited=waited, searches=calls["searches"], source=report.source,
                mode=report.mode, error=((logits - reference).norm() / reference.norm()).item())


def plan_rank0_dies(rank: int, world_size: int) -> dict:
    """Rank 0 dies while it searches: rank 1 raises within the collective timeout instead of waiting forever."""
    import cqil_fx

    if rank == 0:
        from cqil_fx.planning import default

        default.plan_default = lambda *args, **kwargs: os._exit(3)
    start = time.perf_counter()
    try:
        cqil_fx.plan(tiny_model("llama"), collective_timeout=PLAN_TIMEOUT, progress=False)
    except Exception as e:  # noqa: BLE001 - what rank 1 raised is the result
        return dict(error=_unwrap(e), seconds=time.perf_counter() - start)
    return dict(error=None, seconds=time.perf_counter() - start)


# --------------------------------------------------------------------------- quantized weights (torchao)

QUANTIZED_FAMILIES = ("llama", "qwen2", "phi")


def quantized(rank: int, world_size: int) -> dict:
    """Int8 weight-only models of three families on two ranks: a given plan with and without tensor
    parallelism against the reference on the quantized model; the other members' quantized weights
    released; int4 weights under tensor parallelism refused."""
    from cqil_fx.tools.quant import quantize

    out = {}
    ids = tokens()
    for family in QUANTIZED_FAMILIES:
        model = quantize(copy.deepcopy(tiny_model(family)), "int8-weight-only")
        before = parameter_bytes(model)
        reference = cqil_reference(model, CQILConfig(**SPAN), ids, use_cache=False).logits
        released = release_other_members(model, CQILConfig(**SPAN))
        config = CQILConfig(**SPAN, mode="spmd", inner="aot_eager")
        logits = torch.compile(model, backend=make_backend(config))(ids, use_cache=False).logits
        out[family] = dict(error=((logits - reference).norm() / reference.norm()).item(),
                           released=released / before)
        torch._dynamo.reset()
        try:
            tp = make_backend(config, tensor_parallel=True)
            logits = torch.compile(model, backend=tp)(ids, use_cache=False).logits
            out[family]["tp_error"] = ((logits - reference).norm() / reference.norm()).item()
            out[family]["tp_blocks"] = tp.reports[-1].sharding.blocks
        except Exception as e:  # noqa: BLE001 - a refusal is a result: its type and message
            out[family]["tp_refused"] = _unwrap(e)
        torch._dynamo.reset()
    int4 = quantize(copy.deepcopy(tiny_model("llama")), "int4-weight-only")
    try:
        tp = make_backend(CQILConfig(**SPAN, mode="spmd", inner="aot_eager", tensor_parallel=True))
        torch.compile(int4, backend=tp)(tokens(), use_cache=False)
        out["int4_tp"] = (None, "compiled")
    except Exception as e:  # noqa: BLE001 - the refusal is the result
        out["int4_tp"] = _unwrap(e)
    return out
