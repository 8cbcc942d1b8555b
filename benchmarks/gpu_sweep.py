"""One prepared sweep: CQIL against Inductor on one GPU across model sizes and batches, and on a many-core CPU.

    python benchmarks/gpu_sweep.py --out DIR             # GPU part: one CUDA GPU, about 8 minutes with compiles
    python benchmarks/gpu_sweep.py --cpu --out DIR       # CPU part: every core of this machine
    python benchmarks/gpu_sweep.py --dry-run [--cpu]     # no GPU: models on the meta device, plans checked,
                                                         # the work list and its estimated time
    python benchmarks/gpu_sweep.py --cpu-small [--cpu]   # the same code paths at tiny sizes on this CPU (< 2 min)
    python benchmarks/gpu_sweep.py --models smollm2-135m --batches 1 --workloads decode --budget-s 200

**Models.** Random-weight models built from transformers configs (no downloads;
latency does not depend on the weights' values) with the architectures of
SmolLM2-135M, Qwen2.5-0.5B, Llama-3.2-1B and Llama-3.1-8B.  The 8B shape keeps
``--big-layers`` of its 32 layers (16 by default: its compiles cost about
twice as much with all 32); the output says so.  bfloat16 on the GPU, float32
on the CPU (``--dtype``).

**Workloads.** ``decode``: static-cache ``generate`` of ``new_tokens`` tokens
after a prompt (512 tokens on the GPU, 128 on the CPU), greedy; the time per
new token is the mean wall time of the decode steps after the first token
(:class:`cqil_fx.tools.generation.TokenClock`: forward plus ``generate``'s own
per-step work), and ``forward_ms`` the median time of the decode forwards alone
(CUDA events on the GPU).  The prompt is prefilled by the *uncompiled* forward,
and is not timed, so that a decode cell compiles one graph per column, not two;
the cache is one ``StaticCache`` per column and batch, reset before each call,
so CUDA graphs capture once and replay.  ``prefill-N``: one forward of N tokens
(512 on the GPU, 128 on the CPU) without a cache, logits of the last position
only (``logits_to_keep=1``), as a server's prefill computes them.

**Columns.**  GPU: ``inductor`` (``torch.compile`` defaults), ``inductor-graphs``
(``mode="reduce-overhead"``: Inductor's CUDA graph trees; the baseline of every
ratio), ``cqil-local-graphs|P`` (``mode="local"``, Inductor with
``triton.cudagraphs`` as the inner compiler), ``cqil-concurrent-graphs|P``
(``mode="concurrent", cuda_graphs=True``: members on CUDA streams, the whole
step one CUDA graph) and ``ideal|P``: the same model with the blocks the plan
saves removed (every member of a group after the first), compiled like the
baseline.  CPU: ``inductor`` (all threads), ``inductor-cpp`` (with
``cpp_wrapper``, the settings concurrent mode's shared segments use; the baseline), ``cqil-concurrent|P``
and ``ideal|P`` (compiled like ``inductor-cpp``).  ``--columns`` narrows every cell to the columns
named; on the CPU a name may end in ``@THREADS``: that column compiled and called on THREADS threads
(``inductor-cpp@8``; the summary then adds the fastest original, ``best_original``).  Plans: ``P2`` is the uniform
plan P = 2, D = 0 over ``[round(0.4 N), N - 2)`` (the issue's S(0.4N)-E(N-2)),
``P4`` (``--wide``, or P3) the same span with P = 4; the span's start moves up
until P divides it.

**Ratios.** Against the baseline ``b`` of the same cell: ``reduction = 1 - c/b``,
``ideal_reduction = 1 - ideal/b``, ``realised = reduction / ideal_reduction``
(the share of the ideal reduction the column gets).  Columns are measured
interleaved: one call of each per repetition, the order reversed every other
repetition, after warm-up; medians with p10/p90.

**Work list and budget.** The sweep is a list of cells (model, workload, batch,
columns) in priority order: first what the issue's targets need (batch 1,
P2, the small shapes), then the 8B shape, batch 8, the P4 plan and the
context columns (``--dry-run`` prints it).  A column compiled in one cell is reused, not compiled
again, by later cells.  Before each cell the script estimates its cost
(compiles dominate; the guess is scaled by what earlier cells measured) and
skips it if it would end after ``--budget-s`` (GPU 480 s from the start of the
process, CPU 300 s); skipped cells are listed in the JSON.  The JSON and PNG are
rewritten after every cell, so a run that is cut off still leaves its results.
To fit a lease (benchmarks/gpu_session.sh): ``--compile-only`` processes fill Inductor's on-disk
caches in parallel; ``--ready FILE`` and ``--wait-for FILE`` let one process compile while another
times and time only when the machine is its own.
The script runs from a checkout without installing it (``cqil_fx`` from the
repository root, ``passes/`` as ``cqil_fx.passes``).

Writes ``<out>/gpu_sweep.json`` (``cpu_sweep.json`` with ``--cpu``; ``_small``
added with ``--cpu-small``) and the same name ``.png``.  Schema: ``meta``
(command, date, device, versions, settings, notes), ``models`` (shape, layers,
parameters, plans), ``rows`` (cell, model, workload, batch, column, plan,
median_ms, p10_ms, p90_ms, n, compile_s; decode rows also forward_ms,
forward_p10_ms, forward_p90_ms, call_ms, tokens_per_s; ms per new token for decode),
``summary`` (cell, model, workload, batch, plan, column, base, base_ms,
cqil_ms, reduction, ideal_ms, ideal_reduction, realised, the same on forward_ms for
decode, reduction_vs_inductor), ``cells`` (columns, seconds, counters), ``skipped``, ``errors``.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import inspect
import json
import math
import os
import platform
import statistics
import sys
import time
import types
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

STARTED = time.perf_counter()  # the budget counts from here: imports and model builds included
ROOT = Path(__file__).resolve().parent.parent


if importlib.util.find_spec("cqil_fx") is None:
    sys.path.insert(0, str(ROOT))
# (cqil_fx serves passes/ as cqil_fx.passes itself in a checkout that is not installed.)

import transformers  # noqa: E402
from torch._dynamo.utils import counters  # noqa: E402

from cqil_fx import CQILConfig, Plan, make_backend  # noqa: E402
from cqil_fx.stack import decoder_layers, without_blocks  # noqa: E402
from cqil_fx.tools.generation import TokenClock, compiled_twin  # noqa: E402
from cqil_fx.graph.executor import segment_settings  # noqa: E402


# ----------------------------------------------------------------------------------------------- shapes


@dataclasses.dataclass(frozen=True)
class Shape:
    """A decoder-only architecture by its sizes: ``layers`` built and measured, ``full_layers`` in the real model."""

    name: str
    family: str  # a key of FAMILIES
    hidden: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    layers: int
    full_layers: int
    tied: bool
    big: bool = False  # measured after the smaller shapes

    @property
    def note(self) -> str:
        if self.layers == self.full_layers:
            return ""
        return f"{self.name}: {self.layers} of the real model's {self.full_layers} layers"


FAMILIES = {"llama": ("LlamaConfig", "LlamaForCausalLM"), "qwen2": ("Qwen2Config", "Qwen2ForCausalLM")}
SHAPES = {
    "smollm2-135m": Shape("smollm2-135m", "llama", 576, 9, 3, 1536, 49152, 30, 30, tied=True),
    "qwen2.5-0.5b": Shape("qwen2.5-0.5b", "qwen2", 896, 14, 2, 4864, 151936, 24, 24, tied=True),
    "llama-3.2-1b": Shape("llama-3.2-1b", "llama", 2048, 32, 8, 8192, 128256, 16, 16, tied=True),
    "llama-3.1-8b": Shape("llama-3.1-8b", "llama", 4096, 32, 8, 14336, 128256, 16, 32, tied=False, big=True),
}
CPU_SHAPES = ("smollm2-135m", "qwen2.5-0.5b")
TINY_SHAPES = {  # --cpu-small: the same families, a few layers of hidden 64
    "tiny-llama": Shape("tiny-llama", "llama", 64, 4, 2, 128, 512, 10, 10, tied=True),
    "tiny-qwen2": Shape("tiny-qwen2", "qwen2", 64, 4, 2, 128, 512, 10, 20, tied=True, big=True),
}


def hf_config(shape: Shape) -> transformers.PretrainedConfig:
    config_class = getattr(transformers, FAMILIES[shape.family][0])
    return config_class(
        vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers, num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads,
        max_position_embeddings=4096, tie_word_embeddings=shape.tied)


def build_model(shape: Shape, device: str | torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """A random-weight model of ``shape``, made directly on ``device`` in ``dtype`` ("meta": no memory)."""
    model_class = getattr(transformers, FAMILIES[shape.family][1])
    saved = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # made in the measured dtype: an 8B model never exists in float32
    try:
        torch.manual_seed(0)
        with torch.device(device):
            model = model_class(hf_config(shape))
    finally:
        torch.set_default_dtype(saved)
    return model.eval().requires_grad_(False)


def parameter_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ------------------------------------------------------------------------------------------------ plans


def sweep_plans(num_blocks: int, wide: int) -> dict[str, Plan]:
    """``{"P2": plan, "P<wide>": plan}``: uniform plans, D = 0, over the span of :func:`middle_span`."""
    plans = {}
    for parallel in (2, wide):
        start, end = middle_span(num_blocks, parallel)
        if end - start >= parallel:
            plans[f"P{parallel}"] = CQILConfig(start=start, end=end, parallel=parallel).plan_for(num_blocks)
    return plans


def middle_span(num_blocks: int, parallel: int) -> tuple[int, int]:
    """The issue's span ``[round(0.4 N), N - 2)``, its start moved up until ``parallel`` divides it."""
    end = max(num_blocks - 2, 0)
    start = min(round(0.4 * num_blocks), end)
    return start + (end - start) % parallel, end


def plan_label(plan: Plan) -> str:
    """``"S12-E28 P2 D0 (8 groups, saves 8/30)"``."""
    first, last = plan.groups[0], plan.groups[-1]
    return (f"S{first[0]}-E{last[-1] + 1} P{len(first)} D{plan.bypass} "
            f"({len(plan.groups)} groups, saves {plan.saved_blocks}/{plan.num_blocks})")


def without_saved_blocks(model: torch.nn.Module, plan: Plan) -> torch.nn.Module:
    """The ideal for ``plan``: ``model`` without each group's members after the first, weights shared."""
    return without_blocks(model, [i for group in plan.groups for i in group[1:]])


# ------------------------------------------------------------------------------------------------ parts


@dataclasses.dataclass(frozen=True)
class Part:
    """What one part of the sweep runs on and how it measures."""

    name: str  # "gpu" | "cpu"
    device: str
    dtype: torch.dtype
    prompt: int  # decode: prompt tokens, prefilled eagerly and not timed
    new_tokens: int  # decode: new tokens per generate call
    prefill: int  # prefill: tokens of the timed forward
    reps: dict[str, int]  # workload -> timed repetitions
    warmup: int  # calls before timing, the compiling one included
    budget_s: float
    base: str  # the column every ratio is taken against
    ideal_like: str  # how the ideal is compiled
    compiler: str  # "inductor", or a light Dynamo backend for --cpu-small
    small: bool = False

    @property
    def workloads(self) -> tuple[str, ...]:
        return ("decode", f"prefill-{self.prefill}")

    @property
    def file_stem(self) -> str:
        return f"{self.name}_sweep" + ("_small" if self.small else "")


GPU_CORE = ("inductor-graphs", "cqil-concurrent-graphs|P2", "ideal|P2")
GPU_CONTEXT = ("inductor", "cqil-local-graphs|P2")
CPU_CORE = ("inductor", "inductor-cpp", "cqil-concurrent|P2", "ideal|P2")


def column_parts(column: str) -> tuple[str, str, int | None]:
    """``(kind, plan key, threads)`` of a column name ``KIND[|PLAN][@THREADS]``.

    ``@THREADS`` (CPU only, with ``--columns``): the column compiled and called with
    ``torch.set_num_threads(THREADS)`` instead of every core, e.g. ``inductor-cpp@8`` (the original on 8
    threads) or ``cqil-concurrent|P2@8`` (its members on 4 each).
    """
    name, at, threads = column.partition("@")
    kind, _, key = name.partition("|")
    return kind, key, int(threads) if at else None


def make_part(args: argparse.Namespace) -> Part:
    small = args.cpu_small
    if args.cpu or small:
        device, dtype = "cpu", torch.float32
    else:
        device, dtype = "cuda", torch.bfloat16
    if args.dtype:
        dtype = getattr(torch, args.dtype)
    if args.cpu:
        name, base, ideal_like = "cpu", "inductor-cpp", "inductor-cpp"
        prompt, new, prefill, reps, warmup, budget = 128, 8, 128, {"decode": 5, "prefill": 7}, 2, 300.0
    else:
        name, base, ideal_like = "gpu", "inductor-graphs", "inductor-graphs"
        prompt, new, prefill, reps, warmup, budget = 512, 16, 512, {"decode": 10, "prefill": 20}, 3, 480.0
    if small:
        prompt, new, prefill, reps, budget = 32, 4, 32, {"decode": 3, "prefill": 3}, 80.0
    if args.reps:
        reps = {"decode": args.reps, "prefill": args.reps}
    compiler = args.compiler or ("eager" if small else "inductor")
    return Part(name, device, dtype, prompt, new, prefill, reps, warmup, args.budget_s or budget, base, ideal_like,
                compiler, small)


def selected_shapes(args: argparse.Namespace) -> dict[str, Shape]:
    if args.cpu_small:
        shapes = dict(TINY_SHAPES)
    elif args.cpu:
        shapes = {name: SHAPES[name] for name in CPU_SHAPES}
    else:
        shapes = dict(SHAPES)
        big = shapes["llama-3.1-8b"]
        shapes[big.name] = dataclasses.replace(big, layers=args.big_layers)
    if args.models:
        shapes = {name: shape for name, shape in shapes.items() if name in args.models}
    return shapes


# ------------------------------------------------------------------------------------------- work list


@dataclasses.dataclass(frozen=True)
class Cell:
    """Columns of one model, workload and batch, measured interleaved."""

    model: str
    workload: str  # "decode" | "prefill-N"
    batch: int
    columns: tuple[str, ...]
    tier: int


def gpu_work(part: Part, shapes: dict[str, Shape], batches: Sequence[int], wide: int) -> list[Cell]:
    """The GPU cells in priority order (tiers): each tier only adds to what the earlier ones measured."""
    decode, prefill = part.workloads
    small = [n for n, s in shapes.items() if not s.big]
    big = [n for n, s in shapes.items() if s.big]
    wide_cols = (f"cqil-concurrent-graphs|P{wide}", f"ideal|P{wide}")
    everything = GPU_CORE + wide_cols + GPU_CONTEXT
    tiers = [
        [(m, decode, 1, GPU_CORE) for m in small],  # 1-2: the targets, batch-1 decode and prefill
        [(m, prefill, 1, GPU_CORE) for m in small],
        [(m, decode, 1, GPU_CORE) for m in big],  # 3: the 7-8B shape
        [(m, decode, b, GPU_CORE) for b in batches if b > 1 for m in small + big],  # 4: larger batches
        [(m, decode, 1, everything) for m in small],  # 5: the wide plan and the context columns
        [(m, prefill, 1, GPU_CORE) for m in big]  # 6: the rest
        + [(m, prefill, b, GPU_CORE) for b in batches if b > 1 for m in small + big],
        [(m, prefill, 1, everything) for m in small]
        + [(m, w, 1, GPU_CORE + wide_cols) for m in big for w in (decode, prefill)]
        + [(m, decode, b, GPU_CORE + wide_cols) for b in batches if b > 1 for m in small + big],
    ]
    return _cells(tiers, batches)


def cpu_work(part: Part, shapes: dict[str, Shape], batches: Sequence[int], wide: int) -> list[Cell]:
    """The CPU cells in priority order: decode with P2 on every shape (the issue's target), then P<wide>, prefill."""
    decode, prefill = part.workloads
    both = CPU_CORE + (f"cqil-concurrent|P{wide}", f"ideal|P{wide}")
    tiers = [
        [(m, decode, b, CPU_CORE) for m in shapes for b in batches],
        [(m, decode, b, both) for m in shapes for b in batches],
        [(m, prefill, b, both) for m in shapes for b in batches],
    ]
    return _cells(tiers, batches)


def _cells(tiers: list[list[tuple]], batches: Sequence[int]) -> list[Cell]:
    cells = []
    for tier, entries in enumerate(tiers, 1):
        cells += [Cell(m, w, b, cols, tier) for m, w, b, cols in entries if b in batches]
    return cells


def restrict(cells: list[Cell], workloads: Sequence[str], plans: dict[str, dict[str, Plan]],
             only: Sequence[str] | None = None) -> list[Cell]:
    """Drop cells of other workloads, columns of plans a model does not have and columns not in ``only``
    (when given: those columns, ``NAME@THREADS`` included where the cell has ``NAME``); keep the first of
    duplicates.  With ``only``, a cell whose columns a later cell of the
    same model, workload and batch also has goes too: the later one measures it, and only it waits (see
    ``--wait-for``) after compiling everything."""
    out, seen = [], set()
    for cell in cells:
        if cell.workload.split("-")[0] not in workloads:
            continue
        columns = tuple(c for c in cell.columns if column_parts(c)[1] in ("", *plans[cell.model]))
        if only is not None:  # in the order given; NAME@THREADS wherever the cell has NAME
            columns = tuple(c for c in only if c.partition("@")[0] in columns)
        if not columns:
            continue
        key = (cell.model, cell.workload, cell.batch, columns)
        if key not in seen:
            seen.add(key)
            out.append(dataclasses.replace(cell, columns=columns))
    if only is not None:
        out = [c for i, c in enumerate(out) if not any(
            (d.model, d.workload, d.batch) == (c.model, c.workload, c.batch) and set(c.columns) <= set(d.columns)
            for d in out[i + 1:])]
    return out


# ------------------------------------------------------------------------------------------- estimates
# Guesses, not measurements: compiles dominate the sweep, and a run scales these by what it measured
# (Sweep.factor).  Compile seconds per graph, from the H100 run of benchmarks/gpu_latency.py (six columns
# of SmolLM2's 30 blocks compiled in about 150 s per shape), by layer and by concurrent segment.

COMPILE_S = {  # (fixed, per layer, per concurrent segment)
    ("cuda", "inductor"): (6.0, 0.5, 0.8),
    # cold, SmolLM2's decode graph on 2 cores: inductor 74 s, inductor-cpp 64 s, concurrent P2 75 s (2026-11-30;
    # the 16-core machine's 74 s for inductor was no faster: mostly one g++ per graph)
    ("cpu", "inductor"): (5.0, 2.0, 0.8),
    ("cpu", "light"): (2.0, 0.35, 0.1),
}
FIRST_COMPILE_S = {"cuda": 20.0, "cpu": 5.0}  # CUDA context, Triton's first kernels
CPP_WRAPPER_S = 5.0  # the C++ wrapper's own compile, per graph, on the CPU


def estimate_compile_s(shape: Shape, column: str, plans: dict[str, Plan], part: Part) -> float:
    kind, key, _ = column_parts(column)
    device = "cuda" if part.device == "cuda" else "cpu"
    fixed, per_layer, per_segment = COMPILE_S[(device, "inductor" if part.compiler == "inductor" else "light")]
    layers = shape.layers - (plans[key].saved_blocks if kind == "ideal" else 0)
    seconds = fixed + per_layer * layers
    if kind.startswith("cqil-concurrent"):
        plan = plans[key]
        seconds += per_segment * (2 + sum(len(g) for g in plan.groups))
    if part.compiler == "inductor" and device == "cpu" and (kind.endswith("cpp") or kind == "ideal"
                                                           or kind.startswith("cqil-concurrent")):
        seconds += CPP_WRAPPER_S
    return seconds


def estimate_call_s(shape: Shape, params: int, workload: str, batch: int, part: Part) -> float:
    """One call of ``workload``: a roofline guess (weights streamed once per token; matmul flops)."""
    weight_bytes = params * torch.finfo(part.dtype).bits // 8
    if part.device == "cuda":
        bandwidth, flops, eager_flops, launch = 3.0e12, 4.0e14, 2.0e14, 25e-6
        step_overhead = 1.0e-3  # generate's own work per step
    else:
        bandwidth, flops, eager_flops, launch = 4.0e10, 1.0e12, 5.0e11, 2e-6
        step_overhead = 2.0e-3
    if workload.startswith("prefill"):
        return max(2 * params * batch * part.prefill / flops, launch * 12 * shape.layers)
    token = max(weight_bytes / bandwidth, launch * 12 * shape.layers) + step_overhead
    eager_prefill = max(2 * params * batch * part.prompt / eager_flops, 4 * launch * 12 * shape.layers)
    return eager_prefill + part.new_tokens * token + 0.015


def estimate_build_s(params: int, part: Part) -> float:
    gib = params * torch.finfo(part.dtype).bits / 8 / 2**30
    return 2.0 + gib * (1.0 if part.device == "cuda" else 5.0)


def estimate_cell_s(cell: Cell, shape: Shape, params: int, plans: dict[str, Plan], part: Part,
                    compiled: set, built: set) -> float:
    """What ``cell`` costs given the columns already ``compiled`` and models already ``built``."""
    seconds = 0.0 if cell.model in built else estimate_build_s(params, part)
    for column in cell.columns:
        if (cell.model, column, cell.workload, cell.batch) not in compiled:
            seconds += estimate_compile_s(shape, column, plans, part)
    reps = part.reps[cell.workload.split("-")[0]]
    return seconds + len(cell.columns) * (part.warmup + reps) * estimate_call_s(
        shape, params, cell.workload, cell.batch, part)


def schedule(cells: list[Cell], shapes: dict[str, Shape], params: dict[str, int],
             plans: dict[str, dict[str, Plan]], part: Part) -> list[tuple[Cell, float, float]]:
    """(cell, estimated s, running total) for each cell, as if every cell ran."""
    compiled, built, total, out = set(), set(), FIRST_COMPILE_S[_device_kind(part)], []
    for cell in cells:
        seconds = estimate_cell_s(cell, shapes[cell.model], params[cell.model], plans[cell.model], part,
                                  compiled, built)
        total += seconds
        out.append((cell, seconds, total))
        built.add(cell.model)
        compiled.update((cell.model, c, cell.workload, cell.batch) for c in cell.columns)
    return out


def _device_kind(part: Part) -> str:
    return "cuda" if part.device == "cuda" else "cpu"


# ------------------------------------------------------------------------------------------- columns


def inductor_with(patches: dict[str, Any]) -> Callable:
    """Inductor under ``config_patches`` (e.g. ``{"triton.cudagraphs": True}``), as a Dynamo backend."""
    def backend(gm, example_inputs):
        from torch._inductor.compile_fx import compile_fx  # heavy: import on first use

        return compile_fx(gm, example_inputs, config_patches=patches)

    return backend


def compile_settings(column: str, plans: dict[str, Plan], part: Part) -> tuple[dict[str, Any], Any]:
    """``torch.compile`` keyword arguments for ``column``, and its cqil backend (for its reports) or None."""
    kind, key, _ = column_parts(column)
    if kind == "ideal":
        kind = part.ideal_like
    inductor = part.compiler == "inductor"
    if kind in ("inductor", "inductor-graphs", "inductor-cpp"):
        if not inductor:
            return {"backend": part.compiler}, None
        if kind == "inductor-graphs":
            return {"backend": "inductor", "mode": "reduce-overhead"}, None
        # inductor-cpp: the settings of concurrent mode's shared segments (the C++ wrapper, built apart at
        # -O1 from the kernels: the same per call, about half the cold compile; docs/performance.md)
        cpp = segment_settings(shared=True, device_type="cpu")
        return {"backend": inductor_with(cpp) if kind == "inductor-cpp" else "inductor"}, None
    plan = plans[key]
    if kind == "cqil-local-graphs":
        inner = inductor_with({"triton.cudagraphs": True}) if inductor else part.compiler
        backend = make_backend(plan, mode="local", inner=inner)
    elif kind == "cqil-concurrent-graphs":
        backend = make_backend(plan, mode="concurrent", cuda_graphs=True, inner=part.compiler)
    elif kind == "cqil-concurrent":
        backend = make_backend(plan, mode="concurrent", inner=part.compiler)
    else:
        raise ValueError(f"unknown column {column!r}")
    return {"backend": backend}, backend


class StepClock:
    """A compiled twin's ``forward``, timed; the prefill of ``generate`` goes to the uncompiled forward.

    Set ``prefill_next`` before ``generate``: its first forward (the prompt) then runs eagerly and is not
    timed, so a decode cell compiles the decode graph only.  Every other forward's span is recorded
    (CUDA events on a GPU, so launches are not serialised by the clock).
    """

    def __init__(self, twin: torch.nn.Module, cuda: bool):
        self.compiled = twin.forward
        self.eager = types.MethodType(type(twin).forward, twin)
        self.cuda = cuda
        self.prefill_next = False
        self.spans: list[tuple[Any, Any]] = []
        twin.forward = self

    def __call__(self, *args, **kwargs):
        if self.prefill_next:
            self.prefill_next = False
            return self.eager(*args, **kwargs)
        start = self._now()
        out = self.compiled(*args, **kwargs)
        self.spans.append((start, self._now()))
        return out

    def _now(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def take_ms(self) -> float:
        """The median span since the last ``take_ms``, in ms."""
        if not self.spans:
            return math.nan
        if self.cuda:
            self.spans[-1][1].synchronize()
            ms = [start.elapsed_time(end) for start, end in self.spans]
        else:
            ms = [(end - start) * 1e3 for start, end in self.spans]
        self.spans.clear()
        return statistics.median(ms)


@dataclasses.dataclass
class Twin:
    """One column's compiled twin of a model, with its clock, static caches and cqil backend."""

    module: torch.nn.Module
    clock: StepClock
    backend: Any
    caches: dict[int, Any] = dataclasses.field(default_factory=dict)


def static_cache(model: torch.nn.Module, batch: int, max_cache_len: int):
    """A transformers ``StaticCache`` for ``model``: made lazily on its first update (transformers 5), or
    up front where the constructor still asks for the batch, device and dtype (older releases)."""
    try:
        return transformers.StaticCache(config=model.config, max_cache_len=max_cache_len)
    except TypeError:
        parameter = next(model.parameters())
        return transformers.StaticCache(config=model.config, max_batch_size=batch, max_cache_len=max_cache_len,
                                        device=parameter.device, dtype=parameter.dtype)


def cache_argument(model: torch.nn.Module) -> str:
    """The name ``generate`` takes a cache by: ``cache`` in newer transformers, ``past_key_values`` before."""
    return "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"


def decode_call(twin: Twin, ids: torch.Tensor, part: Part) -> Callable[[], dict]:
    """One static-cache ``generate`` of ``part.new_tokens`` tokens; returns ms per token and per forward."""
    batch = ids.shape[0]
    if batch not in twin.caches:
        twin.caches[batch] = static_cache(twin.module, batch, part.prompt + part.new_tokens)
    cache, mask, name = twin.caches[batch], torch.ones_like(ids), cache_argument(twin.module)

    def call() -> dict:
        cache.reset()
        tokens = TokenClock()
        twin.clock.spans.clear()
        twin.clock.prefill_next = True
        twin.module.generate(ids, attention_mask=mask, max_new_tokens=part.new_tokens,
                             min_new_tokens=part.new_tokens, do_sample=False, stopping_criteria=[tokens],
                             pad_token_id=0, **{name: cache})
        return {"token_ms": tokens.per_token_ms(), "forward_ms": twin.clock.take_ms()}

    return call


def with_threads(call: Callable[[], dict], threads: int) -> Callable[[], dict]:
    """``call`` under ``torch.set_num_threads(threads)`` (its first call compiles: Inductor reads the count then).

    Inductor's ``cpp.threads`` is set to the same count for the call: its FX graph cache keys include the
    thread count a C++ kernel bakes in only from torch 2.13 on, and the cache must not hand a compile made
    on one count to a column on another (gpu_session.sh fills it from processes of different counts).
    Members of a concurrent group keep their own ``cpp.threads`` (``threads // P``).
    """
    from torch._inductor import config as inductor_config

    def threaded() -> dict:
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            with inductor_config.patch({"cpp.threads": threads}):
                return call()
        finally:
            torch.set_num_threads(before)

    return threaded


def prefill_call(twin: Twin, ids: torch.Tensor) -> Callable[[], dict]:
    """One compiled forward of the whole prompt without a cache, the last position's logits only."""
    def call() -> dict:
        twin.clock.compiled(ids, use_cache=False, logits_to_keep=1)
        return {}

    return call


# ------------------------------------------------------------------------------------------- measuring


def measure(calls: dict[str, Callable[[], dict]], reps: int, warmup: int, sync: Callable[[], None],
            errors: list[dict]) -> dict[str, list[dict]]:
    """Interleaved: one call of each column per repetition, the order reversed every other repetition.

    Returns per column the timed calls: ``call_ms`` (wall, synchronised) and what the call returned.
    A column that raises is dropped (and its error recorded); the others go on.
    """
    samples: dict[str, list[dict]] = {name: [] for name in calls}
    names = list(calls)
    with torch.no_grad():
        for i in range(warmup + reps):
            for name in names if i % 2 == 0 else names[::-1]:
                if name not in calls:
                    continue
                sync()
                start = time.perf_counter()
                try:
                    extra = calls[name]()
                    sync()
                except Exception as error:  # noqa: BLE001 - recorded; the other columns are still worth measuring
                    errors.append(dict(column=name, stage="measure", error=f"{type(error).__name__}: {error}"))
                    print(f"    {name} failed: {type(error).__name__}: {error}", flush=True)
                    del calls[name]
                    continue
                if i >= warmup:
                    samples[name].append({"call_ms": (time.perf_counter() - start) * 1e3, **extra})
    return {name: s for name, s in samples.items() if s}


def spread(values: list[float]) -> dict[str, float]:
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return {"median_ms": None, "p10_ms": None, "p90_ms": None}
    if len(values) < 2:
        return {"median_ms": values[0], "p10_ms": values[0], "p90_ms": values[0]}
    deciles = statistics.quantiles(values, n=10, method="inclusive")  # within the samples
    return {"median_ms": statistics.median(values), "p10_ms": deciles[0], "p90_ms": deciles[-1]}


def cell_rows(index: int, cell: Cell, samples: dict[str, list[dict]], plans: dict[str, Plan],
              compile_s: dict[str, float], part: Part) -> list[dict]:
    """One row per measured column; for decode, ms per new token (and the forward alone)."""
    rows = []
    decode = cell.workload == "decode"
    for column, calls in samples.items():
        key = column_parts(column)[1]
        row = dict(cell=index, model=cell.model, workload=cell.workload, batch=cell.batch, column=column,
                   plan=plan_label(plans[key]) if key else "", n=len(calls), compile_s=compile_s.get(column))
        row.update(spread([c["token_ms" if decode else "call_ms"] for c in calls]))
        if decode:
            forward = spread([c["forward_ms"] for c in calls])
            row.update(forward_ms=forward["median_ms"], forward_p10_ms=forward["p10_ms"],
                       forward_p90_ms=forward["p90_ms"], call_ms=statistics.median(c["call_ms"] for c in calls))
            row["tokens_per_s"] = cell.batch * part.new_tokens / row["call_ms"] * 1e3
        rows.append(row)
    return rows


def summarise(rows: list[dict], plans: dict[str, Plan], part: Part) -> list[dict]:
    """Per cqil column of a cell: its reduction against the baseline, the ideal's, and the share realised."""
    by_column = {r["column"]: r for r in rows}
    base = by_column.get(part.base)
    if base is None or not base["median_ms"]:
        return []
    out = []
    metrics = [("", "median_ms")] + ([("forward_", "forward_ms")] if "forward_ms" in base else [])
    originals = {c: r for c, r in by_column.items() if c.partition("@")[0] == part.base and r["median_ms"]}
    best = min(originals, key=lambda c: originals[c]["median_ms"])  # @THREADS columns: the user's best pick
    for column, row in by_column.items():
        kind, key, threads = column_parts(column)
        if not kind.startswith("cqil") or row["median_ms"] is None:
            continue
        entry = dict(cell=row["cell"], model=row["model"], workload=row["workload"], batch=row["batch"],
                     plan=row["plan"], column=kind if threads is None else f"{kind}@{threads}", base=part.base)
        ideal = by_column.get(f"ideal|{key}@{threads}") or by_column.get(f"ideal|{key}")
        for prefix, metric in metrics:
            entry.update(_ratios(prefix, base.get(metric), row.get(metric), ideal and ideal.get(metric)))
        if "inductor" in by_column and part.base != "inductor" and by_column["inductor"]["median_ms"]:
            entry["reduction_vs_inductor"] = 1 - row["median_ms"] / by_column["inductor"]["median_ms"]
        if best != part.base:
            entry.update(best_original=best, reduction_vs_best_original=1 - row["median_ms"] / originals[best]["median_ms"])
        out.append(entry)
    return out


def _ratios(prefix: str, base: float | None, cqil: float | None, ideal: float | None) -> dict:
    if not base or cqil is None:
        return {}
    out = {f"{prefix}base_ms": base, f"{prefix}cqil_ms": cqil, f"{prefix}reduction": 1 - cqil / base}
    if ideal:
        ideal_reduction = 1 - ideal / base
        out.update({f"{prefix}ideal_ms": ideal, f"{prefix}ideal_reduction": ideal_reduction,
                    f"{prefix}realised": (1 - cqil / base) / ideal_reduction if ideal_reduction > 0 else None})
    return out


# ---------------------------------------------------------------------------------------------- the sweep


class Sweep:
    """Runs cells in order within the budget, keeping models and compiled twins for later cells."""

    def __init__(self, part: Part, shapes: dict[str, Shape], wide: int, out: Path, command: str,
                 start: float | None = None, wait_for: Path | None = None, compile_only: bool = False,
                 ready: Path | None = None):
        self.part, self.shapes, self.wide, self.out, self.wait_for = part, shapes, wide, out, wait_for
        self.compile_only, self.ready = compile_only, ready
        self._waited = 0.0  # seconds spent waiting for ``wait_for`` in the current cell
        self.models: dict[str, torch.nn.Module] = {}
        self.ideals: dict[tuple[str, str], torch.nn.Module] = {}
        self.twins: dict[tuple[str, str], Twin] = {}
        self.compiled: dict[tuple, int] = {}  # (model, column, workload, batch) -> cell that compiled it
        self.plans = {name: sweep_plans(shape.layers, wide) for name, shape in shapes.items()}
        self.params = {name: meta_parameter_count(shape, part) for name, shape in shapes.items()}
        self.factor, self._estimated, self._spent = 1.0, 0.0, 0.0
        self.start = time.perf_counter() if start is None else start
        self.result: dict[str, Any] = dict(meta=run_meta(part, shapes, wide, command), models={}, rows=[],
                                           summary=[], cells=[], skipped=[], errors=[])

    # -- the loop

    def run(self, cells: list[Cell]) -> dict:
        for index, cell in enumerate(cells, 1):
            self.run_if_it_fits(index, len(cells), cell)
        self.result["meta"]["elapsed_s"] = self.elapsed()
        self.write()
        return self.result

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def run_if_it_fits(self, index: int, total: int, cell: Cell) -> None:
        name = cell.model
        guess = estimate_cell_s(cell, self.shapes[name], self.params[name], self.plans[name], self.part,
                                set(self.compiled), set(self.models))
        if not self.models and not self.compiled:
            guess += FIRST_COMPILE_S[_device_kind(self.part)]
        need = guess * self.factor
        label = f"[{index}/{total}] {cell.model} {cell.workload} batch {cell.batch}"
        if self.elapsed() + need > self.part.budget_s:
            reason = f"needs ~{need:.0f} s, {self.part.budget_s - self.elapsed():.0f} s of the budget left"
            self.result["skipped"].append(dict(cell=index, model=cell.model, workload=cell.workload,
                                               batch=cell.batch, columns=list(cell.columns), reason=reason))
            print(f"{label}: skipped ({reason})", flush=True)
            return
        print(f"{label} (tier {cell.tier}, ~{need:.0f} s; {self.elapsed():.0f} s elapsed): "
              f"{', '.join(cell.columns)}", flush=True)
        started = time.perf_counter()
        self.run_cell(index, cell)
        spent = time.perf_counter() - started - self._waited  # the estimates know nothing of waits
        self._estimated, self._spent = self._estimated + guess, self._spent + spent
        self.factor = min(max(self._spent / self._estimated, 0.5), 4.0)
        self.write()

    def run_cell(self, index: int, cell: Cell) -> None:
        before = _counter_snapshot()
        ids = token_ids(self.shapes[cell.model], cell, self.part)
        errors: list[dict] = []
        calls, compile_s = {}, {}
        for column in cell.columns:
            call, seconds = self.compiled_call(index, cell, column, ids, errors)
            if call is not None:
                calls[column] = call
                if seconds is not None:
                    compile_s[column] = seconds
        if self.ready is not None:
            self.ready.touch()
        if self.compile_only:
            self.result["cells"].append(dict(cell=index, model=cell.model, workload=cell.workload, batch=cell.batch,
                                             tier=cell.tier, columns=list(cell.columns), compile_s=compile_s,
                                             compile_only=True))
            self.result["errors"] += [dict(cell=index, model=cell.model, **e) for e in errors]
            return
        reps = self.part.reps[cell.workload.split("-")[0]]
        self._waited = self.wait()
        started = time.perf_counter()
        samples = measure(calls, reps, max(self.part.warmup - 1, 0), self.sync, errors)
        plans = self.plans[cell.model]
        rows = cell_rows(index, cell, samples, plans, compile_s, self.part)
        for row in rows:
            backend = self.twins[(cell.model, row["column"])].backend
            if backend is not None and backend.reports:
                row["report"] = repr(backend.reports[-1])
        summary = summarise(rows, plans, self.part)
        self.result["rows"] += rows
        self.result["summary"] += summary
        self.result["errors"] += [dict(cell=index, model=cell.model, workload=cell.workload, batch=cell.batch, **e)
                                  for e in errors]
        self.result["cells"].append(dict(
            cell=index, model=cell.model, workload=cell.workload, batch=cell.batch, tier=cell.tier,
            columns=list(cell.columns), compile_s=sum(compile_s.values()), waited_s=self._waited,
            measure_s=time.perf_counter() - started, counters=_counter_diff(before, _counter_snapshot())))
        print_cell(rows, summary)

    def compiled_call(self, index: int, cell: Cell, column: str, ids: torch.Tensor,
                      errors: list[dict]) -> tuple[Callable[[], dict] | None, float | None]:
        """The column's call for this cell, compiled (by calling it once) unless an earlier cell did."""
        key = (cell.model, column, cell.workload, cell.batch)
        try:
            twin = self.twin(cell.model, column)
        except Exception as error:  # noqa: BLE001 - recorded; the cell goes on without the column
            errors.append(dict(column=column, stage="build", error=f"{type(error).__name__}: {error}"))
            print(f"    {column}: could not build: {type(error).__name__}: {error}", flush=True)
            return None, None
        call = decode_call(twin, ids, self.part) if cell.workload == "decode" else prefill_call(twin, ids)
        threads = column_parts(column)[2]
        if threads is not None:
            call = with_threads(call, threads)
        if key in self.compiled:
            return call, None
        print(f"    compiling {column} ...", end="", flush=True)
        started = time.perf_counter()
        try:
            with torch.no_grad():
                call()
            self.sync()
        except Exception as error:  # noqa: BLE001 - recorded; the cell goes on without the column
            errors.append(dict(column=column, stage="compile", error=f"{type(error).__name__}: {error}"))
            print(f" failed: {type(error).__name__}: {error}", flush=True)
            return None, None
        seconds = time.perf_counter() - started
        print(f" {seconds:.1f} s", flush=True)
        self.compiled[key] = index
        return call, seconds

    # -- models and twins

    def model(self, name: str) -> torch.nn.Module:
        if name not in self.models:
            shape = self.shapes[name]
            started = time.perf_counter()
            self.models[name] = build_model(shape, self.part.device, self.part.dtype)
            self.result["models"][name] = model_entry(shape, self.params[name], self.plans[name], self.part)
            print(f"  built {name}: {self.params[name] / 1e6:.1f} M parameters, {shape.layers} layers, "
                  f"{time.perf_counter() - started:.1f} s", flush=True)
        return self.models[name]

    def twin(self, name: str, column: str) -> Twin:
        if (name, column) not in self.twins:
            kind, key, _ = column_parts(column)
            model = self.model(name)
            if kind == "ideal":
                if (name, key) not in self.ideals:
                    self.ideals[(name, key)] = without_saved_blocks(model, self.plans[name][key])
                model = self.ideals[(name, key)]
            kwargs, backend = compile_settings(column, self.plans[name], self.part)
            module = compiled_twin(model, dynamic=False, **kwargs)
            self.twins[(name, column)] = Twin(module, StepClock(module, self.part.device == "cuda"), backend)
        return self.twins[(name, column)]

    def wait(self) -> float:
        """Seconds spent waiting until ``wait_for`` exists (0 without one)."""
        if self.wait_for is None or self.wait_for.exists():
            return 0.0
        print(f"    waiting for {self.wait_for} before timing ...", end="", flush=True)
        started = time.perf_counter()
        while not self.wait_for.exists():
            time.sleep(0.5)
        waited = time.perf_counter() - started
        print(f" {waited:.0f} s", flush=True)
        return waited

    def sync(self) -> None:
        if self.part.device == "cuda":
            torch.cuda.synchronize()
            torch.compiler.cudagraph_mark_step_begin()  # each call is a new step for Inductor's graph trees

    # -- output

    def write(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        self.result["meta"]["elapsed_s"] = self.elapsed()
        path = self.out / f"{self.part.file_stem}.json"
        path.write_text(json.dumps(self.result, indent=2, default=str) + "\n")
        plot(self.result, self.part.base, self.out / f"{self.part.file_stem}.png")


def token_ids(shape: Shape, cell: Cell, part: Part) -> torch.Tensor:
    tokens = part.prompt if cell.workload == "decode" else part.prefill
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, shape.vocab, (cell.batch, tokens), generator=generator).to(part.device)


def meta_parameter_count(shape: Shape, part: Part) -> int:
    return parameter_count(build_model(shape, "meta", part.dtype))


def model_entry(shape: Shape, params: int, plans: dict[str, Plan], part: Part) -> dict:
    return dict(dataclasses.asdict(shape), params=params,
                weight_gib=params * torch.finfo(part.dtype).bits / 8 / 2**30,
                plans={key: plan_label(plan) for key, plan in plans.items()},
                ideal_layers={key: shape.layers - plan.saved_blocks for key, plan in plans.items()})


_COUNTERS = ("cqil", "inductor")


def _counter_snapshot() -> dict[str, dict[str, int]]:
    return {group: dict(counters[group]) for group in _COUNTERS}


def _counter_diff(before: dict, after: dict) -> dict[str, int]:
    """What changed in the cqil and inductor counters (captures, segments, fallbacks, cudagraph skips)."""
    out = {}
    for group in _COUNTERS:
        for name, value in after[group].items():
            if value != before[group].get(name, 0) and (group == "cqil" or "cudagraph" in name):
                out[f"{group}.{name}"] = value - before[group].get(name, 0)
    return out


def run_meta(part: Part, shapes: dict[str, Shape], wide: int, command: str) -> dict:
    if part.device == "cuda":
        device = torch.cuda.get_device_name()
    else:
        device = f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs"
    notes = [shape.note for shape in shapes.values() if shape.note]
    notes.append(f"decode: prompt of {part.prompt} tokens prefilled by the uncompiled forward (not timed), "
                 f"then {part.new_tokens} new tokens; ms per new token over the last {part.new_tokens - 1}")
    notes.append(f"ideal: each column ideal|P is the model without the blocks the plan saves, compiled like "
                 f"{part.ideal_like}; every ratio is against {part.base} in the same cell")
    return dict(
        command=command, date=time.strftime("%Y-%m-%d %H:%M"), part=part.name, small=part.small, device=device,
        torch=torch.__version__, transformers=transformers.__version__, cuda=torch.version.cuda,
        threads=torch.get_num_threads(), dtype=str(part.dtype).removeprefix("torch."), compiler=part.compiler,
        prompt=part.prompt, new_tokens=part.new_tokens, prefill=part.prefill, reps=part.reps,
        warmup=part.warmup, budget_s=part.budget_s, wide=wide, base=part.base, notes=notes)


# ------------------------------------------------------------------------------------------------ output


def print_cell(rows: list[dict], summary: list[dict]) -> None:
    for row in rows:
        forward = f", forward {row['forward_ms']:.3f} ms" if row.get("forward_ms") is not None else ""
        median = row["median_ms"]
        print(f"    {row['column']:<28} {median if median is None else f'{median:9.3f} ms'}"
              f" (p10 {row['p10_ms']:.3f}, p90 {row['p90_ms']:.3f}){forward}", flush=True)
    for s in summary:
        if "realised" in s:
            realised = "n/a" if s["realised"] is None else f"{s['realised']:.0%}"
            print(f"    {s['column']} {s['plan'].split(' (')[0]}: {s['reduction']:+.1%} vs {s['base']}, "
                  f"ideal {s['ideal_reduction']:+.1%}, realised {realised}", flush=True)


COLOURS = {"inductor": "silver", "inductor-graphs": "gray", "inductor-cpp": "gray", "cqil-local-graphs": "tab:green",
           "cqil-concurrent-graphs": "tab:blue", "cqil-concurrent": "tab:blue", "ideal": "tab:orange"}


def plot(result: dict, base: str, path: Path) -> None:
    """One panel per workload and batch: each column's median relative to the baseline ``base`` of its cell."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no PNG", flush=True)
        return
    latest = relative_times(result["rows"], base)
    panels = sorted({key[:2] for key in latest})
    if not panels:
        return
    fig, axes = plt.subplots(len(panels), 1, figsize=(11, 3.6 * len(panels)), squeeze=False)
    for ax, (workload, batch) in zip(axes[:, 0], panels):
        entries = {key[2:]: value for key, value in latest.items() if key[:2] == (workload, batch)}
        _bars(ax, entries)
        unit = "per new token" if workload == "decode" else "per forward"
        ax.set_ylabel(f"time {unit} / {base}")
        ax.set_title(f"{workload}, batch {batch} ({result['meta']['device']})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def replot(paths: Sequence[Path]) -> None:
    """Each JSON's PNG again (``plot``), e.g. for runs whose PNGs did not come back from the GPU machine."""
    for path in paths:
        result = json.loads(path.read_text())
        meta = result["meta"]
        base = meta.get("base") or ("inductor-cpp" if meta["part"] == "cpu" else "inductor-graphs")  # older runs
        plot(result, base, path.with_suffix(".png"))
        print(f"wrote {path.with_suffix('.png')}", flush=True)


def relative_times(rows: list[dict], base: str) -> dict[tuple, tuple[float, float, float]]:
    """(workload, batch, model, column) -> (median, p10, p90) over the baseline's median in the same cell,
    from the last cell that measured it."""
    bases = {r["cell"]: r["median_ms"] for r in rows if r["column"] == base and r["median_ms"]}
    return {(r["workload"], r["batch"], r["model"], r["column"]):
            tuple(r[k] / bases[r["cell"]] for k in ("median_ms", "p10_ms", "p90_ms"))
            for r in rows if r["cell"] in bases and r["median_ms"]}


def _bars(ax, entries: dict[tuple[str, str], tuple[float, float, float]]) -> None:
    """Bars grouped by model, one per column; p10-p90 as error bars; the wide plan hatched."""
    models = list(dict.fromkeys(model for model, _ in entries))
    columns = sorted({column for _, column in entries}, key=_column_order)
    width = 0.8 / len(columns)
    for j, column in enumerate(columns):
        found = [(i, entries[(model, column)]) for i, model in enumerate(models) if (model, column) in entries]
        xs = [i + (j - (len(columns) - 1) / 2) * width for i, _ in found]
        ys = [median for _, (median, _, _) in found]
        errors = [[m - lo for _, (m, lo, _) in found], [hi - m for _, (m, _, hi) in found]]
        kind, key, _ = column_parts(column)
        ax.bar(xs, ys, width, yerr=errors, label=column, color=COLOURS.get(kind, "k"),
               hatch="//" if key and key != "P2" else None, edgecolor="white", capsize=2)
    ax.axhline(1.0, color="k", lw=0.6)
    ax.set_xticks(range(len(models)), models)
    ax.legend(fontsize=7, ncol=4)


def _column_order(column: str) -> tuple:
    kind, key, threads = column_parts(column)
    order = ["inductor", "inductor-cpp", "inductor-graphs", "cqil-local-graphs", "cqil-concurrent",
             "cqil-concurrent-graphs", "ideal"]
    return (key, order.index(kind) if kind in order else len(order), -(threads or 1 << 16))


# --------------------------------------------------------------------------------------------- dry run


def dry_run(part: Part, shapes: dict[str, Shape], cells: list[Cell], plans: dict[str, dict[str, Plan]],
            wide: int) -> dict[str, int]:
    """Build every model on the meta device, check its plans and ideals, print the work list with estimates."""
    print(f"{part.name.upper()} sweep{' (small)' if part.small else ''}, dry run: models on the meta device, "
          f"{str(part.dtype).removeprefix('torch.')}, compiler {part.compiler}")
    params, total_gib = {}, 0.0
    print(f"{'model':<14} {'family':<6} {'layers':>6} {'params':>9} {'weights':>9}  plans (ideal layers)")
    for name, shape in shapes.items():
        model = build_model(shape, "meta", part.dtype)
        params[name] = parameter_count(model)
        check_plans(model, shape, plans[name], wide)
        gib = params[name] * torch.finfo(part.dtype).bits / 8 / 2**30
        total_gib += gib
        described = "; ".join(f"{key}: {plan_label(plan)} ({shape.layers - plan.saved_blocks})"
                              for key, plan in plans[name].items())
        print(f"{name:<14} {shape.family:<6} {shape.layers:>6} {params[name] / 1e6:>8.1f}M {gib:>7.2f}GiB  "
              f"{described}")
        if shape.note:
            print(f"{'':<14} note: {shape.note}")
    print(f"all models stay in memory: {total_gib:.1f} GiB of weights (ideals and twins share them)")
    print(f"\nwork list: {len(cells)} cells, budget {part.budget_s:.0f} s; the estimates are guesses (compiles "
          f"dominate) that a run scales by what it measured")
    print(f"{'#':>3} {'tier':>4} {'model':<14} {'workload':<12} {'batch':>5} {'est s':>6} {'total':>6}  columns")
    fits, planned = 0, schedule(cells, shapes, params, plans, part)
    for index, (cell, seconds, total) in enumerate(planned, 1):
        within = total <= part.budget_s
        fits += within
        print(f"{index:>3} {cell.tier:>4} {cell.model:<14} {cell.workload:<12} {cell.batch:>5} {seconds:>6.0f} "
              f"{total:>6.0f}{' ' if within else '*'} {', '.join(cell.columns)}")
    estimate = planned[-1][2] if planned else 0.0
    print(f"\nestimated time for every cell: {estimate:.0f} s; within the budget by this estimate: {fits} of "
          f"{len(cells)} cells (* = expected to be skipped)")
    return params


def check_plans(model: torch.nn.Module, shape: Shape, plans: dict[str, Plan], wide: int) -> None:
    """Every plan is legal for the model, and its ideal has the blocks it should; raise if not."""
    num_blocks = len(decoder_layers(model))
    if num_blocks != shape.layers:
        raise RuntimeError(f"{shape.name}: built {num_blocks} decoder blocks, expected {shape.layers}")
    for parallel in (2, wide):
        key = f"P{parallel}"
        if key not in plans:
            raise RuntimeError(f"{shape.name}: no uniform P={parallel} plan fits {num_blocks} blocks; "
                               f"change --wide or --big-layers")
        plan = plans[key]
        CQILConfig(plan=plan).plan_for(num_blocks)  # the backend's own check
        if any(len(g) != parallel for g in plan.groups) or plan.bypass:
            raise RuntimeError(f"{shape.name}: {plan} is not a uniform P={parallel} D0 plan")
        ideal_blocks = len(decoder_layers(without_saved_blocks(model, plan)))
        if ideal_blocks != num_blocks - plan.saved_blocks:
            raise RuntimeError(f"{shape.name}: the ideal of {plan} has {ideal_blocks} blocks, "
                               f"expected {num_blocks - plan.saved_blocks}")


# ------------------------------------------------------------------------------------------------ main


def parse_args(argv: Sequence[str] | None) -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "sweep",
                        help="directory for the JSON and PNG (default: benchmarks/results/sweep)")
    parser.add_argument("--cpu", action="store_true", help="the many-core CPU part instead of the GPU part")
    parser.add_argument("--cpu-small", action="store_true",
                        help="tiny models on this CPU, the same code paths (to debug without a GPU)")
    parser.add_argument("--dry-run", action="store_true",
                        help="models on the meta device, plans checked, the work list and estimated time")
    parser.add_argument("--models", nargs="+", metavar="NAME",
                        help=f"a subset of {', '.join(SHAPES)} (or {', '.join(TINY_SHAPES)} with --cpu-small)")
    parser.add_argument("--batches", nargs="+", type=int, metavar="B", help="batch sizes (GPU: 1 8; CPU: 1)")
    parser.add_argument("--workloads", nargs="+", choices=("decode", "prefill"), default=["decode", "prefill"])
    parser.add_argument("--wide", type=int, choices=(3, 4), default=4, help="P of the second plan (default 4)")
    parser.add_argument("--big-layers", type=int, default=16, metavar="N",
                        help="layers built of the 8B shape's 32 (default 16; the output says so)")
    parser.add_argument("--budget-s", type=float, metavar="S",
                        help="skip cells that would end after S seconds (GPU 480, CPU 300, small 80)")
    parser.add_argument("--reps", type=int, metavar="N", help="timed repetitions per column (GPU 10/20, CPU 5/7)")
    parser.add_argument("--compiler", choices=("inductor", "aot_eager", "eager"),
                        help="inductor, or a light backend to debug the script (default: eager with --cpu-small)")
    parser.add_argument("--threads", type=int, metavar="N",
                        help="CPU threads (default: every core; 1 with --cpu-small)")
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), help="GPU bfloat16, CPU float32 by default")
    parser.add_argument("--columns", nargs="+", metavar="COLUMN",
                        help="only these columns of each cell, e.g. inductor-cpp 'cqil-concurrent|P2' 'ideal|P2'")
    parser.add_argument("--wait-for", type=Path, metavar="FILE",
                        help="compile each cell's columns, then wait until FILE exists before timing them "
                             "(to compile while another job on the machine times, and time alone)")
    parser.add_argument("--ready", type=Path, metavar="FILE",
                        help="create FILE when a cell's columns have compiled, before --wait-for's wait (so another "
                             "process can wait until this one has compiled)")
    parser.add_argument("--compile-only", action="store_true",
                        help="compile each cell's columns and time nothing: run beside other such processes to "
                             "fill Inductor's on-disk caches in parallel, so the timed run's compiles are cache hits")
    parser.add_argument("--replot", nargs="+", type=Path, metavar="JSON",
                        help="only draw the PNG of each sweep JSON again, beside it")
    args = parser.parse_args(argv)
    check_args(parser, args)
    return parser, args


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    known = TINY_SHAPES if args.cpu_small else {n: SHAPES[n] for n in CPU_SHAPES} if args.cpu else SHAPES
    unknown = [m for m in args.models or () if m not in known]
    if unknown:
        parser.error(f"--models: unknown {', '.join(unknown)}; this part has {', '.join(known)}")
    if args.batches is not None and any(b < 1 for b in args.batches):
        parser.error(f"--batches must be positive integers, got {args.batches}")
    if args.reps is not None and args.reps < 2:
        parser.error(f"--reps must be at least 2 (p10/p90 need two samples), got {args.reps}")
    if args.budget_s is not None and args.budget_s <= 0:
        parser.error(f"--budget-s must be positive, got {args.budget_s}")
    if not 4 <= args.big_layers <= 32:
        parser.error(f"--big-layers must be between 4 and 32 (the 8B shape has 32), got {args.big_layers}")
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be at least 1, got {args.threads}")
    if args.threads is not None and not (args.cpu or args.cpu_small):
        parser.error("--threads applies to the CPU part (--cpu or --cpu-small)")
    missing = [str(path) for path in args.replot or () if not path.is_file()]
    if missing:
        parser.error(f"--replot: no such file {', '.join(missing)}")
    columns = set(CPU_CORE + GPU_CORE + GPU_CONTEXT) | {f"{kind}|P{args.wide}" for kind in (
        "cqil-concurrent", "cqil-concurrent-graphs", "ideal")}
    unknown = sorted(c for c in args.columns or () if c.partition("@")[0] not in columns
                     or c.partition("@")[1] and not c.partition("@")[2].isdigit())
    if unknown:
        parser.error(f"--columns: unknown {', '.join(unknown)}; known: {', '.join(sorted(columns))}, each "
                     f"with @THREADS on the CPU")
    threaded = [c for c in args.columns or () if "@" in c]
    if threaded and not (args.cpu or args.cpu_small):
        parser.error(f"--columns {' '.join(threaded)}: @THREADS applies to the CPU part (--cpu or --cpu-small)")
    if any(int(c.partition("@")[2]) < 1 for c in threaded):
        parser.error(f"--columns {' '.join(threaded)}: @THREADS must be at least 1")
    if not (args.replot or args.dry_run or args.cpu or args.cpu_small or torch.cuda.is_available()):
        parser.error("no CUDA device here: run the GPU part on a GPU machine; here use --dry-run, "
                     "--cpu (the CPU part) or --cpu-small (tiny models, to debug)")


def keep_every_compile() -> None:
    """Every column is its own compile of the same ``forward``: Dynamo must keep them all, and raise
    rather than run a column eagerly when it cannot."""
    for name, value in (("recompile_limit", 1024), ("cache_size_limit", 1024), ("accumulated_recompile_limit", 8192),
                        ("accumulated_cache_size_limit", 8192), ("fail_on_recompile_limit_hit", True)):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, value)


def main(argv: Sequence[str] | None = None) -> dict | None:
    _, args = parse_args(argv)
    if args.replot:
        replot(args.replot)
        return None
    part = make_part(args)
    shapes = selected_shapes(args)
    batches = args.batches or ([1, 8] if part.name == "gpu" and not part.small else [1])
    plans = {name: sweep_plans(shape.layers, args.wide) for name, shape in shapes.items()}
    work = gpu_work if part.name == "gpu" else cpu_work
    cells = restrict(work(part, shapes, batches, args.wide), args.workloads, plans, args.columns)
    if args.dry_run:
        dry_run(part, shapes, cells, plans, args.wide)
        return None
    if part.device == "cpu":  # --cpu-small: one thread, its timings are not the point on a shared machine
        torch.set_num_threads(args.threads or (1 if part.small else os.cpu_count() or 1))
    keep_every_compile()
    command = "python benchmarks/gpu_sweep.py " + " ".join(sys.argv[1:] if argv is None else argv)
    print(f"{part.name} sweep: {len(cells)} cells, budget {part.budget_s:.0f} s, "
          f"{part.device} {str(part.dtype).removeprefix('torch.')}, threads {torch.get_num_threads()}", flush=True)
    result = Sweep(part, shapes, args.wide, args.out, command, start=STARTED, wait_for=args.wait_for,
                   compile_only=args.compile_only, ready=args.ready).run(cells)
    done = len(result["cells"])
    if args.compile_only:
        print(f"done in {result['meta']['elapsed_s']:.0f} s: {done} cells compiled (nothing timed), "
              f"{len(result['skipped'])} skipped, {len(result['errors'])} errors", flush=True)
        return result
    print(f"done in {result['meta']['elapsed_s']:.0f} s: {done} cells measured, {len(result['skipped'])} skipped, "
          f"{len(result['errors'])} errors; wrote {args.out / part.file_stem}.json and .png", flush=True)
    return result


if __name__ == "__main__":
    main()
