"""Study: does a correction that also reads the group input x beat one linear in the deltas alone?

    python docs/notes/studies/correction_features.py --groups 5-6,17-18,22-23,25-26 \
        --out docs/notes/studies/results/correction-features.json

What member k of a group misses is ``Δ_k(x + Δ_<k) - Δ_k(x)``, about
``J_k(x) Δ_<k``: it depends on the token's own x, which the shipped low-rank
term (a fixed linear map of the deltas) cannot see. Per group, after the
affine correction, this fits full ridge maps (``ridge`` times the mean
diagonal) from three feature sets onto what the affine correction misses, on
the text ``cqil-fx correct`` uses (16,384 self-written tokens and the Python
reference's calibration split), and measures held-out perplexity on the
licence texts:

* ``deltas``: the deltas side by side (the full map of ``fit_corrections(low_rank=hidden)``);
* ``deltas+x``: and ``x̂ = x / rms(x)``;
* ``deltas+x+dx``: and ``Δ_k ⊙ x̂`` (a diagonal bilinear term).

An eager study with a forward hook after each group's sum; nothing here is a
plan option.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from cqil_fx.config import CQILConfig
from cqil_fx.eager.correction import fit_corrections, group_activations
from cqil_fx.eager.quality import perplexity
from cqil_fx.eager.reference import cqil_semantics
from cqil_fx.stack import decoder_layers
from cqil_fx.tools.cli import parse_groups
from cqil_fx.tools.models import correction_text, load_smollm2, token_batches

SETS = {"deltas": ("d",), "deltas+x": ("d", "x"), "deltas+x+dx": ("d", "x", "dx")}


def features(x: torch.Tensor, deltas: list[torch.Tensor], parts: tuple[str, ...]) -> torch.Tensor:
    normed = x / x.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt()
    out = list(deltas) if "d" in parts else []
    out += [normed] if "x" in parts else []
    out += [d * normed for d in deltas] if "dx" in parts else []
    return torch.cat(out, -1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--groups", required=True, type=parse_groups,
                        help="groups FIRST-LAST,FIRST-LAST,... e.g. 5-6,17-18")
    parser.add_argument("--ridge", type=float, default=0.1)
    parser.add_argument("--self-tokens", type=int, default=16384)
    parser.add_argument("--held-out", type=int, default=24, help="256-token windows of the licence texts")
    parser.add_argument("--out")
    args = parser.parse_args()
    groups = args.groups
    model, tokenizer = load_smollm2()
    model.eval()
    started = time.perf_counter()
    calibration = correction_text(model, tokenizer, "mixed", args.self_tokens)
    held_out = token_batches(tokenizer, "licenses", 256, args.held_out)
    original = perplexity(model, held_out)
    plan = fit_corrections(model, CQILConfig(groups=groups).plan_for(len(decoder_layers(model))), calibration)
    result = {"groups": ",".join(f"{g[0]}-{g[-1]}" for g in groups), "original": original,
              "affine": perplexity(model, held_out, plan) / original - 1}
    print(f"affine {result['affine']:+.1%} ({time.perf_counter() - started:.0f} s)", flush=True)
    everything = SETS["deltas+x+dx"]
    stats: dict[int, tuple] = {}
    for g, x, deltas, target in group_activations(model, plan, calibration, progress=True):
        correction = plan.correction(g)
        _, bias = correction.tensors(x)
        missed = (target - (x + (sum(correction.member_terms(deltas)) + bias))).reshape(-1, x.shape[-1]).double()
        f = features(x, deltas, everything).reshape(missed.shape[0], -1).double()
        gram, cross = stats.get(g, (0, 0))
        stats[g] = (gram + f.T @ f, cross + f.T @ missed)
    hidden, members = model.config.hidden_size, len(groups[0])
    columns = {"d": range(0, members * hidden), "x": range(members * hidden, (members + 1) * hidden),
               "dx": range((members + 1) * hidden, (2 * members + 1) * hidden)}
    layers = decoder_layers(model)
    for name, parts in SETS.items():
        keep = torch.tensor([i for p in parts for i in columns[p]])
        maps = {}
        for g, (gram, cross) in stats.items():
            a = gram[keep][:, keep]
            eye = torch.eye(len(keep), dtype=a.dtype)
            maps[g] = torch.linalg.solve(a + args.ridge * a.diagonal().mean() * eye, cross[keep]).float()
        seen = {}

        def add_term(g, parts=parts, maps=maps, seen=seen):
            def hook(module, args_, output):
                extra = features(*seen[g], parts) @ maps[g]
                return (output[0] + extra, *output[1:]) if isinstance(output, tuple) else output + extra
            return hook

        with cqil_semantics(model, plan, observe=lambda g, x, d, call: seen.__setitem__(g, (x, d))):
            handles = [layers[group[-1]].register_forward_hook(add_term(g)) for g, group in enumerate(plan.groups)]
            try:
                result[name] = perplexity(model, held_out) / original - 1
            finally:
                for h in handles:
                    h.remove()
        print(f"{name}: {result[name]:+.1%}", flush=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
