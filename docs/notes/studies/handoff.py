"""How fast two members start together on CPU: the OpenMP team against a thread pool.

    python docs/notes/studies/handoff.py                 # 300 interleaved steps of each
    python docs/notes/studies/handoff.py --steps 1000 --member-ms 0.5

One step is what a group step of ``mode="concurrent"`` does after a shared
segment: a two-thread ATen op (the "shared segment", which leaves the OpenMP
runtime's idle thread spinning), then two "members" of the same single-thread
work started together and waited for.  ``openmp-team`` starts them with
``cqil_fx.graph.omp_team.OpenMPTeam.run`` (a parallel region of the runtime's own
threads); ``thread-pool`` runs member 0 on the calling thread and member 1 on
a ``ThreadPoolExecutor`` worker (the executor's fallback).  The two variants
alternate step by step; medians are printed, in milliseconds:

* ``start``: from the hand-off until the later of the two members starts;
* ``tail``: from the later member's end until the caller has both results;
* ``step``: the whole step, against ``member`` (one member's own time).

A second comparison runs ``--run`` such steps back to back after one shared
op, as consecutive groups do: ``regions`` opens a parallel region per step
(``OpenMPTeam.run``), ``stages`` runs them as the stages of one region
(``OpenMPTeam.run_stages``, a barrier between steps).  ``step`` is then the
run's time divided by its steps, against ``member``.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import statistics
import time

import torch

from cqil_fx.graph.omp_team import openmp_team
from cqil_fx.tools.timing import median


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--member-ms", type=float, default=2.0, help="single-thread work per member (about)")
    parser.add_argument("--run", type=int, default=8, help="steps per run in the second comparison")
    args = parser.parse_args()
    if args.steps < 1 or args.member_ms <= 0 or args.run < 1:
        parser.error(f"--steps and --run must be >= 1 and --member-ms > 0 "
                     f"(got {args.steps}, {args.run} and {args.member_ms})")
    team = openmp_team()
    if team is None:
        raise SystemExit("no OpenMP runtime found in this process: nothing to compare")
    torch.set_num_threads(2)
    weight, x = torch.randn(2304, 576), torch.randn(1, 576)  # one SmolLM2 MLP projection, decode
    with torch.no_grad():
        repeats = calibrate(lambda: torch.mm(x, weight.t()), args.member_ms)
        work = lambda: [torch.mm(x, weight.t()) for _ in range(repeats)]  # noqa: E731

        def member():
            start = time.perf_counter()
            work()
            return start, time.perf_counter()

        pool = concurrent.futures.ThreadPoolExecutor(1, initializer=torch.set_num_threads, initargs=(1,))

        def on_pool():
            future = pool.submit(member)
            torch.set_num_threads(1)
            first = member()
            torch.set_num_threads(2)
            return [first, future.result()]

        def on_team():
            return [outcome.result() for outcome in team.run([member, member])]

        def regions():
            return [stamp for _ in range(args.run) for stamp in on_team()]

        def stages():
            return [outcome.result() for stage in team.run_stages([[member, member]] * args.run) for outcome in stage]

        samples = {"openmp-team": [], "thread-pool": [], "regions": [], "stages": []}
        for i in range(args.steps + 10):
            for name, run in (("openmp-team", on_team), ("thread-pool", on_pool)):
                work()  # the shared segment, on two threads
                t = time.perf_counter()
                stamps = run()
                done = time.perf_counter()
                if i >= 10:
                    starts, ends = [s for s, _ in stamps], [e for _, e in stamps]
                    samples[name].append(dict(start=max(starts) - t, tail=done - max(ends), step=done - t,
                                              member=statistics.mean(e - s for s, e in stamps)))
            if i % args.run == 0:  # as many steps of the second comparison as of the first
                for name, run in (("regions", regions), ("stages", stages)):
                    work()
                    t = time.perf_counter()
                    stamps = run()
                    done = time.perf_counter()
                    if i >= 10:
                        samples[name].append(dict(step=(done - t) / args.run,
                                                  member=statistics.mean(e - s for s, e in stamps)))
    result = {name: {k: round(median(s[k] for s in rows) * 1e3, 3) for k in rows[0]}
              for name, rows in samples.items()}
    print(json.dumps(dict(runtime=team.path, steps=args.steps, run=args.run, **result), indent=1))


def calibrate(op, target_ms: float) -> int:
    """How many calls of ``op`` on one thread take about ``target_ms``."""
    torch.set_num_threads(1)
    for _ in range(20):
        op()
    t = time.perf_counter()
    for _ in range(50):
        op()
    torch.set_num_threads(2)
    return max(1, round(target_ms / ((time.perf_counter() - t) / 50 * 1e3)))


if __name__ == "__main__":
    main()
