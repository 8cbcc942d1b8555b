"""Text generation with a static KV cache: original vs CQIL SmolLM2-135M-Instruct, one process.

    python examples/generate.py                                  # S20-E28, P=2, D=1, 32 new tokens
    python examples/generate.py --start 12 --end 28 --bypass 0 --new-tokens 64
    python examples/generate.py --inner aot_eager                # no Inductor: quick to compile, slow to run
    python examples/generate.py --threads 1 --new-tokens 16      # one thread (a busy machine)
    python examples/generate.py --start 12 --end 28 --bypass 0 --recovered DIR   # weights from `cqil-fx recover`

Both models compile ``model.forward`` (Inductor by default) and generate
greedily with ``cache_implementation="static"``: one prefill graph and one
decode graph each.  The first generate call compiles; the next ``--repeat``
calls (3 by default) reuse both graphs and are timed, and the median is
printed (one call on a shared 2-vCPU VM varies by 10 % from run to run).  The CQIL tokens are checked against the eager reference
(``cqil_fx.eager.reference.cqil_semantics``, same cache, no FX).  With ``--recovered``
the CQIL model is a copy of the original with the weights distilled for the
plan (``cqil_fx.load_recovered``); the original keeps its own.
"""

from __future__ import annotations

import argparse
import copy
import functools
import logging
import time

import torch

from cqil_fx import CQILConfig, load_recovered, make_backend
from cqil_fx.tools.generation import compiled_twin
from cqil_fx.tools.models import load_smollm2
from cqil_fx.tools.timing import time_interleaved
from cqil_fx.eager.reference import cqil_semantics

PROMPTS = ["The capital of France is", "A list in Python is"]


def generate(model, batch, new_tokens: int) -> torch.Tensor:
    return model.generate(**batch, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                          cache_implementation="static")


def timed(model, batch, new_tokens: int, repeat: int) -> tuple[torch.Tensor, float, float]:
    """(tokens, compile-and-run seconds of the first call, median seconds of ``repeat`` calls after it)."""
    t = time.perf_counter()
    generate(model, batch, new_tokens)
    first = time.perf_counter() - t
    timings = time_interleaved({"generate": functools.partial(generate, model, batch, new_tokens)}, repeat, warmup=0)
    return timings.results["generate"][-1], first, timings.summary("generate").median / 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--start", type=int, default=20)
    parser.add_argument("--end", type=int, default=28)
    parser.add_argument("--parallel", type=int, default=2)
    parser.add_argument("--bypass", type=int, default=1)
    parser.add_argument("--mode", default="local", choices=["local", "concurrent"])
    parser.add_argument("--inner", default="inductor", help="inner compiler of both models")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--prompt", action="append", help="a prompt (repeat for a batch; left-padded)")
    parser.add_argument("--threads", type=int, help="intra-op threads (default: torch's)")
    parser.add_argument("--repeat", type=int, default=3, help="timed calls after the first (median printed)")
    parser.add_argument("--recovered", metavar="DIR", help="CQIL uses the weights `cqil-fx recover --out DIR` wrote")
    args = parser.parse_args()
    if args.repeat < 1:
        parser.error(f"--repeat must be >= 1 (got {args.repeat})")
    if args.threads:
        torch.set_num_threads(args.threads)  # Inductor's C++ kernels read it when they are compiled
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    config = CQILConfig(start=args.start, end=args.end, parallel=args.parallel, bypass=args.bypass,
                        mode=args.mode, inner=args.inner)

    model, tokenizer = load_smollm2()
    cqil_model = model
    if args.recovered:
        cqil_model = copy.deepcopy(model)
        load_recovered(cqil_model, args.recovered, config)  # warns if DIR was recovered for another plan
    batch = tokenizer(args.prompt or PROMPTS, return_tensors="pt", padding=True, padding_side="left")
    n = args.new_tokens * batch.input_ids.shape[0]
    print(f"plan: {config.plan_for(len(model.model.layers))}, mode {args.mode}, inner {args.inner}")
    results = {}
    with torch.no_grad():
        for name, source, backend in (("original", model, args.inner), ("cqil", cqil_model, make_backend(config))):
            out, first, median = timed(compiled_twin(source, backend), batch, args.new_tokens, args.repeat)
            results[name] = out
            print(f"\n{name}: first call (compiles) {first:.1f} s; then {median:.2f} s a call "
                  f"(median of {args.repeat}), {n / median:.1f} tokens/s "
                  f"({batch.input_ids.shape[0]} x {args.new_tokens} new tokens)")
            for text in tokenizer.batch_decode(out[:, batch.input_ids.shape[1]:], skip_special_tokens=True):
                print(f"  {text!r}")
        with cqil_semantics(cqil_model, config):
            reference = generate(cqil_model, batch, args.new_tokens)
    same = torch.equal(results["cqil"], reference)
    print(f"\nCQIL tokens {'equal' if same else 'DIFFER FROM'} the eager reference's")


if __name__ == "__main__":
    main()
