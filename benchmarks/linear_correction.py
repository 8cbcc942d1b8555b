"""Study: a reduced-rank linear group correction on top of the affine one, and whether it transfers.

    python benchmarks/linear_correction.py --out benchmarks/results/linear-correction.json

The shipped correction (``cqil_fx/eager/correction.py``) is a scale per member
and channel plus a bias. Issue 16's first measurement found that a full linear
map of the deltas, fitted on 2,048 tokens, made unseen text worse. This script
asks whether that was the calibration's size: it fits, per group, the affine
correction and then a linear map ``W`` of the concatenated member deltas onto
what the affine correction still misses (``seq(x) - x - Σ s_k Δ_k - b``), by
ridge regression on many more tokens (text SmolLM2 writes itself plus the
whole calibration split of the Python reference, 122k tokens; ``--calibration
self`` for the former alone), truncated to rank ``r`` by reduced-rank
regression (the top ``r`` directions of the fitted values). Perplexity is
measured on the held-out licence texts, which nothing here fits on. An eager
study with module hooks: no mode of the backend applies ``W`` yet.

Run-time cost a compiled ``W`` would add, per group of P members of hidden
size h, in multiply-adds per token: ``r (P h + h)`` at rank r, ``P h²`` in
full (SmolLM2: a block's weights are about 3.5M; a group of 2 with r = 128 adds 0.22M,
6 % of a block; the full map 0.66M, 19 %).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from pathlib import Path

import torch

from cqil_fx.config import Plan
from cqil_fx.eager.correction import _call_layer, fit_corrections
from cqil_fx.eager.planner import self_generated_text
from cqil_fx.eager.quality import perplexity
from cqil_fx.eager.reference import cqil_semantics
from cqil_fx.stack import decoder_layers
from cqil_fx.tools.models import load_smollm2, token_batches


def residual_statistics(model, plan: Plan, batches) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Per group ``(XᵀX, XᵀR)``: X the concatenated member deltas, R what the affine correction misses."""
    layers = decoder_layers(model)
    stats: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    for ids in batches:
        seen = {}
        with torch.no_grad(), cqil_semantics(model, plan, observe=lambda g, x, d, call: seen.__setitem__(g, (x, d, call))):
            model(ids, use_cache=False)
        with torch.no_grad():
            for g, (x, deltas, (args, kwargs)) in seen.items():
                target = x
                for i in plan.groups[g]:
                    target = _call_layer(layers[i], target, args, kwargs)
                scales, bias = plan.correction(g).tensors(deltas[0])
                corrected = x + sum(d * s for d, s in zip(deltas, scales)) + bias
                xs = torch.cat(deltas, -1).reshape(-1, len(deltas) * x.shape[-1]).double()
                rs = (target - corrected).reshape(-1, x.shape[-1]).double()
                gram, cross = stats.get(g, (0, 0))
                stats[g] = (gram + xs.T @ xs, cross + xs.T @ rs)
    return stats


def reduced_rank_map(gram: torch.Tensor, cross: torch.Tensor, rank: int | None, ridge: float) -> torch.Tensor:
    """Ridge solution of ``X W ≈ R`` (``ridge`` times the mean diagonal of XᵀX), kept to the ``rank``
    directions that carry most of the fitted values ``X W`` (all of them for ``rank=None``)."""
    eye = torch.eye(gram.shape[0], dtype=gram.dtype)
    w = torch.linalg.solve(gram + ridge * gram.diagonal().mean() * eye, cross)
    if rank is None:
        return w
    _, vectors = torch.linalg.eigh(w.T @ gram @ w)
    top = vectors[:, -rank:]
    return w @ top @ top.T


@contextlib.contextmanager
def linear_terms(model, plan: Plan, maps: dict[int, torch.Tensor]):
    """The plan's semantics (affine corrections included) plus ``concat(deltas) @ maps[g]`` at each group's sum."""
    layers = decoder_layers(model)
    deltas = {}
    with cqil_semantics(model, plan, observe=lambda g, x, d, call: deltas.__setitem__(g, d)):
        def add_term(g):
            def hook(module, args, output):
                extra = torch.cat(deltas[g], -1) @ maps[g].to(output[0].dtype if isinstance(output, tuple) else output.dtype)
                return (output[0] + extra, *output[1:]) if isinstance(output, tuple) else output + extra
            return hook
        handles = [layers[group[-1]].register_forward_hook(add_term(g)) for g, group in enumerate(plan.groups)]
        try:
            yield
        finally:
            for h in handles:
                h.remove()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--plans", nargs="+", default=["20-28", "16-28", "12-28"],
                        help="P = 2 spans START-END (pairs from START up to END)")
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
    spans = [tuple(v.split("-")) for v in args.plans]
    if not all(len(s) == 2 and all(v.isdigit() for v in s) and int(s[1]) - int(s[0]) >= 2 for s in spans):
        parser.error(f"--plans takes spans START-END of at least one pair, e.g. 20-28; got {args.plans}")
    ranks = [None if r == "full" else int(r) for r in args.ranks]
    model, tokenizer = load_smollm2()
    model.eval()
    start = time.perf_counter()
    calibration = self_generated_text(model, tokens=args.self_tokens, window=128, progress=True)
    if args.calibration == "mixed":
        calibration += token_batches(tokenizer, "calibration", 128)
    held_out = token_batches(tokenizer, "licenses", 256, args.held_out)
    original = perplexity(model, held_out)
    print(f"{sum(b.numel() for b in calibration)} calibration tokens ({time.perf_counter() - start:.0f} s); "
          f"original perplexity {original:.3f}", flush=True)
    rows = []
    for span, (first, end) in zip(args.plans, [(int(a), int(b)) for a, b in spans]):
        plan = Plan(model.config.num_hidden_layers, tuple((i, i + 1) for i in range(first, end, 2)), 0)
        row = {"plan": span, "saved": len(plan.groups), "uncorrected": perplexity(model, held_out, plan)}
        affine = fit_corrections(model, plan, calibration)
        row["affine"] = perplexity(model, held_out, affine)
        stats = residual_statistics(model, affine, calibration)
        row["linear"] = []
        for ridge in args.ridges:
            for rank in ranks:
                maps = {g: reduced_rank_map(gram, cross, rank, ridge).float() for g, (gram, cross) in stats.items()}
                with torch.no_grad(), linear_terms(model, affine, maps):
                    value = perplexity(model, held_out)
                row["linear"].append({"ridge": ridge, "rank": rank or "full", "perplexity": value})
                print(f"S{first}-E{end} ridge {ridge} rank {rank or 'full'}: {value / original - 1:+.1%}", flush=True)
        print(f"S{first}-E{end}: uncorrected {row['uncorrected'] / original - 1:+.1%}, "
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
