"""Compile time in a fresh process: ``backend="cqil"`` against plain ``torch.compile``.

    python benchmarks/compile_time.py --reps 6 --out benchmarks/results/default/compile-time-plan-step.json

What a user waits for when a second process compiles a model planned ahead:
first one process runs the explicit step, ``cqil_fx.plan(model)``, into a plan
cache of its own (a fresh temporary directory, so the plan is searched and
recorded as the one chosen for these weights); then each repetition starts one
Python process per backend (order alternating), loads SmolLM2-135M, and times
``torch.compile(model, backend=...)`` plus the first call on a 16-token
forward (Dynamo's tracing, the backend, the first run). Both backends pay
Inductor's import inside that interval (plain does it in ``torch.compile()``,
cqil at its first compile). One untimed round first fills Inductor's caches,
so the timed rounds measure warm caches, the state a second process finds; every cqil process checks that its graph took the
chosen plan (report source ``chosen``). Reported: medians and the
per-repetition ratio ``cqil / plain`` with its p10/p90.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

from cqil_fx.tools.timing import Summary, median, ratios, time_interleaved

sys.path.insert(0, str(Path(__file__).resolve().parent))
from parts import python_child  # noqa: E402

CHILD = """
import json, sys, time
import torch
from cqil_fx.tools.models import load_smollm2
model, _ = load_smollm2()
ids = torch.randint(0, 1000, (1, 16), generator=torch.Generator().manual_seed(0))
start = time.perf_counter()
compiled = torch.compile(model, backend=sys.argv[1])
with torch.no_grad():
    compiled(ids)
seconds = time.perf_counter() - start
if sys.argv[1] == "cqil":
    from cqil_fx import cqil_backend
    sources = {r.source for r in cqil_backend.reports}
    if sources != {"chosen"}:
        raise SystemExit(f"the backend did not take the chosen plan: report sources {sources}")
print(json.dumps({"seconds": seconds}))
"""
PLAN_STEP = """
import cqil_fx
from cqil_fx.tools.models import load_smollm2
model, _ = load_smollm2()
print(cqil_fx.plan(model))
"""
BACKENDS = ("cqil", "inductor")


def first_call_seconds(backend: str, env: dict[str, str]) -> float:
    return json.loads(python_child(f"the {backend} process", CHILD, backend, env=env))["seconds"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=6)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", help="write the result as JSON to this file")
    args = parser.parse_args()
    if args.reps < 2 or args.threads < 1:
        parser.error("--reps must be at least 2 and --threads at least 1")
    cache = tempfile.mkdtemp(prefix="cqil-compile-time-plans-")
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), CQIL_FX_PLAN_CACHE=cache)
    print(f"the explicit step, cqil_fx.plan(model), into {cache} ...", flush=True)
    plan = python_child("cqil_fx.plan", PLAN_STEP, env=env)
    print(plan, flush=True)

    def child(backend: str):
        def run() -> float:
            seconds = first_call_seconds(backend, env)
            print(f"{backend}: {seconds:.2f} s", flush=True)
            return seconds

        return run

    # the warm-up round fills Inductor's caches; each child times itself, so the
    # seconds are its results (compile and first call), not the interleaver's wall time per process
    times = time_interleaved({b: child(b) for b in BACKENDS}, args.reps, warmup=1).results
    spread = Summary.of(ratios(times["cqil"], times["inductor"]))
    result = {
        "threads": args.threads, "reps": args.reps, "plan": plan, "seconds": times,
        "median_s": {b: median(v) for b, v in times.items()},
        "cqil_over_plain": spread.median, "cqil_over_plain_p10_p90": (spread.p10, spread.p90),
    }
    lo, hi = result["cqil_over_plain_p10_p90"]
    print(f"compile + first call, median: cqil {result['median_s']['cqil']:.2f} s, "
          f"plain {result['median_s']['inductor']:.2f} s; cqil / plain {result['cqil_over_plain']:.3f} "
          f"(p10-p90 {lo:.3f}-{hi:.3f})")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
