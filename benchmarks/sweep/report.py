"""What the sweep reports: rows and ratios from the timings, the printout, the plot, and the dry run."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import torch

from cqil_fx import Plan
from cqil_fx.tools.timing import Summary, median

from .estimates import schedule
from .shapes import Shape, build_model, check_plans, parameter_count, plan_label
from .work import Cell, Part, column_parts


def spread(values: list[float]) -> dict[str, float]:
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return {"median_ms": None, "p10_ms": None, "p90_ms": None}
    summary = Summary.of(values)
    return {"median_ms": summary.median, "p10_ms": summary.p10, "p90_ms": summary.p90}


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
                       forward_p90_ms=forward["p90_ms"], call_ms=median(c["call_ms"] for c in calls))
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
