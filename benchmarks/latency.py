"""Side-by-side latency of the original model and CQIL on SmolLM2-135M (CPU, Inductor).

    python benchmarks/latency.py                                   # all columns, S12-E28 and S20-E28, D 0/1
    python benchmarks/latency.py --plans 12-28:0 --workloads decode --reps 21
    python benchmarks/latency.py --columns original-1t original-2t cqil-concurrent   # one process
    python benchmarks/latency.py --plans 12-28:0 --workloads generate-64 --reps 7   # KV-cache decode

Workloads, batch 1: ``decode`` is one forward of 1 token without a cache,
``prefill-128`` / ``prefill-512`` one forward of 128 / 512 tokens (the logits of every position),
``prefill-512-last`` the same forward with the logits of the last position only
(``logits_to_keep=1``: what ``generate`` computes before its first token), and
``generate-64`` is ``model.generate`` with a static KV cache: a 128-token prompt,
then 64 new tokens, greedy (each column's ``forward`` compiled as in
``cqil_fx.tools.generation.compiled_twin``; one prefill and one decode graph).  For
``generate-64`` the ratios below are taken on the per-token latency (the mean
wall time of the 63 decode steps after the prefill, timed by
``cqil_fx.tools.generation.TokenClock``: forward plus generate's own per-step work),
and the rows also give the whole call and tokens/s (64 / whole call).

Columns, all compiled with Inductor and measured interleaved (one call of each
per repetition, after warm-up; medians reported):

* ``original-1t``: the original model, one process, one thread — the paper's baseline (a);
* ``original-2t``: the original model, one process, two threads — what these two cores give (b);
* ``original-2t-cpp``: (b) compiled with Inductor's ``cpp_wrapper = True``, the setting the concurrent
  column's segments use on CPU (one C++ call per graph instead of a Python wrapper): how much of (d)'s
  lead over (b) is that setting rather than CQIL (b');
* ``cqil-spmd``: CQIL ``mode="spmd"`` on 2 ranks x 1 thread, collectives over
  shared memory (``transport="auto"`` on one CPU host) (c);
* ``cqil-spmd-gloo``: the same over the gloo process group (``transport="process_group"``);
* ``cqil-concurrent``: CQIL ``mode="concurrent"``, one process, the members of a
  group on two single-threaded workers, shared segments on two threads (d);
* ``tp-spmd``: plain tensor parallelism on the same 2 ranks x 1 thread (``tensor_parallel=True``,
  a plan without groups; shared memory) (e);
* ``cqil-tp-spmd``: CQIL + TP: the plan's groups one member per rank, every other block and the
  LM head tensor-parallel (f);
* ``tp-spmd-unfused``: (e) with ``fold_linear_gathers`` off, so the vocabulary-split LM head
  writes its logits to memory of its own and its gather copies them into the shared slot (as
  before 2026-12-01): what computing them straight into the slot is worth.

Every SPMD row carries ``collectives``: the collectives per forward of its
graph, counted by the backend on the placed graph (``CompileReport.collectives``).
``--model`` picks SmolLM2 (real weights; its 9 / 3 heads do not divide by 2, so
(e) and (f) raise ``CQILPlanError`` for it unless ``--tp-fallback``, which keeps
its attention whole on every rank and splits the MLPs: ``tp_fallback=True``) or a
random-weight shape whose heads divide (``qwen2.5-0.5b-shape``, ``medium-llama``).  ``--predict`` prints
``predict_multi_gpu()``: TP vs CQIL + TP on 2 and 4 NVLink GPUs for Llama-3-8B
at batch 1 from published all-reduce latencies -- a prediction, not a measurement.

When ``cqil-spmd`` is asked for, the script starts two rank processes itself.
Rank 0 runs every column and takes every time; rank 1 waits (blocked in a
gloo broadcast, not spinning) until rank 0 tells it which SPMD call to make,
so the single-process columns run on an otherwise idle machine.  After the
command both ranks meet at a shared-memory barrier and only then does rank 0
start the clock: a deployed SPMD model runs its ranks in lockstep, so the
harness's own wake-up latency (a gloo message, 0.5-2.5 ms) is not part of
the forward's.

Breakdown of (c), so a missed target says where the time went:
``spmd-compute`` is rank 0's own placed graph with its collectives replaced by
local stand-ins (identity for all_reduce, concatenation for all_gather), timed
alone: compute per rank.  ``collective_ms`` is the median of a bare
all_reduce of one group delta between the two idle ranks, over the column's
transport.  Then
``comm_and_wait = c - compute``, of which ``n_collectives * collective_ms`` is
the collectives' own cost and the rest is waiting (ranks arriving at
different times, wake-ups).

Breakdown of (d), per forward (single-forward workloads): the concurrent
column's programs are instrumented (``SegmentClock``) and each measured call
records ``shared_ms`` (the shared segments, on the calling thread),
``group_steps_ms`` (from handing a run of member steps to the team until all are
done), ``members_longest_ms`` (the longest member of each step, summed over
steps: what the steps would cost with free hand-offs), ``members_sum_ms``
(all member segments: their serial cost on one thread each), ``handoff_ms =
group_steps - members_longest`` and ``outside_ms = d - shared - group_steps``
(Dynamo's guards and the Python around the segments).

Ideal reduction: a perfect CQIL removes (|G| - 1) block-times per group, so
``ideal = saved_blocks * t_block / t(a)`` with ``t_block = (t(a) - t_rest) / N``
and ``t_rest`` the model with no decoder blocks (embedding, final norm, LM head),
measured the same way (column ``rest-1t``).  "realised" = (1 - c/a) / ideal.

Writes ``<out>/latency.json`` — schema: {"meta": {command, date, machine, torch},
"rows": [{workload, plan, column, median_ms, p10_ms, p90_ms}, plus token_ms and
tokens_per_s for generate-64] (plan "" for the plan-free columns), "summary": [{workload, plan, column, reduction_vs_1t,
reduction_vs_2t, ideal, realised, and reduction_vs_2t_cpp with that column}],
"breakdown": [{workload, plan, column, spmd_ms,
compute_ms, comm_and_wait_ms, collectives, collective_ms, waiting_ms}], "concurrent_breakdown":
[{workload, plan, total_ms, shared_ms, group_steps_ms, members_longest_ms, members_sum_ms, handoff_ms,
outside_ms}] (medians over the measured calls), "param_bytes":
{"original": ..., "spmd rank 0, <plan>": ...}} — and ``<out>/latency.png``.
"""

from __future__ import annotations

import argparse
import collections
import copy
import functools
import json
import multiprocessing
import os
import platform
import tempfile
import time
import unittest.mock
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist

from cqil_fx import CQILConfig, make_backend
from cqil_fx.graph.distributed import parameter_bytes, release_other_members
from cqil_fx.graph.executor import ConcurrentProgram
from cqil_fx.tools.generation import TokenClock, compiled_twin
from cqil_fx.tools.models import load_smollm2
from cqil_fx.tools.timing import Summary, median, ratios, time_interleaved

WORKLOADS = {"decode": (1, 0), "prefill-128": (128, 0), "prefill-512": (512, 0), "prefill-512-last": (512, 0),
             "generate-64": (128, 64)}
"""workload -> (prompt tokens, new tokens); 0 new tokens is one forward without a cache."""
LAST_LOGITS = {"prefill-512-last"}
"""Forwards that compute the last position's logits only (``logits_to_keep=1``), as generate's prefill does."""
COLUMNS = ("original-1t", "original-2t", "original-2t-cpp", "cqil-spmd", "cqil-spmd-gloo", "cqil-concurrent",
           "tp-spmd", "cqil-tp-spmd", "tp-spmd-unfused")
THREADS = {"original-1t": 1, "original-2t": 2, "original-2t-cpp": 2, "rest-1t": 1, "cqil-spmd": 1,
           "cqil-spmd-gloo": 1, "spmd-compute": 1, "cqil-concurrent": 2, "tp-spmd": 1, "cqil-tp-spmd": 1,
           "tp-spmd-unfused": 1}
TRANSPORTS = {"cqil-spmd": "auto", "cqil-spmd-gloo": "process_group"}
TENSOR_PARALLEL = ("tp-spmd", "cqil-tp-spmd", "tp-spmd-unfused")  # tensor_parallel=True, shared memory; tp-*: no groups
SPMD_COLUMNS = (*TRANSPORTS, *TENSOR_PARALLEL)
BACKENDS: dict[str, object] = {}  # column|plan -> its backend (its reports count the graph's collectives)
MODELS = {
    # random weights, heads that divide by 2 and 4 (SmolLM2's 9 heads / 3 KV heads do not: tensor_parallel
    # raises CQILPlanError for it)
    "qwen2.5-0.5b-shape": dict(model_type="qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864,
                               num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                               tie_word_embeddings=True),
    "medium-llama": dict(model_type="llama", vocab_size=512, hidden_size=512, intermediate_size=2048,
                         num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4),
}
_STOP, _CALL, _ALL_REDUCE = 0, 1, 2


def inductor_with_threads(threads: int, cpp_wrapper: bool = False):
    """An Inductor backend whose C++ kernels use ``threads`` OpenMP threads (a distinct Dynamo cache entry)."""
    from torch._inductor.compile_fx import compile_fx

    def backend(gm, example_inputs):
        with torch._inductor.config.patch({"cpp.threads": threads, "cpp_wrapper": cpp_wrapper}):
            return compile_fx(gm, example_inputs)

    return backend


def without_collectives(inner):
    """``inner`` applied to a placed SPMD graph whose collectives became local stand-ins (compute only)."""
    functional, cqil = torch.ops._c10d_functional, torch.ops.cqil

    def backend(gm, example_inputs):
        world = dist.get_world_size()
        # The process-group transport has already swapped the functional pairs for cqil's ops
        # (choose_transport runs before the inner compiler): stand in for those too, or rank 0
        # alone would wait in them for rank 1.  op -> copies of its input a stand-in concatenates
        # (0: the input itself).
        stand_ins = {functional.wait_tensor.default: lambda node: 0,
                     functional.all_reduce.default: lambda node: 0,
                     cqil.pg_all_reduce.default: lambda node: 0,
                     functional.all_gather_into_tensor.default: lambda node: node.args[1],  # group size
                     cqil.pg_all_gather.default: lambda node: world}
        for node in list(gm.graph.nodes):
            if node.target not in stand_ins:
                continue
            copies = stand_ins[node.target](node)
            if copies:
                dim = node.args[3] if node.target is cqil.pg_all_gather.default and len(node.args) > 3 else 0
                with gm.graph.inserting_before(node):
                    replacement = gm.graph.call_function(torch.cat, ([node.args[0]] * copies,), {"dim": dim})
            else:
                replacement = node.args[0]
            node.replace_all_uses_with(replacement)
            gm.graph.erase_node(node)
        gm.recompile()
        return inner(gm, example_inputs)

    return backend


class SegmentClock:
    """A backend wrapper that times the segments of the concurrent programs the backend returns.

    ``take()`` returns the milliseconds accumulated since the last ``take()``.
    Member segments run on the team's threads; each records its own time
    under its step, and when the run of steps is over each step adds its
    longest member and the sum of its members.
    """

    def __init__(self, backend):
        self.backend = backend
        self.totals: collections.Counter = collections.Counter()
        self._members: dict[int, list[float]] = collections.defaultdict(list)  # step -> member times

    def __call__(self, gm, example_inputs):
        program = self.backend(gm, example_inputs)
        if isinstance(program, ConcurrentProgram):
            self._instrument(program)
        return program

    def take(self) -> dict[str, float]:
        out = {k: v * 1e3 for k, v in self.totals.items()}
        self.totals.clear()
        return out

    def _instrument(self, program: ConcurrentProgram) -> None:
        for index, step in enumerate(program.steps):
            for call in step:
                call.fn = self._timed(call.fn, None if call.segment.shared else index)
        run_members = program._run_members

        def timed_run(steps, env):
            t = time.perf_counter()
            run_members(steps, env)
            self.totals["group_steps_ms"] += time.perf_counter() - t
            for times in self._members.values():
                self.totals["members_longest_ms"] += max(times)
                self.totals["members_sum_ms"] += sum(times)
            self._members.clear()

        program._run_members = timed_run

    def _timed(self, fn, step: int | None):
        def run(*args):
            t = time.perf_counter()
            out = fn(*args)
            if step is None:
                self.totals["shared_ms"] += time.perf_counter() - t
            else:
                self._members[step].append(time.perf_counter() - t)
            return out

        return run


def load_model(name: str):
    """SmolLM2 (real weights) or a random-weight model of a named shape (``MODELS``)."""
    if name == "smollm2":
        return load_smollm2()[0]
    import transformers

    fields = dict(MODELS[name])
    config = transformers.AutoConfig.for_model(fields.pop("model_type"), max_position_embeddings=1024, **fields)
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config).eval().requires_grad_(False)


def counted(name: str, backend):
    BACKENDS[name] = backend
    return backend


def graph_collectives(name: str) -> int | None:
    """Collectives per forward of the last graph ``name``'s backend compiled (counted in the graph)."""
    reports = getattr(BACKENDS.get(name), "reports", None)
    return reports[-1].collectives if reports else None


def twin(model, backend) -> torch.nn.Module:
    return compiled_twin(model, backend, dynamic=False)


def model_without_blocks(model):
    rest = copy.deepcopy(model)
    rest.model.layers = torch.nn.ModuleList()
    rest.config.num_hidden_layers = 0
    return rest


def workload_call(model, workload: str, ids: torch.Tensor) -> Callable[[], float | None]:
    """One call of ``workload`` on ``model`` (a compiled twin); generate-64 returns its per-token ms."""
    _, new = WORKLOADS[workload]

    keep = {"logits_to_keep": 1} if workload in LAST_LOGITS else {}

    def forward() -> None:
        model(ids, use_cache=False, **keep)

    def generate() -> float:
        clock = TokenClock()
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                       do_sample=False, cache_implementation="static", stopping_criteria=[clock], pad_token_id=0)
        return clock.per_token_ms()

    return generate if new else forward


def measure(models: dict, workload: str, ids: torch.Tensor, reps: int, warmup: int = 3,
            threads: dict | None = None, sync=None, before: dict | None = None,
            after: dict | None = None) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Milliseconds per call of each model, interleaved: one call of each per repetition, the order
    rotated (``cqil_fx.tools.timing.time_interleaved``).

    Returns (whole-call times, per-token times); the second is empty but for generate workloads.
    ``threads[name]`` is set and ``before[name]()`` runs just before the clock starts for ``name``
    (e.g. waking the other rank), ``after[name](measured)`` just after it stops.
    """
    calls = {name: workload_call(model, workload, ids) for name, model in models.items()}
    hooks = {name: functools.partial(_before_call, (threads or {}).get(name), (before or {}).get(name))
             for name in calls}
    saved = torch.get_num_threads()
    with torch.no_grad():
        timings = time_interleaved(calls, reps, warmup, sync=sync, before=hooks, after=after)
    torch.set_num_threads(saved)
    per_token = {name: tokens for name, tokens in timings.results.items() if tokens and tokens[0] is not None}
    return timings.ms, per_token


def _before_call(threads: int | None, then: Callable[[], None] | None) -> None:
    if threads:
        torch.set_num_threads(threads)
    if then is not None:
        then()


def parse_plan(text: str) -> CQILConfig:
    """``"12-28:1"`` -> CQILConfig(start=12, end=28, parallel=2, bypass=1)."""
    span, _, bypass = text.partition(":")
    start, end = (int(x) for x in span.split("-"))
    return CQILConfig(start=start, end=end, parallel=2, bypass=int(bypass or 0))


def plan_name(config: CQILConfig) -> str:
    return f"S{config.start}-E{config.end} D{config.bypass}"


def spmd_fns(model, plans: list[CQILConfig], columns: list[str], tp_fallback: bool = False
             ) -> dict[str, torch.nn.Module]:
    """The SPMD columns, built identically on every rank (the same order of compiles)."""
    one_thread = inductor_with_threads(1)
    # Steady state: without the input comparison of the first calls (check_inputs, one small
    # all_gather_object each); spmd-compute runs on rank 0 alone, where it could not run at all.
    make = functools.partial(make_backend, check_inputs=0)
    tp = dict(tensor_parallel=True, tp_fallback=tp_fallback)
    fns = {}
    if "tp-spmd" in columns:
        fns["tp-spmd|"] = twin(model, counted("tp-spmd|", make(groups=[], mode="spmd", inner=one_thread, **tp)))
    if "tp-spmd-unfused" in columns:
        fns["tp-spmd-unfused|"] = twin(model, counted("tp-spmd-unfused|", Unfused(
            make(groups=[], mode="spmd", inner=one_thread, **tp))))
    for config in plans:
        mine = copy.deepcopy(model)
        release_other_members(mine, config)
        for column, transport in TRANSPORTS.items():
            if column in columns:
                name = f"{column}|{plan_name(config)}"
                fns[name] = twin(mine, counted(name, make(config, mode="spmd", inner=one_thread,
                                                          transport=transport)))
        if "cqil-tp-spmd" in columns:
            name = f"cqil-tp-spmd|{plan_name(config)}"
            fns[name] = twin(mine, counted(name, make(config, mode="spmd", inner=one_thread, **tp)))
        fns[f"spmd-compute|{plan_name(config)}"] = twin(mine, make(
            config, mode="spmd", inner=without_collectives(one_thread), transport="process_group"))
    return fns


class Unfused:
    """A backend that compiles with ``fold_linear_gathers`` off (the LM head's linear and gather apart)."""

    def __init__(self, backend):
        self.backend = backend

    @property
    def reports(self):
        return self.backend.reports

    def __call__(self, gm, example_inputs):
        with unittest.mock.patch("cqil_fx.passes.spmd.fold_linear_gathers", lambda *args: 0):
            return self.backend(gm, example_inputs)


def _send(*command: int) -> None:
    dist.broadcast(torch.tensor(command + (0,) * (3 - len(command)), dtype=torch.long), src=0)


_BARRIER: list[str] = []


def _barrier() -> None:
    """Both ranks leave within microseconds of each other (a spinning shared-memory all_reduce)."""
    from cqil_fx.graph import shm

    if not _BARRIER:
        _BARRIER.append(shm.open_channel(dist.group.WORLD, dist.get_rank(), 2, 1 << 16, timeout=600))
    shm.shm_all_reduce(torch.zeros(1), _BARRIER[0])


def _call_on_both(index: int, workload: int) -> None:
    _send(_CALL, index, workload)
    _barrier()


def follow(model, plans: list[CQILConfig], args) -> None:
    """Rank 1: make the SPMD calls rank 0 asks for, until told to stop."""
    fns = list(spmd_fns(model, plans, args.columns, args.tp_fallback).values())
    command = torch.zeros(3, dtype=torch.long)
    with torch.no_grad():
        while True:
            dist.broadcast(command, src=0)
            kind, a, b = command.tolist()
            if kind == _STOP:
                return
            if kind == _CALL:
                workload = args.workloads[b]
                call = workload_call(fns[a], workload, workload_ids(model, workload))
                _barrier()
                call()
            elif kind == _ALL_REDUCE:
                bare_all_reduce(a, model.config.hidden_size, b)


def workload_ids(model, workload: str) -> torch.Tensor:
    return torch.randint(0, model.config.vocab_size, (1, WORKLOADS[workload][0]),
                         generator=torch.Generator().manual_seed(0))


def bare_all_reduce(tokens: int, hidden: int, shared_memory: bool, reps: int = 50) -> float:
    """Median ms of one all_reduce of a group delta ([1, tokens, hidden] float32) between idle ranks."""
    from cqil_fx.graph import shm

    x = torch.randn(1, tokens, hidden)
    if shared_memory:
        group = dist.group.WORLD
        channel = shm.open_channel(group, dist.get_rank(), 2, shm.capacity_for(x.nbytes * 2), timeout=60)
        op = lambda: shm.shm_all_reduce(x, channel)  # noqa: E731
    else:
        op = lambda: dist.all_reduce(x)  # noqa: E731
    return median(time_interleaved({"all_reduce": op}, reps, warmup=0).ms["all_reduce"])


def lead(model, args, plans: list[CQILConfig], spmd: bool) -> dict:
    """Rank 0 (or the only process): build every column, measure, summarise."""
    columns = args.columns
    base = {"original-1t": inductor_with_threads(1), "original-2t": inductor_with_threads(2)}
    if "original-2t-cpp" in columns:
        base["original-2t-cpp"] = inductor_with_threads(2, cpp_wrapper=True)
    fns = {name: twin(model, base[name]) for name in base}
    fns["rest-1t"] = twin(model_without_blocks(model), inductor_with_threads(1))
    clocks = {}
    for config in plans:
        if "cqil-concurrent" in columns:
            name = f"cqil-concurrent|{plan_name(config)}"
            clocks[name] = SegmentClock(make_backend(config, mode="concurrent"))
            fns[name] = twin(model, clocks[name])
    remote = spmd_fns(model, plans, columns, args.tp_fallback) if spmd else {}
    index = {name: i for i, name in enumerate(remote)}
    fns.update(remote)
    threads = {name: THREADS[name.split("|")[0]] for name in fns}
    rows, summary, breakdown, concurrent = [], [], [], []
    for w, workload in enumerate(args.workloads):
        ids = workload_ids(model, workload)
        wake = {name: (lambda i=index[name], w=w: _call_on_both(i, w))
                for name in remote if not name.startswith("spmd-compute")}
        t = time.perf_counter()
        for name in remote:  # compile every SPMD variant on both ranks (their compiles agree with each other)
            _call_on_both(index[name], w)
            measure({name: fns[name]}, workload, ids, reps=0, warmup=1, threads=threads)
        measure({n: f for n, f in fns.items() if n not in remote}, workload, ids, reps=0, warmup=1, threads=threads)
        print(f"{workload}: compiled in {time.perf_counter() - t:.0f} s", flush=True)
        samples = {name: [] for name in clocks}
        after = {name: (lambda measured, name=name: samples[name].append(clocks[name].take()) if measured
                        else clocks[name].take()) for name in clocks}
        for clock in clocks.values():
            clock.take()
        times, per_token = measure(fns, workload, ids, args.reps, threads=threads, before=wake, after=after)
        whole = {name: median(ts) for name, ts in times.items()}
        token = {name: median(ts) for name, ts in per_token.items()}
        for name, ts in times.items():
            column, _, plan = name.partition("|")
            spread = Summary.of(ts)
            rows.append(dict(workload=workload, plan=plan, column=column, median_ms=whole[name], p10_ms=spread.p10,
                             p90_ms=spread.p90, collectives=graph_collectives(name), samples_ms=ts))
            if name in token:
                rows[-1].update(token_ms=token[name], tokens_per_s=WORKLOADS[workload][1] / whole[name] * 1e3)
        med = token or whole  # the ratios: per-token latency for generate workloads
        collective_ms = {}
        step_tokens = 1 if WORKLOADS[workload][1] else WORKLOADS[workload][0]
        for column in TRANSPORTS if spmd else ():
            if column in columns:
                _send(_ALL_REDUCE, step_tokens, column == "cqil-spmd")
                collective_ms[column] = bare_all_reduce(step_tokens, model.config.hidden_size, column == "cqil-spmd")
        for config in plans:
            summary += summarise(med, workload, config, model.config.num_hidden_layers)
            breakdown += [spmd_breakdown(med, workload, config, column, ms) for column, ms in collective_ms.items()]
            name = f"cqil-concurrent|{plan_name(config)}"
            if name in samples and not WORKLOADS[workload][1]:
                concurrent.append(concurrent_breakdown(whole[name], samples[name], workload, config))
        print(json.dumps([s for s in summary if s["workload"] == workload]), flush=True)
    if spmd:
        _send(_STOP)
    return dict(rows=rows, summary=summary, breakdown=breakdown, concurrent_breakdown=concurrent)


def summarise(med: dict, workload: str, config: CQILConfig, num_blocks: int) -> list[dict]:
    plan = config.plan_for(num_blocks)
    t_block = (med["original-1t"] - med["rest-1t"]) / num_blocks
    ideal = plan.saved_blocks * t_block / med["original-1t"]
    out = []
    for column in (c for c in COLUMNS if c.startswith("cqil") or c == "tp-spmd"):
        c = med.get(f"{column}|{plan_name(config) if column != 'tp-spmd' else ''}")
        if c is not None:
            reduction = 1 - c / med["original-1t"]
            out.append(dict(workload=workload, plan=plan_name(config), column=column, reduction_vs_1t=reduction,
                            reduction_vs_2t=1 - c / med["original-2t"], ideal=ideal,
                            realised=reduction / ideal if ideal else float("nan")))
            if "tp-spmd|" in med:
                out[-1]["reduction_vs_tp"] = 1 - c / med["tp-spmd|"]
            if "original-2t-cpp" in med:
                out[-1]["reduction_vs_2t_cpp"] = 1 - c / med["original-2t-cpp"]
    return out


def paired_ratios(rows: list[dict], baselines: tuple[str, ...] = ("original-2t", "tp-spmd")) -> list[dict]:
    """Each column's time over each baseline's, repetition by repetition (the calls were interleaved).

    One dict per (workload, plan, column, baseline): median, p10 and p90 of the per-repetition
    ratios (< 1: the column is faster), and their count.
    """
    out = []
    for row in rows:
        for base in baselines:
            ref = next((r for r in rows if r["workload"] == row["workload"] and r["column"] == base), None)
            skip = row["column"] == base or row["column"].startswith("original") or row["column"] in (
                "rest-1t", "spmd-compute")
            if ref is None or skip or not row.get("samples_ms"):
                continue
            spread = Summary.of(ratios(row["samples_ms"], ref["samples_ms"]))
            out.append(dict(workload=row["workload"], plan=row["plan"], column=row["column"], baseline=base,
                            median=spread.median, p10=spread.p10, p90=spread.p90, n=spread.n))
    return out


def spmd_breakdown(med: dict, workload: str, config: CQILConfig, column: str, collective_ms: float) -> dict:
    name = plan_name(config)
    spmd, compute = med[f"{column}|{name}"], med[f"spmd-compute|{name}"]
    groups = (config.end - config.start) // config.parallel
    collectives = groups * (2 if config.bypass else 1)
    return dict(workload=workload, plan=name, column=column, spmd_ms=spmd, compute_ms=compute, comm_and_wait_ms=spmd - compute,
                collectives=collectives, collective_ms=collective_ms,
                waiting_ms=spmd - compute - collectives * collective_ms)


def concurrent_breakdown(total_ms: float, samples: list[dict], workload: str, config: CQILConfig) -> dict:
    keys = ("shared_ms", "group_steps_ms", "members_longest_ms", "members_sum_ms")
    med = {k: median(s.get(k, 0.0) for s in samples) for k in keys}
    return dict(workload=workload, plan=plan_name(config), total_ms=total_ms, **med,
                handoff_ms=med["group_steps_ms"] - med["members_longest_ms"],
                outside_ms=total_ms - med["shared_ms"] - med["group_steps_ms"])


def rank_main(rank: int, args, store: str, result_path: str) -> None:
    torch.set_num_threads(1)
    torch._dynamo.config.recompile_limit = 64
    torch._dynamo.config.cache_size_limit = 64
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    model = load_model(args.model)
    plans = [parse_plan(p) for p in args.plans]
    if rank == 1:
        follow(model, plans, args)
    else:
        torch.save(lead(model, args, plans, spmd=True), result_path)
    dist.barrier()
    dist.destroy_process_group()


def run(args) -> dict:
    plans = [parse_plan(p) for p in args.plans]
    if not set(SPMD_COLUMNS) & set(args.columns):
        torch._dynamo.config.recompile_limit = 64
        model = load_model(args.model)
        return lead(model, args, plans, spmd=False)
    tmp = tempfile.mkdtemp()
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=rank_main, args=(r, args, f"{tmp}/store", f"{tmp}/result.pt")) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    if any(p.exitcode for p in procs):
        raise SystemExit(f"a rank failed: exit codes {[p.exitcode for p in procs]}")
    return torch.load(f"{tmp}/result.pt", weights_only=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--plans", nargs="+", default=["12-28:0", "12-28:1", "20-28:0", "20-28:1"],
                        help="START-END:D, P = 2")
    parser.add_argument("--columns", nargs="+", default=["cqil-spmd", "cqil-concurrent"], choices=COLUMNS)
    parser.add_argument("--workloads", nargs="+", default=["decode", "prefill-512"], choices=list(WORKLOADS))
    parser.add_argument("--reps", type=int, default=11)
    parser.add_argument("--model", default="smollm2", choices=["smollm2", *MODELS])
    parser.add_argument("--tp-fallback", action="store_true",
                        help="tp-spmd, cqil-tp-spmd: keep attention whole on every rank where its heads do not "
                             "divide by 2 (tp_fallback=True; SmolLM2), the MLPs split")
    parser.add_argument("--predict", action="store_true",
                        help="print the multi-GPU latency model's prediction (predict_multi_gpu) and exit")
    parser.add_argument("--ratios", metavar="JSON",
                        help="print the paired ratios (paired_ratios) of a latency.json this script wrote, and exit")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    if args.ratios:
        try:
            rows = json.loads(Path(args.ratios).read_text())["rows"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            parser.error(f"--ratios takes a latency.json this script wrote ({type(e).__name__}: {e})")
        print(json.dumps(paired_ratios(rows), indent=1))
        return
    try:
        [parse_plan(p) for p in args.plans]
    except ValueError as e:  # includes CQILConfigError
        parser.error(f"--plans takes START-END:D with P = 2, e.g. 12-28:0 ({e})")
    for c in ("original-1t", "original-2t"):
        if c not in args.columns:
            args.columns.insert(0, c)  # the baselines every ratio needs
    if args.predict:
        print(json.dumps(predict_multi_gpu(), indent=1))
        return
    result = run(args)
    result["prediction_multi_gpu"] = predict_multi_gpu()
    result["ratios"] = paired_ratios(result["rows"])
    model = load_model(args.model)
    result["param_bytes"] = {"original": parameter_bytes(model)}
    for p in args.plans:
        result["param_bytes"][f"spmd rank 0, {plan_name(parse_plan(p))}"] = released_bytes(model, parse_plan(p))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result["meta"] = dict(
        command="python benchmarks/latency.py " + " ".join(
            f"--{k.replace('_', '-')}" + ("" if v is True else f" {' '.join(v) if isinstance(v, list) else v}")
            for k, v in vars(args).items() if k != "out" and v not in (None, False)),
        date=time.strftime("%Y-%m-%d"), torch=torch.__version__,
        machine=f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs")
    (out / "latency.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(result["rows"], out / "latency.png")
    print(f"wrote {out}/latency.json and latency.png")


# The multi-GPU latency model (a prediction from published figures, not a measurement).
# Llama-3-8B's shape: 32 blocks, hidden 4096, 32 heads / 8 KV heads of 128, MLP 14336, vocab 128256, bf16.
LLAMA3_8B = dict(blocks=32, hidden=4096, kv_dim=1024, intermediate=14336, vocab=128256, bytes_per_param=2)
# H100 SXM: 3.35 TB/s HBM3 (NVIDIA datasheet); batch-1 decode reaches about 70 % of it in GEMV kernels.
HBM_BYTES_PER_US = 3.35e6 * 0.7
# Small-message (8 KB: one token's hidden state in bf16) all-reduce on NVLink, µs, (low, high) per world size:
# NCCL NVLS/LL with CUDA graphs ≈ 6 µs on 2 H100 and rising with the GPU count (NVIDIA/nccl#1259);
# NCCL's ring LL without graphs and symmetric memory 15-25 µs; vLLM's one-shot custom all-reduce
# (vllm-project/vllm#2192 and its write-up) 4-10 µs.  FACTS.md, "Measured 2026-11-29", collects these.
ALL_REDUCE_US = {2: (6.0, 15.0), 4: (8.0, 25.0)}
KERNEL_FLOOR_US = 10.0  # per block: ~8 kernels of ~1.2 µs that do not shrink with W (launch, tails, norms)


def predict_multi_gpu(shape: dict = LLAMA3_8B, span: tuple[int, int] = (12, 28)) -> list[dict]:
    """Predicted batch-1 decode ms per token: one GPU, TP over W, and CQIL + TP (groups of W over ``span``).

    Per block a GPU streams its weights from HBM (``t_b`` whole, ``t_b / W`` as a TP shard) plus a
    fixed per-block cost; TP adds 2 all-reduces per block, a CQIL group of W blocks costs one whole
    block per GPU plus 1 all-reduce (the formula of docs/architecture.md, "Tensor parallelism"), the
    LM head is split over the vocabulary (one all-gather, counted as one all-reduce's latency), and so
    is the embedding (one all-reduce).
    Compute per GPU is the same in both (a group's W blocks on W GPUs = W shards of each): CQIL + TP
    saves (2W - 1) collectives and (W - 1) fixed block costs per group, no bandwidth.
    """
    h, kv, m = shape["hidden"], shape["kv_dim"], shape["intermediate"]
    block_bytes = (2 * h * h + 2 * h * kv + 3 * h * m) * shape["bytes_per_param"]
    head_bytes = shape["vocab"] * h * shape["bytes_per_param"]
    t_b, t_head = block_bytes / HBM_BYTES_PER_US / 1e3, head_bytes / HBM_BYTES_PER_US / 1e3  # ms
    floor = KERNEL_FLOOR_US / 1e3
    n = shape["blocks"]
    one = n * (t_b + floor) + t_head
    rows = []
    for world, latencies in ALL_REDUCE_US.items():
        grouped = span[1] - span[0]
        groups, outside = grouped // world, n - grouped
        for ar_us in latencies:
            ar = ar_us / 1e3
            tp = n * (t_b / world + floor + 2 * ar) + t_head / world + 2 * ar
            hybrid = (outside * (t_b / world + floor + 2 * ar) + groups * (t_b + floor + ar) + t_head / world
                      + 2 * ar)
            rows.append(dict(gpus=world, all_reduce_us=ar_us, plan=f"S{span[0]}-E{span[1]} P{world}",
                             one_gpu_ms=round(one, 3), tp_ms=round(tp, 3), cqil_tp_ms=round(hybrid, 3),
                             cqil_tp_vs_tp=round(1 - hybrid / tp, 3),
                             collectives_tp=2 * n + 2, collectives_cqil_tp=groups + 2 * outside + 2))
    return rows


def released_bytes(model, config: CQILConfig) -> int:
    """Parameter bytes an SPMD rank holds for ``config`` (rank 0)."""
    mine = copy.deepcopy(model)
    release_other_members(mine, config, rank=0)
    return parameter_bytes(mine)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workloads = list(dict.fromkeys(r["workload"] for r in rows))
    fig, axes = plt.subplots(1, len(workloads), figsize=(6 * len(workloads), 4.2), squeeze=False)
    for ax, workload in zip(axes[0], workloads):
        data = [r for r in rows if r["workload"] == workload and r["column"] in COLUMNS]
        labels = [r["column"] + (f"\n{r['plan']}" if r["plan"] else "") for r in data]
        colours = {"original-1t": "gray", "original-2t": "silver", "original-2t-cpp": "darkgray",
                   "cqil-spmd": "tab:orange", "cqil-spmd-gloo": "tab:red", "cqil-concurrent": "tab:blue",
                   "tp-spmd": "tab:green", "cqil-tp-spmd": "tab:olive", "tp-spmd-unfused": "tab:cyan"}
        ax.bar(labels, [r.get("token_ms", r["median_ms"]) for r in data], color=[colours[r["column"]] for r in data])
        ax.set_title(workload)
        ax.set_ylabel("median ms per new token" if WORKLOADS[workload][1] else "median latency (ms)")
        ax.tick_params(axis="x", rotation=70, labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
