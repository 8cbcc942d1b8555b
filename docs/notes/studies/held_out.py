"""What the held-out quality studies in this folder share (imported by them as a sibling module).

    model, tokenizer, fit, held, base = smollm2_study(args.held_out)
    record(result, row)            # appended, and printed as a JSON line
    write(result, args.out)

``fit``: the text the backend's search fits corrections on (every other batch
of the 2,048 tokens SmolLM2 writes itself, seed 0); ``held``: 256-token
windows of the licence texts, which nothing plans, fits or trains on;
``base``: the original's perplexity there. ``SEARCHED_PLANS``: the searched
SmolLM2 plans of docs/notes/quality-notes.md (the KL beam search at D = 0) and S12-E28.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from cqil_fx.planning.self_text import self_generated_text
from cqil_fx.eager.quality import perplexity
from cqil_fx.tools.models import load_smollm2, token_batches

SEARCHED_PLANS = {
    "4 saved, KL beam +20 %": ((5, 6), (17, 18), (22, 23), (25, 26)),
    "6 saved, KL beam +35 %": ((5, 6), (12, 13), (17, 18), (22, 23), (24, 25), (26, 27)),
    "S12-E28": tuple((i, i + 1) for i in range(12, 28, 2)),
}


def study_arguments(doc: str, out: str) -> argparse.Namespace:
    """The command line of a held-out study: ``--held-out`` windows of licence text and ``--out``."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--held-out", type=int, default=24, help="256-token windows of licence text")
    parser.add_argument("--out", default=out)
    args = parser.parse_args()
    if args.held_out < 1:
        parser.error(f"--held-out takes a positive number of windows, got {args.held_out}")
    return args


def smollm2_study(held_out: int):
    """(model, tokenizer, fit batches, held-out batches, the original's held-out perplexity)."""
    model, tokenizer = load_smollm2()
    fit = self_generated_text(model, seed=0, progress=False)[::2]
    held = token_batches(tokenizer, "licenses", 256, held_out)
    return model, tokenizer, fit, held, perplexity(model, held)


def record(result: dict, row: dict) -> None:
    result["rows"].append(row)
    print(json.dumps(row), flush=True)


def write(result: dict, out: str) -> None:
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(result, indent=2) + "\n")
