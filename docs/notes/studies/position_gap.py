"""Where in a window a plan's perplexity cost falls: perplexity by token position on held-out text.

    python docs/notes/studies/position_gap.py --adapters adapters/smollm2-135m-s12-e28-p2 [--adapters DIR ...] [--pairs]

For SmolLM2-135M-Instruct on the 24 licence windows of 256 tokens (the held-out text of
docs/notes/distillation.md), prints the original's perplexity over spans of positions, and beside it the
training-free plan's and each recovered model's, with their increase over the original on the same
span.  The plan is the one the adapters were trained for (their plan.json).  Positions are those of
the predicted token (1 = the second token of a window).  The last column is in-context copying: the
share of 8 repeated random sequences of 64 tokens whose second occurrence the model predicts from its
first (``cqil_fx.eager.quality.measure_copying``, the "copying" of ``cqil-fx eval``).  A second table splits
the licence positions into those whose bigram (previous token, token) occurred earlier in the window,
which copying can predict, and the others.  ``--pairs`` adds the training-free copying of every
single adjacent pair ``[i, i+1]`` grouped alone.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[3]  # the repository
sys.path.insert(0, str(ROOT))

from cqil_fx.config import CQILConfig  # noqa: E402
from cqil_fx.eager.distill import load_adapters  # noqa: E402
from cqil_fx.eager.quality import measure_copying  # noqa: E402
from cqil_fx.eager.reference import cqil_semantics  # noqa: E402
from cqil_fx.tools.models import load_smollm2, token_batches  # noqa: E402

SPANS = ((1, 32), (33, 64), (65, 128), (129, 192), (193, 255))


def token_nll(model, windows, plan=None) -> torch.Tensor:
    """Negative log-likelihood of every predicted token, (windows, L - 1), of ``windows`` (each (1, L) ids)."""
    rows = []
    with torch.no_grad():
        for ids in windows:
            if plan is None:
                logits = model(ids, use_cache=False).logits
            else:
                with cqil_semantics(model, plan):
                    logits = model(ids, use_cache=False).logits
            logp = torch.log_softmax(logits[0, :-1].float(), dim=-1)
            rows.append(-logp.gather(1, ids[0, 1:, None])[:, 0])
    return torch.stack(rows)


def repeated_bigrams(windows) -> torch.Tensor:
    """(windows, L - 1) bool: the predicted token's bigram (previous token, token) occurred earlier in its window."""
    rows = []
    for ids in windows:
        tokens, seen, row = ids[0].tolist(), set(), []
        for previous, token in zip(tokens, tokens[1:]):
            row.append((previous, token) in seen)
            seen.add((previous, token))
        rows.append(row)
    return torch.tensor(rows)


def span_perplexities(nll: torch.Tensor) -> list[float]:
    return [math.exp(nll[:, lo - 1:hi].mean().item()) for lo, hi in SPANS]


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--adapters", action="append", required=True, metavar="DIR",
                        help="adapters written by cqil-fx recover --method lora (repeatable; the first one's plan "
                             "is the training-free row)")
    parser.add_argument("--windows", type=int, default=24, help="licence windows of 256 tokens")
    parser.add_argument("--pairs", action="store_true",
                        help="also the training-free copying of every adjacent pair grouped alone")
    parser.add_argument("--out", type=Path, help="also write the table as JSON here")
    args = parser.parse_args(argv)
    names = ("adapter_model.safetensors", "adapters.safetensors")  # peft's files, or cqil_fx's before peft
    missing = [d for d in args.adapters if not any((Path(d) / name).is_file() for name in names)]
    if missing:  # before minutes of loading and evaluating
        parser.error(f"--adapters {', '.join(missing)}: no adapter_model.safetensors there; give directories written by "
                     f"cqil-fx recover --method lora")
    if args.windows < 1:
        parser.error(f"--windows must be at least 1, got {args.windows}")

    model, tokenizer = load_smollm2()
    windows = token_batches(tokenizer, "licenses", 256, args.windows)
    rows = {"original": token_nll(model, windows)}
    copies = {"original": measure_copying(model)}
    for directory in args.adapters:
        student, _ = load_smollm2()
        plan = load_adapters(student, directory)
        if len(rows) == 1:
            rows[f"training-free {plan!r}"] = token_nll(model, windows, plan)
            copies[f"training-free {plan!r}"] = measure_copying(model, plan)
        rows[f"recovered {directory}"] = token_nll(student, windows, plan)
        copies[f"recovered {directory}"] = measure_copying(student, plan)

    original = span_perplexities(rows["original"])
    header = " | ".join(f"{lo}-{hi}" for lo, hi in SPANS)
    print(f"| perplexity by position | all | {header} | copying |")
    print("|---|---:|" + "---:|" * (len(SPANS) + 1))
    table = {}
    for name, nll in rows.items():
        spans = span_perplexities(nll)
        whole = math.exp(nll.mean().item())
        cells = [f"{p:.2f}" if name == "original" else f"{p:.2f} ({p / o - 1:+.1%})" for p, o in zip(spans, original)]
        print(f"| {name} | {whole:.2f} | " + " | ".join(cells) + f" | {copies[name]:.1%} |")
        table[name] = dict(all=whole, spans=dict(zip([f"{lo}-{hi}" for lo, hi in SPANS], spans)),
                           copying=copies[name])

    repeated = repeated_bigrams(windows)
    print(f"\n| {repeated.float().mean():.1%} of positions repeat an earlier bigram | those | the others "
          "| their share of the extra log-loss |")
    print("|---|---:|---:|---:|")
    base = rows["original"]
    for name, nll in rows.items():
        cells = [math.exp(nll[where].mean().item()) for where in (repeated, ~repeated)]
        originals = [math.exp(base[where].mean().item()) for where in (repeated, ~repeated)]
        extra = nll - base
        share = (extra[repeated].sum() / extra.sum()).item() if name != "original" else None
        print(f"| {name} | " + " | ".join(f"{c:.2f}" if name == "original" else f"{c:.2f} ({c / o - 1:+.1%})"
                                           for c, o in zip(cells, originals))
              + (f" | {share:.0%} |" if share is not None else " | |"))
        table[name]["repeated_bigrams"] = dict(those=cells[0], others=cells[1], extra_share=share)

    if args.pairs:
        print("\n| pair grouped alone, training-free | copying |\n|---|---:|")
        table["pair_copying"] = {}
        for i in range(model.config.num_hidden_layers - 1):
            value = measure_copying(model, CQILConfig(groups=[[i, i + 1]]).plan_for(model.config.num_hidden_layers))
            table["pair_copying"][f"{i}-{i + 1}"] = value
            print(f"| [{i}-{i + 1}] | {value:.1%} |", flush=True)
    if args.out:
        args.out.write_text(json.dumps(table, indent=2) + "\n")
    return table


if __name__ == "__main__":
    main()
