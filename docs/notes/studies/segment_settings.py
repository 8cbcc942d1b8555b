"""Concurrent mode's segment compile settings side by side, in one process, on SmolLM2-135M.

    python docs/notes/studies/segment_settings.py --variants default together py-shared --workloads decode-1 prefill-256
    python docs/notes/studies/segment_settings.py --variants default together --workloads generate --reps 15

Variants of ``cqil_fx.graph.executor.segment_settings`` (on CPU):

* ``default``: every segment with the C++ wrapper, built apart from its kernels
  (``cpp_wrapper_build_separate``: the wrapper at -O1, the kernels at -O3);
* ``together``: the C++ wrapper built in one file with the kernels, at -O3;
* ``py-shared``: shared segments with Inductor's Python wrapper (members keep the C++ one).

Each variant compiles ``backend="cqil"`` with no arguments (the default plan,
from the plan cache after the first run) and is called interleaved with the
others. Workloads: a 1-token and a 256-token forward without a cache (ms per
call), and greedy static-cache ``generate`` of 3 prompts and 12 new tokens (ms
per decode step). Prints each variant's first call (its compile), medians with
p10/p90, and each variant's per-repetition ratio to the first variant.
"""

from __future__ import annotations

import argparse
import time

import torch

from cqil_fx import make_backend
from cqil_fx.graph import executor
from cqil_fx.tools.generation import TokenClock, compiled_twin
from cqil_fx.tools.models import load_smollm2
from cqil_fx.tools.timing import Summary, ratios, time_interleaved

VARIANTS = {
    "default": lambda settings, shared: settings,
    "together": lambda settings, shared: {k: v for k, v in settings.items() if k != "cpp_wrapper_build_separate"},
    "py-shared": lambda settings, shared: settings if not shared else {
        k: v for k, v in settings.items() if not k.startswith("cpp_wrapper")},
}
PROMPTS = ("The capital of France is", "Water freezes at a temperature of", "The largest planet in the solar system is")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=["default", "together"])
    parser.add_argument("--workloads", nargs="+", choices=["decode-1", "prefill-256", "generate"],
                        default=["decode-1", "prefill-256"])
    parser.add_argument("--reps", type=int, default=30)
    args = parser.parse_args()
    if args.reps < 3 or len(set(args.variants)) < 2:
        parser.error("--reps must be >= 3 and --variants must name at least two variants")
    torch._dynamo.config.recompile_limit = 64
    stock = executor.segment_settings
    current = [args.variants[0]]
    executor.segment_settings = lambda shared, device_type, threads=1: VARIANTS[current[0]](
        stock(shared, device_type, threads), shared)
    model, tokenizer = load_smollm2()
    tokenizer.padding_side = "left"
    prompts = tokenizer(list(PROMPTS), return_tensors="pt", padding=True)
    names = args.variants
    for workload in args.workloads:
        columns = {n: compiled_twin(model, make_backend(), dynamic=False) for n in names}
        ids = torch.arange(1 if workload == "decode-1" else 256)[None] % model.config.vocab_size

        def call(twin):
            def run() -> float | None:
                """generate: ms per decode step; a forward: None (the interleaver times the call)."""
                if workload == "generate":
                    clock = TokenClock()
                    twin.generate(**prompts, max_new_tokens=12, min_new_tokens=12, do_sample=False,
                                  cache_implementation="static", pad_token_id=tokenizer.pad_token_id,
                                  stopping_criteria=[clock])
                    return clock.per_token_ms()
                twin(ids, use_cache=False)
                return None

            return run

        with torch.no_grad():
            for n in names:
                current[0] = n
                t = time.perf_counter()
                call(columns[n])()
                print(f"{workload} {n}: first call {time.perf_counter() - t:.1f} s", flush=True)
            timings = time_interleaved({n: call(columns[n]) for n in names}, args.reps, warmup=0)
        times = timings.results if workload == "generate" else timings.ms
        for n in names:
            spread, ratio = Summary.of(times[n]), Summary.of(ratios(times[n], times[names[0]]))
            print(f"{workload} {n:9s} median {spread.median:8.2f} ms (p10-p90 {spread.p10:.2f}-{spread.p90:.2f}); "
                  f"/ {names[0]}: {ratio.median:.3f} ({ratio.p10:.3f}-{ratio.p90:.3f})", flush=True)


if __name__ == "__main__":
    main()
