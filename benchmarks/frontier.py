"""The trade at a glance: held-out quality cost against block-times saved, and the time per token it buys.

    python benchmarks/frontier.py                 # writes docs/results/frontier.png and frontier.json (~20 min)

Left: every row of the quality study (``docs/results/quality.json``, written
by ``cqil-fx eval --out docs/results``): the relative perplexity increase on
held-out licence text against the block-times each plan saves, for layer
removal, CQIL training-free, CQIL with fitted corrections and CQIL with the
shipped adapters (``adapters/``); the default plan (``backend="cqil"``) is
marked. Right: measured milliseconds per decoded token (greedy generation,
static cache, SmolLM2-135M-Instruct, this machine's threads, concurrent mode
where it runs) for the same plans and for the model with the same number of
blocks removed (the ideal a plan could reach), against the original compiled
plainly and with Inductor's C++ wrapper, each compiled with
``dynamic=False`` and called interleaved (``cqil_fx.tools.timing``).
"""

from __future__ import annotations

import argparse
import functools
import json
import re
import sys
import time
from pathlib import Path

import torch

from cqil_fx import CQILConfig, make_backend
from cqil_fx.stack import without_blocks
from cqil_fx.tools.generation import TokenClock, compiled_twin
from cqil_fx.tools.models import load_smollm2
from cqil_fx.tools.timing import Summary, time_interleaved

sys.path.insert(0, str(Path(__file__).resolve().parent))
from parts import inductor, save_figure  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
QUALITY = ROOT / "docs" / "results" / "quality.json"
# The rows timed: CQIL plans by their row in the quality study, removal by blocks saved.
TIMED_PLANS = ("default (backend=\"cqil\")", "uniform S20-E28 P2 D0", "uniform S12-E28 P2 D0")
TIMED_REMOVALS = (2, 4, 8)
PROMPT = "The licence allows you to"


def kind(row: dict) -> str:
    """The series a quality row belongs to."""
    if row["method"] == "removal":
        return "layer removal"
    if row["method"] == "recovered":
        return "CQIL + shipped adapters"
    if row["method"] == "original":
        return "original"
    return "CQIL corrected" if "corrected" in row["detail"] else "CQIL training-free"


def groups_of(detail: str) -> list[list[int]]:
    """The groups of a ``Plan`` repr: ``[12-13] [14-15]`` -> ``[[12, 13], [14, 15]]``."""
    head = detail.split("):")[0]  # a search's row goes on after the plan: "Plan(...): calibration ..."
    return [list(range(int(a), int(b) + 1)) for a, b in re.findall(r"\[(\d+)-(\d+)\]", head)]


def removed_of(detail: str) -> list[int]:
    return [int(i) for i in re.findall(r"\d+", detail)]


def per_token_ms(twin, ids, new_tokens: int) -> float:
    clock = TokenClock()
    with torch.no_grad():
        twin.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                      min_new_tokens=new_tokens, do_sample=False, cache_implementation="static",
                      pad_token_id=0, stopping_criteria=[clock])
    return clock.per_token_ms()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quality", default=str(QUALITY), help="the quality study's JSON")
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--out", default=str(ROOT / "docs" / "results"))
    args = parser.parse_args()
    if args.reps < 3 or args.new_tokens < 2:
        parser.error("--reps >= 3 and --new-tokens >= 2")
    study = json.loads(Path(args.quality).read_text())
    rows = {r["name"]: r for r in study["rows"]}
    base = rows["original"]["perplexity"]
    points = [{"name": r["name"], "series": kind(r), "saved": r["saved_blocks"],
               "cost": r["perplexity"] / base - 1, "default": r["name"].startswith("default")} for r in study["rows"]]

    torch._dynamo.config.recompile_limit = 64
    model, tokenizer = load_smollm2()
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    twins = {"original": compiled_twin(model, "inductor", dynamic=False),
             "original C++ wrapper": compiled_twin(model, inductor(True), dynamic=False)}
    timed = {"original": {"series": "original", "saved": 0, "cost": 0.0},
             "original C++ wrapper": {"series": "original", "saved": 0, "cost": 0.0}}
    for name in TIMED_PLANS:
        plan = CQILConfig(groups=groups_of(rows[name]["detail"])).plan_for(30)
        assert plan.saved_blocks == rows[name]["saved_blocks"], (name, plan)
        twins[name] = compiled_twin(model, make_backend(plan), dynamic=False)
        timed[name] = {"series": "CQIL", "saved": plan.saved_blocks, "cost": rows[name]["perplexity"] / base - 1,
                       "plan": repr(plan)}
    for k in TIMED_REMOVALS:
        row = rows[f"remove {k} blocks"]
        name = f"remove {k} blocks"
        twins[name] = compiled_twin(without_blocks(model, removed_of(row["detail"])), "inductor", dynamic=False)
        timed[name] = {"series": "layer removal (ideal)", "saved": k, "cost": row["perplexity"] / base - 1}
    calls = {name: functools.partial(per_token_ms, twin, ids, args.new_tokens) for name, twin in twins.items()}
    with torch.no_grad():
        for name, call in calls.items():
            t = time.perf_counter()
            call()
            timed[name]["first_call_s"] = time.perf_counter() - t
            print(f"compiled {name} in {timed[name]['first_call_s']:.0f} s", flush=True)
        timings = time_interleaved(calls, args.reps, warmup=1)
    for name in calls:
        summary = Summary.of(timings.results[name])
        ratio = Summary.of([a / b for a, b in zip(timings.results[name], timings.results["original"])])
        cpp = Summary.of([a / b for a, b in zip(timings.results[name], timings.results["original C++ wrapper"])])
        timed[name].update(ms=summary.median, p10=summary.p10, p90=summary.p90, ratio=ratio.median,
                           ratio_p10=ratio.p10, ratio_p90=ratio.p90, ratio_cpp=cpp.median, ratio_cpp_p10=cpp.p10,
                           ratio_cpp_p90=cpp.p90)
        print(f"{name:28} {summary.median:7.2f} ms/token ({summary.p10:.2f}-{summary.p90:.2f}), "
              f"{ratio.median:.3f} of the original ({ratio.p10:.3f}-{ratio.p90:.3f}), {cpp.median:.3f} of its C++ wrapper; "
              f"held-out perplexity {timed[name]['cost']:+.1%}", flush=True)
    result = {"date": time.strftime("%Y-%m-%d"), "threads": torch.get_num_threads(), "torch": torch.__version__,
              "quality_source": str(Path(args.quality).relative_to(ROOT)) if Path(args.quality).is_relative_to(ROOT)
              else args.quality, "quality_meta": study.get("meta", {}), "reps": args.reps,
              "new_tokens": args.new_tokens, "points": points, "timed": timed}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "frontier.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(result, out / "frontier.png")
    print(f"wrote {out / 'frontier.png'} and frontier.json")


COLORS = {"layer removal": "tab:red", "layer removal (ideal)": "tab:red", "CQIL training-free": "tab:orange",
          "CQIL corrected": "tab:blue", "CQIL + shipped adapters": "tab:green", "original": "black", "CQIL": "tab:blue"}


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8))
    for series in ("layer removal", "CQIL training-free", "CQIL corrected", "CQIL + shipped adapters"):
        pts = sorted((p for p in result["points"] if p["series"] == series), key=lambda p: p["saved"])
        left.plot([p["saved"] for p in pts], [100 * p["cost"] for p in pts], "o-" if series == "layer removal" else "o",
                  color=COLORS[series], label=series, alpha=0.85)
    for p in result["points"]:
        if p["default"]:
            left.plot(p["saved"], 100 * p["cost"], "*", ms=18, color="gold", mec="black", label="default (backend=\"cqil\")")
    left.axhline(10, color="gray", ls=":", lw=1)
    left.set_yscale("symlog", linthresh=10)
    left.set_ylim(bottom=0)
    left.set_xlabel("block-times saved (of 30)")
    left.set_ylabel("held-out perplexity increase, % (licence text)")
    left.set_title("quality cost: CQIL vs removing the blocks")
    left.legend(fontsize=8)
    timed = result["timed"]
    for series in ("layer removal (ideal)", "CQIL"):
        names = sorted((n for n, t in timed.items() if t["series"] == series), key=lambda n: timed[n]["saved"])
        if series == "CQIL":
            names = [n for n in names if not n.startswith("original")]
        right.errorbar([timed[n]["saved"] for n in names], [timed[n]["ms"] for n in names],
                       yerr=[[timed[n]["ms"] - timed[n]["p10"] for n in names],
                             [timed[n]["p90"] - timed[n]["ms"] for n in names]],
                       fmt="o-" if series != "CQIL" else "s", color=COLORS[series], label=series, capsize=3)
        for n in names:
            right.annotate(f"{100 * timed[n]['cost']:+.0f}%", (timed[n]["saved"], timed[n]["ms"]), fontsize=7,
                           xytext=(4, 4), textcoords="offset points")
    right.axhline(timed["original"]["ms"], color="black", ls="--", lw=1, label="original (plain torch.compile)")
    right.axhline(timed["original C++ wrapper"]["ms"], color="gray", ls=":", lw=1, label="original, C++ wrapper")
    default = next((n for n in timed if n.startswith("default")), None)
    if default:
        right.plot(timed[default]["saved"], timed[default]["ms"], "*", ms=18, color="gold", mec="black")
    right.set_xlabel("block-times saved (of 30)")
    right.set_ylabel("ms per decoded token (median, p10-p90)")
    right.set_title(f"time per token, {result['threads']} threads (labels: held-out cost)")
    right.legend(fontsize=8)
    save_figure(fig, path, f"SmolLM2-135M-Instruct, {result['date']}: quality from {result['quality_source']}, "
                           f"time measured by benchmarks/frontier.py")


if __name__ == "__main__":
    main()
