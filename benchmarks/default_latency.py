"""backend="cqil" with no arguments against what a user would pick instead, on SmolLM2-135M, one process.

    python benchmarks/default_latency.py --out benchmarks/results/default     # JSON + PNG

Columns, all compiled with ``dynamic=False`` on the same threads and called
interleaved (each column once per repetition, the order rotated each
repetition: ``cqil_fx.tools.timing``), medians with p10/p90:

* ``plain``: ``torch.compile(model)`` (Inductor);
* ``plain-cpp``: the same with Inductor's C++ wrapper (what concurrent mode's
  segments use, so the part of the result that is that setting shows);
* ``cqil``: ``torch.compile(model, backend="cqil")``: the measured default
  plan (searched at the first compile, or from the plan cache) in the mode
  "auto" picks;
* ``ideal``: the model with the blocks the plan saves removed, compiled like
  ``plain`` (what a perfectly concurrent run of the plan would cost);
* with ``--plans FILE...``, one column per plan JSON (``cqil-fx correct --out``,
  ``Plan.save``), compiled with ``make_backend(plan=...)`` in the mode "auto"
  picks: e.g. a plan with and without its low-rank terms, for their run-time
  cost. ``cqil_over_plain`` and ``realised`` stay those of ``cqil``.

Workloads: a 256-token prefill and a 1-token forward (no cache). The ratio
``cqil / plain`` is reported per repetition as well, with its p10/p90, and the
first compile of each column is timed.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from pathlib import Path

import torch

from cqil_fx import Plan, cqil_backend, make_backend
from cqil_fx.stack import without_blocks
from cqil_fx.tools.generation import compiled_twin
from cqil_fx.tools.models import load_smollm2
from cqil_fx.tools.timing import Summary, time_interleaved

sys.path.insert(0, str(Path(__file__).resolve().parent))
from parts import inductor, save_figure  # noqa: E402

WORKLOADS = {"prefill-256": 256, "decode-1": 1}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS))
    parser.add_argument("--plans", nargs="*", default=[], metavar="FILE", help="plan JSON files, a column each")
    parser.add_argument("--out", default="benchmarks/results/default")
    args = parser.parse_args()
    if args.reps < 3:
        parser.error("--reps must be >= 3 (p10/p90 need a few samples)")
    missing = [path for path in args.plans if not Path(path).is_file()]
    if missing:
        parser.error(f"--plans: no such file: {', '.join(missing)}")
    torch._dynamo.config.recompile_limit = 64
    model, _ = load_smollm2()
    columns = {"plain": compiled_twin(model, inductor(False), dynamic=False),
               "plain-cpp": compiled_twin(model, inductor(True), dynamic=False),
               "cqil": compiled_twin(model, cqil_backend, dynamic=False)}
    for path in args.plans:
        columns[Path(path).stem] = compiled_twin(model, make_backend(plan=Plan.load(path)), dynamic=False)
    result = {"threads": torch.get_num_threads(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
              "reps": args.reps, "workloads": {}}
    for workload in args.workloads:
        ids = torch.arange(WORKLOADS[workload])[None] % model.config.vocab_size
        compile_s = {}
        with torch.no_grad():
            for name, fn in columns.items():
                t = time.perf_counter()
                fn(ids, use_cache=False)
                compile_s[name] = time.perf_counter() - t
            report = cqil_backend.reports[-1]
            saved = [i for g in report.plan.groups for i in g[1:]] if report.fallback is None else []
            if "ideal" not in columns:
                columns["ideal"] = compiled_twin(without_blocks(model, saved), inductor(False), dynamic=False)
            t = time.perf_counter()
            columns["ideal"](ids, use_cache=False)
            compile_s["ideal"] = time.perf_counter() - t
            timings = time_interleaved({name: functools.partial(fn, ids, use_cache=False)
                                        for name, fn in columns.items()}, args.reps, warmup=0)
        med = timings.medians()
        spread = {name: timings.summary(name) for name in columns}
        ratio = Summary.of(timings.ratios("cqil", "plain"))
        result["workloads"][workload] = {
            "plan": repr(report.plan), "plan_source": report.source, "mode": report.mode,
            "median_ms": med, "p10_p90_ms": {name: (s.p10, s.p90) for name, s in spread.items()},
            "cqil_over_plain": med["cqil"] / med["plain"], "cqil_over_plain_p10_p90": (ratio.p10, ratio.p90),
            "cqil_over_plain_cpp": med["cqil"] / med["plain-cpp"],
            "ideal_reduction": 1 - med["ideal"] / med["plain"],
            "realised": (1 - med["cqil"] / med["plain"]) / (1 - med["ideal"] / med["plain"])
            if med["ideal"] < med["plain"] else float("nan"),
            "first_call_s": compile_s}
        print(workload, json.dumps(result["workloads"][workload], indent=1), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "latency.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(result, out / "latency.png")
    print(f"wrote {out}/latency.json, latency.png")


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workloads = list(result["workloads"])
    fig, axes = plt.subplots(1, len(workloads), figsize=(4.5 * len(workloads), 4), squeeze=False)
    for ax, workload in zip(axes[0], workloads):
        data = result["workloads"][workload]
        names = list(data["median_ms"])
        ax.bar(names, [data["median_ms"][n] for n in names],
               yerr=[[data["median_ms"][n] - data["p10_p90_ms"][n][0] for n in names],
                     [data["p10_p90_ms"][n][1] - data["median_ms"][n] for n in names]],
               color=(["gray", "darkgray", "tab:blue"] + ["tab:purple"] * (len(names) - 4) + ["tab:green"])[:len(names)])
        ax.set_title(f"{workload}: cqil/plain {data['cqil_over_plain']:.3f}")
        ax.set_ylabel("ms (median, p10-p90)")
    save_figure(fig, path, f"SmolLM2-135M, {result['threads']} threads, torch {result['torch']}, {result['date']}")


if __name__ == "__main__":
    main()
