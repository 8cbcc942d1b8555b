"""Study: what the affine group correction is fitted towards, and in which order the groups are fitted.

    python docs/notes/studies/correction_targets.py --out docs/notes/studies/results/correction-targets.json

``fit_corrections`` fits every group's scale and bias in one pass, the other
groups uncorrected, towards ``seq(x)``: the group's blocks one after the other
on the group's own input x. Two alternatives, each with the same least squares
(:class:`~cqil_fx.eager.correction.NormalEquations`), on the text the backend's
search fits on (every other batch of the 2,048 tokens SmolLM2 writes itself,
seed 0), held out on the licence texts:

* ``sequential``: group by group, each on activations of the plan with the
  earlier groups already corrected (what the correction meets at run time);
* ``trajectory``: towards the original model's residual stream after the
  group's last block, so that a group's correction also undoes what the
  earlier groups left (``mix`` of it and ``seq(x)``: 0.5 and 1).

Plans: the searched 4- and 6-saved plans of docs/notes/quality-notes.md and S12-E28,
all at D = 0. An eager study; nothing here is a plan option.
"""

from __future__ import annotations

import dataclasses
import time

import torch
from held_out import SEARCHED_PLANS, record, smollm2_study, study_arguments, write

from cqil_fx.eager.correction import NormalEquations, fit_corrections, group_activations
from cqil_fx.eager.quality import perplexity
from cqil_fx.eager.reference import resolve_plan
from cqil_fx.eager.replay import BlockOutputs
from cqil_fx.config import Plan


def sequential(model, plan: Plan, batches: list) -> Plan:
    """Group g's correction fitted with groups 0..g-1 corrected (as fitted here) and the rest not."""
    fitted: list = []
    for g in range(len(plan.groups)):
        partial = dataclasses.replace(plan, corrections=tuple(fitted) + (None,) * (len(plan.groups) - g))
        equations = None
        for group, x, deltas, target in group_activations(model, partial, batches):
            if group == g:
                equations = equations or NormalEquations(len(deltas), x.shape[-1])
                equations.add(x, deltas, target)
        fitted.append(equations.solve())
    return dataclasses.replace(plan, corrections=tuple(fitted))


def towards_the_original(model, plan: Plan, batches: list, original: BlockOutputs, mix: float) -> Plan:
    """Every group in one pass, towards ``(1 - mix) seq(x) + mix h``, h the original's residual stream."""
    equations: dict[int, NormalEquations] = {}
    for b, ids in enumerate(batches):
        for g, x, deltas, target in group_activations(model, plan, [ids]):
            h = original.calls[b][plan.groups[g][-1]]
            h = h[0] if isinstance(h, tuple) else h
            equations.setdefault(g, NormalEquations(len(deltas), x.shape[-1])).add(
                x, deltas, torch.lerp(target, h, mix))
    return dataclasses.replace(plan, corrections=tuple(equations[g].solve() for g in range(len(plan.groups))))


def main() -> None:
    args = study_arguments(__doc__, "docs/notes/studies/results/correction-targets.json")
    model, _, fit, held, base = smollm2_study(args.held_out)
    original = BlockOutputs.of(model, fit)
    result = {"date": time.strftime("%Y-%m-%d"), "held_out_tokens": 256 * args.held_out,
              "fit_tokens": sum(b.numel() for b in fit), "rows": []}
    for name, groups in SEARCHED_PLANS.items():
        t = time.perf_counter()
        plan = resolve_plan(model, Plan(len(model.model.layers), groups, 0))
        fits = {"uncorrected": plan, "joint (fit_corrections)": fit_corrections(model, plan, fit),
                "sequential": sequential(model, plan, fit)}
        for mix in (0.5, 1.0):
            fits[f"trajectory {mix}"] = towards_the_original(model, plan, fit, original, mix)
        row = {"plan": name, "groups": groups, **{k: perplexity(model, held, plan=p) / base - 1 for k, p in fits.items()},
               "seconds": time.perf_counter() - t}
        record(result, row)
    write(result, args.out)


if __name__ == "__main__":
    main()
