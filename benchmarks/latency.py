"""Side-by-side latency of the original model and CQIL on SmolLM2-135M (CPU, Inductor).

    python benchmarks/latency.py                          # S12-E28, P=2, D=0
    python benchmarks/latency.py --workloads decode prefill-512 --reps 15

Columns, all compiled with Inductor and measured interleaved in one process
(one call of each per repetition, after warm-up; medians reported):

* ``original-1t``: the original model, one thread — the paper's baseline (a);
* ``original-2t``: the original model, two threads — what these two cores give (b);
* ``cqil-concurrent``: CQIL, ``mode="concurrent"``: shared segments on two
  threads, the two members of each group on two single-threaded workers.

Ideal reduction: a perfect CQIL removes (|G| - 1) block-times per group, so
``ideal = saved_blocks * t_block / t(a)`` with ``t_block = (t(a) - t_rest) / N``
and ``t_rest`` the time of the same model with no decoder blocks (embedding,
final norm, LM head), measured the same way.  "realised" is the measured
reduction against (a) divided by the ideal.

Writes ``benchmarks/results/latency.json`` (schema: {"meta": {...}, "rows":
[{"workload", "column", "median_ms", "p10_ms", "p90_ms"}], "summary": [{"workload",
"reduction_vs_1t", "reduction_vs_2t", "ideal", "realised"}]}) and ``latency.png``.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from cqil_fx import CQILConfig, make_backend
from cqil_fx.models import load_smollm2

WORKLOADS = {"decode": 1, "prefill-128": 128, "prefill-512": 512}
COLUMNS = ("original-1t", "original-2t", "cqil-concurrent")


def inductor_with_threads(threads: int):
    """An Inductor backend whose C++ kernels use ``threads`` OpenMP threads (a distinct Dynamo cache entry)."""
    from torch._inductor.compile_fx import compile_fx

    def backend(gm, example_inputs):
        with torch._inductor.config.patch({"cpp.threads": threads}):
            return compile_fx(gm, example_inputs)

    return backend


def model_without_blocks(model):
    rest = copy.deepcopy(model)
    rest.model.layers = torch.nn.ModuleList()
    rest.config.num_hidden_layers = 0
    return rest


def measure(fns: dict, ids: torch.Tensor, reps: int, warmup: int = 3, threads: dict | None = None,
            sync=lambda: None) -> dict[str, list[float]]:
    """Milliseconds per call of each fn, interleaved: one call of each per repetition."""
    times = {name: [] for name in fns}
    before = torch.get_num_threads()
    with torch.no_grad():
        for i in range(warmup + reps):
            for name, fn in fns.items():
                if threads:
                    torch.set_num_threads(threads[name])
                sync()
                t = time.perf_counter()
                fn(ids, use_cache=False)
                sync()
                if i >= warmup:
                    times[name].append((time.perf_counter() - t) * 1e3)
    torch.set_num_threads(before)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--start", type=int, default=12)
    parser.add_argument("--end", type=int, default=28)
    parser.add_argument("--bypass", type=int, default=0)
    parser.add_argument("--workloads", nargs="+", default=["decode", "prefill-512"], choices=list(WORKLOADS))
    parser.add_argument("--reps", type=int, default=11)
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    torch._dynamo.config.recompile_limit = 64

    model, _ = load_smollm2()
    rest = model_without_blocks(model)
    config = CQILConfig(start=args.start, end=args.end, parallel=2, bypass=args.bypass, mode="concurrent")
    plan = config.plan_for(len(model.model.layers))
    fns = {
        "original-1t": torch.compile(model, backend=inductor_with_threads(1), dynamic=False),
        "original-2t": torch.compile(model, backend=inductor_with_threads(2), dynamic=False),
        "cqil-concurrent": torch.compile(model, backend=make_backend(config), dynamic=False),
        "rest-1t": torch.compile(rest, backend=inductor_with_threads(1), dynamic=False),
    }
    threads = {"original-1t": 1, "original-2t": 2, "cqil-concurrent": 2, "rest-1t": 1}
    rows, summary = [], []
    for workload in args.workloads:
        ids = torch.randint(0, model.config.vocab_size, (1, WORKLOADS[workload]))
        t = time.perf_counter()
        measure(fns, ids, reps=0, warmup=1, threads=threads)  # compile everything for this shape
        print(f"{workload}: compiled in {time.perf_counter() - t:.0f} s", flush=True)
        times = measure(fns, ids, args.reps, threads=threads)
        med = {name: statistics.median(ts) for name, ts in times.items()}
        for name, ts in times.items():
            q = statistics.quantiles(ts, n=10)
            rows.append(dict(workload=workload, column=name, median_ms=med[name], p10_ms=q[0], p90_ms=q[-1]))
        t_block = (med["original-1t"] - med["rest-1t"]) / plan.num_blocks
        ideal = plan.saved_blocks * t_block / med["original-1t"]
        reduction = 1 - med["cqil-concurrent"] / med["original-1t"]
        summary.append(dict(workload=workload, reduction_vs_1t=reduction,
                            reduction_vs_2t=1 - med["cqil-concurrent"] / med["original-2t"],
                            ideal=ideal, realised=reduction / ideal if ideal else float("nan")))
        print(json.dumps(summary[-1]), {k: round(v, 2) for k, v in med.items()}, flush=True)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = dict(command="python benchmarks/latency.py " + " ".join(
        f"--{k} {' '.join(v) if isinstance(v, list) else v}" for k, v in vars(args).items() if k != "out"),
        date=time.strftime("%Y-%m-%d"), machine=f"{platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}", plan=repr(plan))
    (out / "latency.json").write_text(json.dumps(dict(meta=meta, rows=rows, summary=summary), indent=2) + "\n")
    plot(rows, out / "latency.png")
    print(f"wrote {out}/latency.json and latency.png")


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workloads = list(dict.fromkeys(r["workload"] for r in rows))
    fig, axes = plt.subplots(1, len(workloads), figsize=(4.5 * len(workloads), 3.8))
    for ax, workload in zip(axes if len(workloads) > 1 else [axes], workloads):
        data = [r for r in rows if r["workload"] == workload and r["column"] in COLUMNS]
        ax.bar([r["column"] for r in data], [r["median_ms"] for r in data], color=["gray", "silver", "tab:blue"])
        ax.set_title(workload)
        ax.set_ylabel("median latency (ms)")
        ax.tick_params(axis="x", rotation=20)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
