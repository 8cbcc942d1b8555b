"""Bypass distance 0 against 1 for corrected plans, on held-out text.

    python docs/notes/studies/bypass_corrected.py --out docs/notes/studies/results/bypass-corrected.json

The searched SmolLM2 plans of docs/notes/quality-notes.md (4 and 6 saved, found by the KL beam search at D = 0)
and S12-E28, each at D = 0 and D = 1, with the corrections the backend's search fits (scale and bias, on
every other batch of the 2,048 tokens SmolLM2 writes itself, seed 0): the perplexity change on the
licence texts uncorrected and corrected, and the corrected plan's in-context copying. D = 1 feeds each
pair's first member's attention output into its second member's MLP; in concurrent mode that is a
second rendezvous per group (docs/notes/performance.md).
"""

from __future__ import annotations

import time

from held_out import SEARCHED_PLANS, record, smollm2_study, study_arguments, write

from cqil_fx.eager.correction import fit_corrections
from cqil_fx.eager.quality import measure_copying, perplexity
from cqil_fx.config import Plan


def main() -> None:
    args = study_arguments(__doc__, "docs/notes/studies/results/bypass-corrected.json")
    model, _, fit, held, base = smollm2_study(args.held_out)
    result = {"date": time.strftime("%Y-%m-%d"), "held_out_tokens": 256 * args.held_out, "rows": []}
    for name, groups in SEARCHED_PLANS.items():
        for bypass in (0, 1):
            t = time.perf_counter()
            plan = Plan(len(model.model.layers), groups, bypass)
            corrected = fit_corrections(model, plan, fit)
            row = dict(plan=name, groups=groups, bypass=bypass,
                       uncorrected=perplexity(model, held, plan=plan) / base - 1,
                       corrected=perplexity(model, held, plan=corrected) / base - 1,
                       copying=measure_copying(model, corrected), seconds=time.perf_counter() - t)
            record(result, row)
    write(result, args.out)


if __name__ == "__main__":
    main()
