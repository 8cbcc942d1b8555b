"""What a cell of the sweep is guessed to cost, so that the run can skip what would not fit its budget."""

from __future__ import annotations

import torch

from cqil_fx import Plan

from .shapes import Shape
from .work import Cell, Part, column_parts

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
    compiled, built, total, out = set(), set(), FIRST_COMPILE_S[device_kind(part)], []
    for cell in cells:
        seconds = estimate_cell_s(cell, shapes[cell.model], params[cell.model], plans[cell.model], part,
                                  compiled, built)
        total += seconds
        out.append((cell, seconds, total))
        built.add(cell.model)
        compiled.update((cell.model, c, cell.workload, cell.batch) for c in cell.columns)
    return out


def device_kind(part: Part) -> str:
    return "cuda" if part.device == "cuda" else "cpu"
