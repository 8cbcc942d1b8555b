"""Original vs CQIL on SmolLM2-135M-Instruct: logits on real text, and greedy text.

    python examples/compare_smollm2.py                      # S12-E28, P=2, D=1
    python examples/compare_smollm2.py --start 20 --end 28 --bypass 0

Both models are compiled with Inductor for one input shape, (1, --tokens):
greedy decoding writes into a fixed buffer of that length, which is exact for
a causal model (positions after the current one cannot affect its logits), so
each model compiles once.  The CQIL logits are checked against the eager
reference.
"""

from __future__ import annotations

import argparse
import logging
import time

import torch

from cqil_fx import CQILConfig, cqil_reference, make_backend
from cqil_fx.tools.models import load_smollm2, token_batches

PROMPT = "The capital of France is"


def greedy(model, tokenizer, prompt: str, new_tokens: int, length: int) -> str:
    """Greedy completion in a fixed (1, length) buffer, recomputing it each step (no KV cache)."""
    prompt_ids = tokenizer(prompt, return_tensors="pt").input_ids[0]
    n = len(prompt_ids)
    if n + new_tokens > length:
        raise ValueError(f"prompt ({n} tokens) + {new_tokens} new tokens do not fit in {length}")
    buffer = torch.full((1, length), tokenizer.pad_token_id or 0, dtype=torch.long)
    buffer[0, :n] = prompt_ids
    for position in range(n, n + new_tokens):
        buffer[0, position] = model(buffer, use_cache=False).logits[0, position - 1].argmax()
    return tokenizer.decode(buffer[0, : n + new_tokens])


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--start", type=int, default=12)
    parser.add_argument("--end", type=int, default=28)
    parser.add_argument("--parallel", type=int, default=2)
    parser.add_argument("--bypass", type=int, default=1)
    parser.add_argument("--tokens", type=int, default=256, help="length of the real-text window")
    parser.add_argument("--new-tokens", type=int, default=12)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    config = CQILConfig(start=args.start, end=args.end, parallel=args.parallel, bypass=args.bypass)

    model, tokenizer = load_smollm2()
    ids = token_batches(tokenizer, "evaluation", seq_len=args.tokens, num_batches=1)[0]
    original = torch.compile(model, backend="inductor")
    cqil = torch.compile(model, backend=make_backend(config))

    with torch.no_grad():
        logits = {}
        for name, compiled in (("original", original), ("cqil", cqil)):
            t = time.perf_counter()
            logits[name] = compiled(ids, use_cache=False).logits
            print(f"compiled and ran {name} in {time.perf_counter() - t:.0f} s")
        base, ours = logits["original"], logits["cqil"]
        reference = cqil_reference(model, config, ids, use_cache=False).logits
        print(f"\nplan: {config.plan_for(len(model.model.layers))}")
        print(f"CQIL compiled vs eager reference: relative error {relative_error(ours, reference):.1e}")
        print(f"CQIL vs original logits:          relative difference {relative_error(ours, base):.3f}")
        agree = (ours.argmax(-1) == base.argmax(-1)).float().mean().item()
        print(f"next-token argmax agreement on {args.tokens} tokens of real text: {agree:.1%}\n")
        for name, compiled in (("original", original), ("cqil", cqil)):
            text = greedy(compiled, tokenizer, PROMPT, args.new_tokens, args.tokens)
            print(f"{name:>8}: {text!r}")


if __name__ == "__main__":
    main()
