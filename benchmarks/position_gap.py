"""Where in a window a plan's perplexity cost falls: perplexity by token position on held-out text.

    python benchmarks/position_gap.py --adapters adapters/smollm2-135m-s12-e28-p2 [--adapters DIR ...]

For SmolLM2-135M-Instruct on the 24 licence windows of 256 tokens (the held-out text of
docs/distillation.md), prints the original's perplexity over spans of positions, and beside it the
training-free plan's and each recovered model's, with their increase over the original on the same
span.  The plan is the one the adapters were trained for (their plan.json).  Positions are those of
the predicted token (1 = the second token of a window).  The last column is in-context copying: the
share of 8 repeated random sequences of 64 tokens whose second occurrence the model predicts from its
first (``cqil_fx.eager.quality.copying``, the "copying" of ``cqil-fx eval``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cqil_fx.eager.distill import load_adapters  # noqa: E402
from cqil_fx.eager.quality import copying, repeated_random_tokens  # noqa: E402
from cqil_fx.eager.reference import cqil_semantics  # noqa: E402
from cqil_fx.tools.models import load_smollm2, token_batches  # noqa: E402

SPANS = ((1, 32), (33, 64), (65, 128), (129, 192), (193, 255))


def position_nll(model, windows, plan=None) -> torch.Tensor:
    """Mean negative log-likelihood per predicted position over ``windows`` (each (1, L) ids)."""
    total = torch.zeros(windows[0].shape[1] - 1)
    with torch.no_grad():
        for ids in windows:
            if plan is None:
                logits = model(ids, use_cache=False).logits
            else:
                with cqil_semantics(model, plan):
                    logits = model(ids, use_cache=False).logits
            logp = torch.log_softmax(logits[0, :-1].float(), dim=-1)
            total -= logp.gather(1, ids[0, 1:, None])[:, 0]
    return total / len(windows)


def copied(model, plan=None, length: int = 64) -> float:
    """In-context copying (see the module docs) of ``model``, under ``plan`` when given."""
    ids = repeated_random_tokens(model.config.vocab_size, 8, length, bos=model.config.bos_token_id)
    with torch.no_grad(), cqil_semantics(model, plan) if plan is not None else contextlib.nullcontext():
        return copying(model(ids, use_cache=False).logits, ids, length)


def span_perplexities(nll: torch.Tensor) -> list[float]:
    return [math.exp(nll[lo - 1:hi].mean().item()) for lo, hi in SPANS]


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--adapters", action="append", required=True, metavar="DIR",
                        help="adapters written by cqil-fx recover --method lora (repeatable; the first one's plan "
                             "is the training-free row)")
    parser.add_argument("--windows", type=int, default=24, help="licence windows of 256 tokens")
    parser.add_argument("--out", type=Path, help="also write the table as JSON here")
    args = parser.parse_args(argv)
    missing = [d for d in args.adapters if not (Path(d) / "adapters.safetensors").is_file()]
    if missing:  # before minutes of loading and evaluating
        parser.error(f"--adapters {', '.join(missing)}: no adapters.safetensors there; give directories written by "
                     f"cqil-fx recover --method lora")
    if args.windows < 1:
        parser.error(f"--windows must be at least 1, got {args.windows}")

    model, tokenizer = load_smollm2()
    windows = token_batches(tokenizer, "licenses", 256, args.windows)
    rows = {"original": position_nll(model, windows)}
    copies = {"original": copied(model)}
    for directory in args.adapters:
        student, _ = load_smollm2()
        plan = load_adapters(student, directory)
        if len(rows) == 1:
            rows[f"training-free {plan!r}"] = position_nll(model, windows, plan)
            copies[f"training-free {plan!r}"] = copied(model, plan)
        rows[f"recovered {directory}"] = position_nll(student, windows, plan)
        copies[f"recovered {directory}"] = copied(student, plan)

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
    if args.out:
        args.out.write_text(json.dumps(table, indent=2) + "\n")
    return table


if __name__ == "__main__":
    main()
