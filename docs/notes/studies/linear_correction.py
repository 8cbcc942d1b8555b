"""Study: a reduced-rank linear group correction on top of the affine one, and whether it transfers.

    python docs/notes/studies/linear_correction.py --out docs/notes/studies/results/linear-correction.json

The shipped correction (``cqil_fx/eager/correction.py``) is a scale per member
and channel plus a bias. A first measurement found that a full linear
map of the deltas, fitted on 2,048 tokens, made unseen text worse. This script
asks whether that was the calibration's size: it fits, per group, the affine
correction and then a linear map ``W`` of the concatenated member deltas onto
what the affine correction still misses (``seq(x) - x - Σ s_k Δ_k - b``), by
ridge regression on many more tokens (text SmolLM2 writes itself plus the
whole calibration split of the Python reference, 122k tokens; ``--calibration
self`` for the former alone), truncated to rank ``r`` by reduced-rank
regression (the top ``r`` directions of the fitted values). Perplexity is
measured on the held-out licence texts, which nothing here fits on. The
equations are gathered once per plan and solved at every rank and ridge; the
terms are the backend's own (``fit_corrections(low_rank=r)``, :class:`LowRank`),
applied by the eager reference; ``cqil-fx correct`` fits one plan for use.

Run-time cost of the backend's terms, per member of hidden size h, in
multiply-adds per token: ``2 h r`` at rank r, each member on its own path
(SmolLM2: a block's weights are about 3.5M; r = 128 adds 0.15M per member, 4 %
of a block; the full map, r = h, 0.66M, 19 %).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

from cqil_fx.config import CQILConfig
from cqil_fx.eager.correction import fit_corrections, low_rank_equations
from cqil_fx.eager.quality import perplexity
from cqil_fx.tools.models import correction_text, load_smollm2, token_batches


def _groups(text: str) -> tuple[tuple[int, ...], ...]:
    """``START-END``: the pairs from START up to END; ``A-B,C-D``: those groups."""
    spans = [tuple(int(v) for v in part.split("-")) for part in text.split(",")]
    if any(len(s) != 2 or s[1] <= s[0] for s in spans):
        raise ValueError(text)
    if "," not in text:
        (first, end), = spans
        if end - first < 2:
            raise ValueError(text)
        return tuple((i, i + 1) for i in range(first, end - 1, 2))
    return tuple(tuple(range(a, b + 1)) for a, b in spans)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--plans", nargs="+", default=["20-28", "16-28", "12-28"],
                        help="P = 2 spans START-END (pairs from START up to END), or explicit groups "
                             "FIRST-LAST,FIRST-LAST,... (e.g. 5-6,17-18)")
    parser.add_argument("--ranks", nargs="+", default=["8", "32", "128", "full"])
    parser.add_argument("--ridges", nargs="+", type=float, default=[0.1, 1.0])
    parser.add_argument("--self-tokens", type=int, default=16384)
    parser.add_argument("--calibration", choices=("mixed", "self"), default="mixed",
                        help="self-written text plus the Python reference's calibration split, or the former alone")
    parser.add_argument("--held-out", type=int, default=24, help="256-token windows of the licence texts")
    parser.add_argument("--out")
    args = parser.parse_args()
    if not all(r == "full" or (r.isdigit() and int(r) > 0) for r in args.ranks):
        parser.error(f"--ranks takes positive integers or 'full', got {args.ranks}")
    try:
        plans = [_groups(text) for text in args.plans]
    except ValueError:
        parser.error(f"--plans takes spans START-END of at least one pair (20-28) or groups 5-6,17-18; "
                     f"got {args.plans}")
    ranks = [None if r == "full" else int(r) for r in args.ranks]
    model, tokenizer = load_smollm2()
    model.eval()
    h = model.config.hidden_size  # rank h: the whole ridge map
    start = time.perf_counter()
    calibration = correction_text(model, tokenizer, args.calibration, args.self_tokens)
    held_out = token_batches(tokenizer, "licenses", 256, args.held_out)
    original = perplexity(model, held_out)
    print(f"{sum(b.numel() for b in calibration)} calibration tokens ({time.perf_counter() - start:.0f} s); "
          f"original perplexity {original:.3f}", flush=True)
    rows = []
    for span, groups in zip(args.plans, plans):
        plan = CQILConfig(groups=groups).plan_for(model.config.num_hidden_layers)
        name = f"S{span.replace('-', '-E')}" if "," not in span else " ".join(f"[{g}]" for g in span.split(","))
        row = {"plan": span, "saved": plan.saved_blocks, "uncorrected": perplexity(model, held_out, plan)}
        affine = fit_corrections(model, plan, calibration)
        row["affine"] = perplexity(model, held_out, affine)
        equations = low_rank_equations(model, affine, calibration)
        row["linear"] = []
        for ridge in args.ridges:
            for rank in ranks:
                corrections = tuple(dataclasses.replace(c, low_rank=equations[g].solve(rank or h, ridge))
                                    for g, c in enumerate(affine.corrections))
                value = perplexity(model, held_out, dataclasses.replace(affine, corrections=corrections))
                row["linear"].append({"ridge": ridge, "rank": rank or "full", "perplexity": value})
                print(f"{name} ridge {ridge} rank {rank or 'full'}: {value / original - 1:+.1%}", flush=True)
        print(f"{name}: uncorrected {row['uncorrected'] / original - 1:+.1%}, "
              f"affine {row['affine'] / original - 1:+.1%}", flush=True)
        rows.append(row)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"original": original, "self_tokens": args.self_tokens,
                                              "calibration": args.calibration,
                                              "calibration_tokens": sum(b.numel() for b in calibration),
                                              "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
