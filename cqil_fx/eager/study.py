"""The quality study behind ``cqil-fx eval``: CQIL plans vs layer removal at equal savings.

For a model, calibration batches (for planning and influence) and held-out
evaluation batches it measures the evaluation perplexity of

* the original model;
* uniform CQIL plans (P = 2 and 4, D = 0 and 1) over the default span;
* automatic plans (:func:`cqil_fx.eager.planner.plan_auto`) at several budgets;
* ShortGPT-style layer removal (drop the blocks of lowest influence,
  1 - cos(input, output), on the calibration split) at the same numbers of
  saved block-times;
* optionally, models recovered by distillation (:mod:`cqil_fx.eager.distill`) under
  their plans (:func:`recovered_rows`, ``cqil-fx eval --recovered DIR``),

and writes a JSON file, a Markdown table and a PNG of perplexity vs saved
block-times.
"""

from __future__ import annotations

import dataclasses
import json
import platform
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from ..config import CQILConfig, Plan, default_span
from ..planning import SimilarityReport
from ..progress import progress as _progress
from ..stack import decoder_layers
from .planner import plan_auto
from .quality import perplexity
from .similarity import save_heatmap


@dataclasses.dataclass(frozen=True)
class Row:
    name: str
    method: str  # "original" | "cqil" | "removal" | "recovered"
    saved_blocks: int
    detail: str
    perplexity: float


def run_study(model: nn.Module, calibration: Sequence[torch.Tensor], evaluation: Sequence[torch.Tensor],
              budgets: Sequence[float] = (0.05, 0.10, 0.20), screen: int = 16,
              recovered: Sequence[tuple[nn.Module, Plan]] = ()) -> tuple[list[Row], SimilarityReport]:
    """Measure every row of the study (see module docs); minutes on a 135M model and 2 cores.

    ``recovered``: (distilled model, its plan) pairs measured as "recovered" rows.
    Returns the rows and the calibration similarity report (for the heatmap)."""
    num_blocks = len(decoder_layers(model))
    base = perplexity(model, evaluation)
    rows = [Row("original", "original", 0, "", base)]
    for parallel in (2, 4):
        start, end = default_span(num_blocks, parallel)
        if end - start < parallel:
            continue  # too few blocks for a uniform plan of this width
        for bypass in (0, 1):
            config = CQILConfig(start=start, end=end, parallel=parallel, bypass=bypass)
            plan = config.plan_for(num_blocks)
            rows.append(Row(f"uniform S{start}-E{end} P{parallel} D{bypass}", "cqil", plan.saved_blocks,
                            repr(plan), perplexity(model, evaluation, plan=plan)))
    similarity = None
    for budget in _progress(budgets, True, "automatic plans"):
        search = plan_auto(model, calibration, parallel=2, budget=budget, screen=screen, progress=False)
        similarity = search.similarity
        rows.append(Row(f"auto P2 budget +{budget:.0%}", "cqil", search.plan.saved_blocks, str(search),
                        perplexity(model, evaluation, plan=search.plan)))
    order = [int(i) for i in torch.argsort(similarity.influence)]  # least influential first
    for saved in sorted({r.saved_blocks for r in rows if r.saved_blocks} | {1, 2, 3}):
        removed = sorted(order[:saved])
        rows.append(Row(f"remove {saved} blocks", "removal", saved, f"blocks {removed}",
                        perplexity(model, evaluation, removed=removed)))
    return rows + recovered_rows(recovered, evaluation), similarity


def recovered_rows(recovered: Sequence[tuple[nn.Module, Plan]], evaluation: Sequence[torch.Tensor]) -> list[Row]:
    """One "recovered" row per (distilled model, plan): its held-out perplexity under the plan."""
    return [Row(f"recovered {plan_label(plan)}", "recovered", plan.saved_blocks, repr(plan),
                perplexity(model, evaluation, plan=plan)) for model, plan in recovered]


def plan_label(plan: Plan) -> str:
    """``S12-E28 P2 D0`` for a uniform plan, else its groups (``[3-4] [8-9] D1``)."""
    sizes = {len(g) for g in plan.groups}
    contiguous = all(a[-1] + 1 == b[0] for a, b in zip(plan.groups, plan.groups[1:]))
    if len(sizes) == 1 and contiguous:
        return f"S{plan.groups[0][0]}-E{plan.groups[-1][-1] + 1} P{sizes.pop()} D{plan.bypass}"
    return " ".join(f"[{g[0]}-{g[-1]}]" for g in plan.groups) + f" D{plan.bypass}"


def write_report(rows: Sequence[Row], similarity: SimilarityReport, out_dir: str | Path, command: str,
                 tokens: dict[str, int]) -> None:
    """quality.json, quality.md, quality.png and similarity.png in ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    meta = {
        "command": command,
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
        "tokens": tokens,
    }
    (out / "quality.json").write_text(json.dumps({"meta": meta, "rows": [dataclasses.asdict(r) for r in rows]},
                                                 indent=2) + "\n")
    _plot(rows, out / "quality.png")
    save_heatmap(similarity, str(out / "similarity.png"))
    (out / "quality.md").write_text(_markdown(rows, meta))


def _markdown(rows: Sequence[Row], meta: dict) -> str:
    base = rows[0].perplexity
    lines = [
        "# Quality: CQIL plans vs layer removal",
        "",
        f"Measured {meta['date']} on {meta['machine']} with",
        "",
        f"    {meta['command']}",
        "",
        f"Evaluation: {meta['tokens']['evaluation']} held-out tokens of the `evaluation` split of "
        f"`pydoc_data.topics`; planning and influence: {meta['tokens']['calibration']} tokens of the "
        "disjoint `calibration` split. Perplexities are computed with the eager reference semantics "
        "(the backend's compiled logits equal them; see tests/test_real_model.py).",
        "",
        "| plan | method | saved block-times | perplexity | change |",
        "|---|---|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r.name} | {r.method} | {r.saved_blocks} | {r.perplexity:.2f} | "
                     f"{r.perplexity / base - 1:+.1%} |")
    lines += ["", *_targets(rows), "", "![perplexity vs saved block-times](quality.png)", "",
              "Similarity of block inputs on the calibration split (the planner's ranking signal):", "",
              "![similarity heatmap](similarity.png)", "", "Plans:", ""]
    lines += [f"* {r.name}: {r.detail}" for r in rows if r.detail]
    return "\n".join(lines) + "\n"


def _targets(rows: Sequence[Row]) -> list[str]:
    """The training-free targets, checked against the rows."""
    base = rows[0].perplexity
    lines = ["Targets:", ""]
    auto = [r for r in rows if r.name.startswith("auto") and "+10%" in r.name]
    for r in auto:
        ok = r.saved_blocks >= 4 and r.perplexity <= 1.1 * base
        lines.append(f"* automatic plan, budget +10%: saves {r.saved_blocks} block-times at "
                     f"{r.perplexity / base - 1:+.1%} held-out perplexity (target: >= 4 at <= +10%): "
                     f"{'met' if ok else 'not met'}")
    removal = {r.saved_blocks: r.perplexity for r in rows if r.method == "removal"}
    for r in rows:
        if r.method == "cqil" and r.saved_blocks in removal:
            ratio = (r.perplexity - base) / (removal[r.saved_blocks] - base)
            lines.append(f"* {r.name}: perplexity increase is {ratio:.2f}x that of removing "
                         f"{r.saved_blocks} blocks (target: <= 0.10x): {'met' if ratio <= 0.1 else 'not met'}")
    for r in rows:
        if r.method == "recovered":
            change = r.perplexity / base - 1
            lines.append(f"* {r.name} (distilled): saves {r.saved_blocks} block-times at {change:+.1%} held-out "
                         f"perplexity (target: <= +10%): {'met' if change <= 0.1 else 'not met'}")
    return lines


def _plot(rows: Sequence[Row], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base = rows[0].perplexity
    fig, ax = plt.subplots(figsize=(7, 4.5))
    labels = {"cqil": "CQIL (training-free)", "recovered": "CQIL recovered (distilled)", "removal": "layer removal"}
    for method, style in (("cqil", "o"), ("recovered", "^"), ("removal", "s")):
        points = sorted((r.saved_blocks, r.perplexity) for r in rows if r.method == method)
        if points:
            ax.plot(*zip(*points), style, label=labels[method], linestyle="-" if method == "removal" else "none")
    ax.axhline(base, color="gray", linestyle=":", label=f"original ({base:.2f})")
    ax.axhline(base * 1.1, color="gray", linestyle="--", linewidth=0.8, label="original +10%")
    ax.set_yscale("log")
    ax.set_xlabel("saved block-times")
    ax.set_ylabel("held-out perplexity (log)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
