"""What running a group's members side by side can win on this CPU: one block on all threads against
members on one thread each.

    python docs/notes/studies/member_scaling.py --out docs/notes/studies/results/member-scaling.json

CQIL keeps every block's work; on a CPU, concurrent mode runs a group's P members side by side on
T // P threads each instead of one after the other on T threads. It can only win what a block loses by
being spread over T threads. For SmolLM2-135M (real weights) in float32, with int8 weight-only weights
and float32 activations, and with int8 weight-only weights and bfloat16 activations, compiled with
S12-E28 P2 (a plan that measures the mechanism: +84-92 % held-out perplexity, docs/notes/quantized.md)
in concurrent mode (``dynamic=False``, 1-token forward, the threads of the process), this
times inside :class:`cqil_fx.graph.executor.ConcurrentProgram`:

* ``block_all_threads``: the first shared segment (embedding and blocks 0-11, on the calling thread with
  all threads) per block;
* ``member_side_by_side``: a member (one block on one thread), timed on whichever thread ran it, while
  the other member of its group runs beside it;
* ``member_alone``: the same member segments called one at a time on the calling thread with
  ``torch.set_num_threads(1)`` (their kernels were compiled for one thread);
* ``group_step``: a group's step (both members, hand-off and barrier included).

``best_share_of_ideal``: what a perfectly overlapped group could save (two blocks on all threads minus
one member alone) as a share of what the ideal saves (one block on all threads); ``measured_share``:
the same with the measured group step.
"""

from __future__ import annotations

import argparse
import collections
import copy
import json
import threading
import time
from pathlib import Path

import torch
from quantized_breakdown import timed_runs

from cqil_fx import CQILConfig, make_backend
from cqil_fx.graph import executor
from cqil_fx.tools.models import load_smollm2
from cqil_fx.tools.quant import quantize
from cqil_fx.tools.timing import Summary

PLAN = CQILConfig(start=12, end=28, parallel=2).plan_for(30)
FIRST_SHARED_BLOCKS = 12  # shared_0 holds the embedding and blocks 0-11


def timed_program(fn, ids, reps: int) -> tuple[dict, executor.ConcurrentProgram]:
    """Per-run times (s) of ``reps`` calls of ``fn``, by kind of run, and the program that ran them."""
    spent = collections.defaultdict(list)
    programs = []

    def on_call(program, c, seconds):
        programs.append(program)
        if not c.segment.shared:
            spent["member_side_by_side"].append(seconds)
        elif threading.current_thread() is threading.main_thread():
            spent[c.node.target].append(seconds)

    def on_members(program, steps, seconds):
        spent["group_step"].append(seconds / len(steps))

    with timed_runs(on_call, on_members), torch.no_grad():
        for _ in range(reps):
            fn(ids, use_cache=False)
    return spent, programs[-1]


def members_alone(program: executor.ConcurrentProgram, ids, fn, reps: int) -> list[float]:
    """Each member segment called on its own, on the calling thread with one intra-op thread (s)."""
    env = {}
    original = executor.ConcurrentProgram._store

    def keep(env_, c, value):  # the inputs every member sees, from one ordinary call
        original(env_, c, value)
        env.update(env_)

    executor.ConcurrentProgram._store = staticmethod(keep)
    try:
        with torch.no_grad():
            fn(ids, use_cache=False)
    finally:
        executor.ConcurrentProgram._store = staticmethod(original)
    calls = [c for step in program.steps for c in step if not c.segment.shared]
    times = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            for _ in range(reps):
                for c in calls:
                    args = [env[a] for a in c.node.args]
                    started = time.perf_counter()
                    c.fn(*args)
                    times.append(time.perf_counter() - started)
    finally:
        torch.set_num_threads(threads)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=21)
    parser.add_argument("--out", default="docs/notes/studies/results/member-scaling.json")
    args = parser.parse_args()
    fp32, _ = load_smollm2()
    models = {"float32": fp32,
              "int8 weights, float32 activations": quantize(copy.deepcopy(fp32), "int8-weight-only"),
              "int8 weights, bfloat16 activations": quantize(copy.deepcopy(fp32).to(torch.bfloat16),
                                                             "int8-weight-only")}
    ids = torch.arange(1)[None]
    result = {"date": time.strftime("%Y-%m-%d"), "threads": torch.get_num_threads(), "torch": torch.__version__,
              "plan": repr(PLAN), "reps": args.reps, "ms": {}}
    for name, model in models.items():
        fn = torch.compile(copy.copy(model), backend=make_backend(PLAN, mode="concurrent"), dynamic=False)
        with torch.no_grad():
            fn(ids, use_cache=False)  # compiles
        spent, program = timed_program(fn, ids, args.reps)
        ms = {"block_all_threads": 1e3 * Summary.of(spent["shared_0"]).median / FIRST_SHARED_BLOCKS,
              "member_side_by_side": 1e3 * Summary.of(spent["member_side_by_side"]).median,
              "member_alone": 1e3 * Summary.of(members_alone(program, ids, fn, args.reps)).median,
              "group_step": 1e3 * Summary.of(spent["group_step"]).median}
        block = ms["block_all_threads"]
        ms["best_share_of_ideal"] = (2 * block - ms["member_alone"]) / block
        ms["measured_share"] = (2 * block - ms["group_step"]) / block
        result["ms"][name] = ms
        print(name, {k: round(v, 3) for k, v in ms.items()}, flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
