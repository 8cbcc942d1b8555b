"""One prepared sweep: CQIL against Inductor on one GPU across model sizes and batches, and on a many-core CPU.

    python benchmarks/gpu_sweep.py --out DIR             # GPU part: one CUDA GPU, about 8 minutes with compiles
    python benchmarks/gpu_sweep.py --cpu --out DIR       # CPU part: every core of this machine
    python benchmarks/gpu_sweep.py --dry-run [--cpu]     # no GPU: models on the meta device, plans checked,
                                                         # the work list and its estimated time
    python benchmarks/gpu_sweep.py --cpu-small [--cpu]   # the same code paths at tiny sizes on this CPU (< 2 min)
    python benchmarks/gpu_sweep.py --models smollm2-135m --batches 1 --workloads decode --budget-s 200
    python benchmarks/gpu_sweep.py --work missing --models llama-3.1-8b --big-layers 32   # what the leases left

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
interleaved: one call of each per repetition, the order rotated every
repetition, after warm-up; medians with p10/p90 (``cqil_fx.tools.timing``).

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
repository root, ``passes/`` as ``cqil_fx.passes``).  This file is the command
line; the sweep's parts are in ``benchmarks/sweep/`` (its ``__init__.py`` lists them).

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
import importlib.util
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

STARTED = time.perf_counter()  # the budget counts from here: imports and model builds included
ROOT = Path(__file__).resolve().parent.parent


if importlib.util.find_spec("cqil_fx") is None:
    sys.path.insert(0, str(ROOT))
# (cqil_fx serves passes/ as cqil_fx.passes itself in a checkout that is not installed.)
if str(ROOT / "benchmarks") not in sys.path:  # the sweep's parts (also when this file is loaded by path)
    sys.path.insert(0, str(ROOT / "benchmarks"))

# The sweep's parts, under the names this script has always offered (tests/test_gpu_sweep.py,
# benchmarks/gpu_probe.py).
from sweep.columns import StepClock, cache_argument, static_cache, with_threads  # noqa: E402, F401
from sweep.report import dry_run, replot  # noqa: E402
from sweep.runner import Sweep  # noqa: E402
from sweep.shapes import (  # noqa: E402, F401
    CPU_SHAPES, SHAPES, TINY_SHAPES, build_model, plan_label, sweep_plans, without_saved_blocks)
from sweep.work import (  # noqa: E402, F401
    CPU_CORE, GPU_CONTEXT, GPU_CORE, Cell, column_parts, cpu_work, gpu_work, make_part, missing_work, restrict,
    selected_shapes)


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
    parser.add_argument("--work", choices=("priority", "missing"), default="priority",
                        help="priority: every cell in priority order (default); missing: the GPU cells the first "
                             "two leases left (batch 8, the 8B shape, the P<wide> plan)")
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
    if args.work == "missing" and args.cpu:
        parser.error("--work missing lists GPU cells: run it without --cpu")
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
    work = missing_work if args.work == "missing" else gpu_work if part.name == "gpu" else cpu_work
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
