"""Does the default search's promise hold on text of another kind? Promise against held-out outcome.

    python docs/notes/studies/plan_transfer.py --budgets 0.06 0.1 0.15 --out docs/notes/studies/results/plan-transfer.json
    python docs/notes/studies/plan_transfer.py --budgets 0.2 0.35 --beam 4 --held-out 24   # the frontier beyond +10 %
    python docs/notes/studies/plan_transfer.py --budgets 0.09 --held-out 24 --repeats 0 0.25   # calibrating on copying too
    python docs/notes/studies/plan_transfer.py --budgets 0.09 --held-out 24 --keep-copying 0 0.9   # a floor on copying
    python docs/notes/studies/plan_transfer.py --budgets 0.2 --held-out 24 --bypass 0 1   # bypass distances 0 and 1

The search of ``backend="cqil"`` with no arguments (``plan_auto`` with
``measure="kl"``, ``correct=True``, D = 0) on text SmolLM2 writes itself
(``self_generated_text``, seed 0), at each budget; each plan's promise (its
cost on that text) next to its perplexity change on the held-out licence
texts, with and without its corrections. This is what ``SAFETY`` in
``cqil_fx.planning.auto`` is set from. ``--beam B`` searches with a beam of
``B`` plans (``plan_auto(beam=B)``) instead of the default greedy growth.
``--repeats F`` adds a fraction F of the text's windows again with their second
half replaced by their first (``cqil_fx.tokens.repeated_windows``), so that the
search also sees the in-context copying a plan costs; each row reports the
plan's copying (``cqil_fx.eager.quality.measure_copying``, original in ``copying_original``).
``--keep-copying F`` searches with ``plan_auto(keep_copying=F)`` (0: without), a floor on the copying
a plan keeps, measured on other random sequences than the reported copying. ``--bypass D ...``: the
distances the search may choose (default 0, as the backend's; 1 adds a rendezvous per group in
concurrent mode, docs/notes/performance.md).
"""

from __future__ import annotations

import argparse
import time

from held_out import record, write

from cqil_fx.planning.auto import plan_auto
from cqil_fx.planning.self_text import self_generated_text
from cqil_fx.eager.quality import measure_copying, perplexity
from cqil_fx.tokens import repeated_windows
from cqil_fx.tools.models import load_smollm2, token_batches


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.06, 0.10, 0.15])
    parser.add_argument("--held-out", type=int, default=16, help="256-token windows of licence text")
    parser.add_argument("--beam", type=int, default=1, help="plans grown at once (1: the default's greedy growth)")
    parser.add_argument("--repeats", type=float, nargs="+", default=[0.0],
                        help="fractions of repeated windows added to the calibration text, one search each")
    parser.add_argument("--keep-copying", type=float, nargs="+", default=[0.0],
                        help="shares of the original's copying a plan must keep (0: no floor), one search each")
    parser.add_argument("--bypass", type=int, nargs="+", default=[0], help="bypass distances to search (default 0)")
    parser.add_argument("--out", default="docs/notes/studies/results/plan-transfer.json")
    args = parser.parse_args()
    if any(b <= 0 for b in args.budgets) or args.held_out < 1 or args.beam < 1:
        parser.error("budgets must be > 0, --held-out and --beam >= 1")
    if any(not 0 <= r <= 1 for r in args.repeats):
        parser.error(f"--repeats takes fractions from 0 to 1, got {args.repeats}")
    if any(d not in (0, 1) for d in args.bypass):
        parser.error(f"--bypass takes 0 and 1 (pairs), got {args.bypass}")
    if any(not 0 <= k <= 1 for k in args.keep_copying):
        parser.error(f"--keep-copying takes shares from 0 to 1, got {args.keep_copying}")
    model, tokenizer = load_smollm2()
    t = time.perf_counter()
    text = self_generated_text(model, seed=0)
    result = {"date": time.strftime("%Y-%m-%d"), "generate_s": time.perf_counter() - t, "beam": args.beam,
              "bypass": args.bypass,
              "held_out_tokens": 256 * args.held_out, "copying_original": measure_copying(model), "rows": []}
    held = token_batches(tokenizer, "licenses", 256, args.held_out)
    base = perplexity(model, held)
    for budget, repeats, keep in [(b, r, k) for b in args.budgets for r in args.repeats for k in args.keep_copying]:
        t = time.perf_counter()
        search = plan_auto(model, text + repeated_windows(text, repeats), budget=budget, bypass=tuple(args.bypass),
                           measure="kl", correct=True, progress=False, beam=args.beam, keep_copying=keep or None)
        plan = search.plan
        change = perplexity(model, held, plan=plan) / base - 1 if plan.groups else 0.0
        plain = perplexity(model, held, plan=plan.without_corrections()) / base - 1 if plan.groups else 0.0
        row = dict(budget=budget, repeats=repeats, keep_copying=keep, plan=repr(plan), saved=plan.saved_blocks, promise=search.cost,
                   held_out=change, held_out_uncorrected=plain, copying=measure_copying(model, plan),
                   search_s=time.perf_counter() - t)
        record(result, row)
    write(result, args.out)


if __name__ == "__main__":
    main()
