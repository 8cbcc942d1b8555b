"""What each part of the sweep measures: the GPU part and the many-core CPU part, their settings,
columns and work lists (cells in priority order)."""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Sequence

import torch

from cqil_fx import Plan

from .shapes import CPU_SHAPES, SHAPES, TINY_SHAPES, Shape


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


def missing_work(part: Part, shapes: dict[str, Shape], batches: Sequence[int], wide: int) -> list[Cell]:
    """The GPU cells the first two leases left (docs/notes/gpu-sweep.md, "Still to measure"), in order:
    batch-8 decode of the first small shape, the big shape's batch-1 decode, and batch-1 decode with the
    P<wide> plan on the last small shape; each against the baseline and the ideal (``--work missing``;
    ``--models`` picks which of them a process runs)."""
    decode = part.workloads[0]
    small = [n for n, s in shapes.items() if not s.big]
    big = [n for n, s in shapes.items() if s.big]
    wide_cols = (part.base, f"cqil-concurrent-graphs|P{wide}", f"ideal|P{wide}")
    tiers = [
        [(small[0], decode, 8, GPU_CORE)] if small else [],
        [(m, decode, 1, GPU_CORE) for m in big],
        [(small[-1], decode, 1, wide_cols)] if small else [],
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
