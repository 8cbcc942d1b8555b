"""Where a 1-token forward of quantized SmolLM2 spends its time, with and without concurrent CQIL.

    python docs/notes/studies/quantized_breakdown.py --out docs/notes/studies/results/quantized-breakdown.json

One process, 2 threads, ``dynamic=False``, interleaved (``cqil_fx.tools.timing``):

* float32, int8 weight-only and CPU int4 weight-only (``cqil_fx.tools.quant``) compiled plainly, in
  local mode and in concurrent mode with the default plan's groups ([14-15] [26-27]) and S12-E28;
* the LM head alone (final norm and the 576 x 49,152 projection) of each, compiled plainly;
* each run of the concurrent program (a shared segment, or a group's members side by side), timed
  inside ``ConcurrentProgram`` for float32 and int8.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import copy
import functools
import json
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from cqil_fx import CQILConfig, make_backend
from cqil_fx.graph import executor
from cqil_fx.tools.models import load_smollm2
from cqil_fx.tools.quant import quantize
from cqil_fx.tools.timing import Summary, time_interleaved

PLANS = {"default groups": [[14, 15], [26, 27]], "S12-E28": [[i, i + 1] for i in range(12, 28, 2)]}


class Head(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.norm, self.head = model.model.norm, model.lm_head

    def forward(self, hidden):
        return self.head(self.norm(hidden))


@contextlib.contextmanager
def timed_runs(on_call: Callable, on_members: Callable) -> Iterator[None]:
    """Within the block, every :class:`ConcurrentProgram` run is timed: ``on_call(program, call, seconds)``
    for each segment run (on whichever thread ran it), ``on_members(program, steps, seconds)`` for each run
    of consecutive member steps (on the calling thread)."""
    call, members = executor.ConcurrentProgram._run_call, executor.ConcurrentProgram._run_members

    def timed_call(self, env, c):
        started = time.perf_counter()
        call(self, env, c)
        on_call(self, c, time.perf_counter() - started)

    def timed_members(self, steps, env):
        started = time.perf_counter()
        members(self, steps, env)
        on_members(self, steps, time.perf_counter() - started)

    executor.ConcurrentProgram._run_call, executor.ConcurrentProgram._run_members = timed_call, timed_members
    try:
        yield
    finally:
        executor.ConcurrentProgram._run_call, executor.ConcurrentProgram._run_members = call, members


def per_run_ms(programs: dict, reps: int) -> dict:
    """Median ms of each run of each concurrent program (runs timed on the calling thread only)."""
    spent = collections.defaultdict(list)

    def on_call(program, c, seconds):
        if threading.current_thread() is threading.main_thread():
            spent[program.label, c.node.target].append(seconds)

    def on_members(program, steps, seconds):
        spent[program.label, "members " + " ".join(c.node.target for s in steps for c in s)].append(seconds)

    with timed_runs(on_call, on_members), torch.no_grad():
        for _ in range(reps):
            for label, fn in programs.items():
                executor.ConcurrentProgram.label = label
                fn()
    out = collections.defaultdict(dict)
    for (label, run), values in spent.items():
        out[label][run] = 1e3 * Summary.of(values).median
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=11)
    parser.add_argument("--out", default="docs/notes/studies/results/quantized-breakdown.json")
    args = parser.parse_args()
    torch._dynamo.config.recompile_limit = 128
    fp32, _ = load_smollm2()
    models = {"float32": fp32, "int8": quantize(copy.deepcopy(fp32), "int8-weight-only"),
              "int4": quantize(copy.deepcopy(fp32), "int4-weight-only")}
    ids, hidden = torch.arange(1)[None], torch.randn(1, 1, 576)
    calls = {}
    for name, model in models.items():
        calls[f"{name} plain"] = functools.partial(torch.compile(model, dynamic=False), ids, use_cache=False)
        calls[f"{name} LM head"] = functools.partial(torch.compile(Head(model), dynamic=False), hidden)
        for label, groups in PLANS.items():
            plan = CQILConfig(groups=groups).plan_for(30)
            for mode in ("local", "concurrent") if label == "default groups" else ("concurrent",):
                fn = torch.compile(copy.copy(model), backend=make_backend(plan, mode=mode), dynamic=False)
                calls[f"{name} {label} {mode}"] = functools.partial(fn, ids, use_cache=False)
    with torch.no_grad():
        for name, fn in calls.items():
            started = time.perf_counter()
            fn()
            print(f"compiled {name} in {time.perf_counter() - started:.0f} s", flush=True)
        timings = time_interleaved(calls, args.reps, warmup=1)
    result = {"date": time.strftime("%Y-%m-%d"), "threads": torch.get_num_threads(), "torch": torch.__version__,
              "reps": args.reps, "ms": {}, "per_run_ms": {}}
    for name in calls:
        s = timings.summary(name)
        result["ms"][name] = {"median": s.median, "p10": s.p10, "p90": s.p90}
        print(f"{name:40} {s.median:8.2f} ms ({s.p10:.2f}-{s.p90:.2f})")
    result["per_run_ms"] = per_run_ms({name: calls[f"{name} default groups concurrent"] for name in ("float32", "int8")},
                                      args.reps)
    for label, runs in result["per_run_ms"].items():
        print(label, {run: round(ms, 2) for run, ms in runs.items()}, f"sum {sum(runs.values()):.2f} ms")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
