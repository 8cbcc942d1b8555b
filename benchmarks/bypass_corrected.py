"""Bypass distance 0 against 1 for corrected plans, on held-out text.

    python benchmarks/bypass_corrected.py --out benchmarks/results/bypass-corrected.json

The searched SmolLM2 plans of docs/quality-notes.md (4 and 6 saved, found by the KL beam search at D = 0)
and S12-E28, each at D = 0 and D = 1, with the corrections the backend's search fits (scale and bias, on
every other batch of the 2,048 tokens SmolLM2 writes itself, seed 0): the perplexity change on the
licence texts uncorrected and corrected, and the corrected plan's in-context copying. D = 1 feeds each
pair's first member's attention output into its second member's MLP; in concurrent mode that is a
second rendezvous per group (docs/performance.md).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from cqil_fx.eager.correction import fit_corrections
from cqil_fx.eager.planner import self_generated_text
from cqil_fx.eager.quality import measure_copying, perplexity
from cqil_fx.planning import Plan
from cqil_fx.tools.models import load_smollm2, token_batches

PLANS = {
    "4 saved, KL beam +20 %": ((5, 6), (17, 18), (22, 23), (25, 26)),
    "6 saved, KL beam +35 %": ((5, 6), (12, 13), (17, 18), (22, 23), (24, 25), (26, 27)),
    "S12-E28": tuple((i, i + 1) for i in range(12, 28, 2)),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--held-out", type=int, default=24, help="256-token windows of licence text")
    parser.add_argument("--out", default="benchmarks/results/bypass-corrected.json")
    args = parser.parse_args()
    model, tokenizer = load_smollm2()
    fit = self_generated_text(model, seed=0, progress=False)[::2]
    held = token_batches(tokenizer, "licenses", 256, args.held_out)
    base = perplexity(model, held)
    result = {"date": time.strftime("%Y-%m-%d"), "held_out_tokens": 256 * args.held_out, "rows": []}
    for name, groups in PLANS.items():
        for bypass in (0, 1):
            t = time.perf_counter()
            plan = Plan(len(model.model.layers), groups, bypass)
            corrected = fit_corrections(model, plan, fit)
            row = dict(plan=name, groups=groups, bypass=bypass,
                       uncorrected=perplexity(model, held, plan=plan) / base - 1,
                       corrected=perplexity(model, held, plan=corrected) / base - 1,
                       copying=measure_copying(model, corrected), seconds=time.perf_counter() - t)
            result["rows"].append(row)
            print(json.dumps(row), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
