"""`make demo`: plain torch.compile against backend="cqil" with no arguments, on SmolLM2-135M-Instruct.

    python examples/compare_smollm2.py                 # the default backend: a measured plan, mode "auto"
    python examples/compare_smollm2.py --recovered DIR # plus a row for weights `cqil-fx recover` wrote

Side by side, in one process:

* **generation**: greedy, static KV cache, the same prompts for both, each
  model's ``generate`` called in turn (interleaved) after a first call that
  compiles; the answers, the per-token latency (median of the calls, with
  p10/p90) and tokens per second, and the ratio (benchmarks/default_latency.py
  times a 256-token prefill and a 1-token forward the same way);
* **the plan** the default backend chose (searched at the first compile, on
  text the model wrote itself, then cached: a second run reuses it) and its
  quality cost on held-out text of another kind than anything it was
  calibrated on: perplexity of English licence texts (``token_batches(...,
  "licenses")``), original against the plan; with ``--recovered``, the
  recovered weights too, else one line per adapter set shipped in
  ``adapters/`` with what its recovery measured and how to add its row (a
  third model to compile, left out of the default run to keep it short).
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import logging
import os
import time
from pathlib import Path

import torch

from cqil_fx import cqil_backend, load_recovered, make_backend
from cqil_fx.config import Plan
from cqil_fx.eager.quality import perplexity
from cqil_fx.tools.generation import TokenClock, compiled_twin
from cqil_fx.tools.models import load_smollm2, token_batches
from cqil_fx.tools.timing import Summary, median, time_interleaved

PROMPTS = ("The capital of France is", "Water freezes at a temperature of", "The largest planet in the solar system is")


def generate(twin, batch, tokenizer, new_tokens: int) -> tuple[torch.Tensor, float]:
    """Greedy continuations of ``batch`` and the milliseconds per decode step."""
    clock = TokenClock()
    with torch.no_grad():
        out = twin.generate(**batch, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                            cache_implementation="static", pad_token_id=tokenizer.pad_token_id,
                            stopping_criteria=[clock])
    return out[:, batch.input_ids.shape[1]:], clock.per_token_ms()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=5, help="interleaved timed generate calls of each model")
    parser.add_argument("--new-tokens", type=int, default=12)
    parser.add_argument("--held-out", type=int, default=8, help="256-token windows of licence text for perplexity")
    parser.add_argument("--recovered", help="a directory written by `cqil-fx recover` (or save_recovered)")
    args = parser.parse_args()
    if args.reps < 2 or args.new_tokens < 2 or args.held_out < 1:
        parser.error("--reps and --new-tokens must be >= 2, --held-out >= 1")
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    logging.getLogger("cqil_fx").setLevel(logging.INFO)

    model, tokenizer = load_smollm2()
    print(f"SmolLM2-135M-Instruct, {torch.get_num_threads()} threads, torch {torch.__version__}\n")
    tokenizer.padding_side = "left"
    batch = tokenizer(list(PROMPTS), return_tensors="pt", padding="max_length", max_length=16)
    rows = {"plain": compiled_twin(model, "inductor", dynamic=False),
            "cqil": compiled_twin(model, cqil_backend, dynamic=False)}
    recovered_model = recovered_plan = None
    if args.recovered:
        recovered_model = copy.deepcopy(model)
        recovered_plan = load_recovered(recovered_model, args.recovered)
        rows["recovered"] = compiled_twin(recovered_model, make_backend(recovered_plan), dynamic=False)

    started = time.perf_counter()
    answers = {}
    for name, twin in rows.items():  # the first call compiles (and, for cqil, plans or reads the plan cache)
        t = time.perf_counter()
        answers[name] = generate(twin, batch, tokenizer, args.new_tokens)[0]
        print(f"first generate of {name} (compiles): {time.perf_counter() - t:.0f} s")
    report = cqil_backend.reports[-1]  # the decode graph's: the same plan as the prefill's (the plan cache)
    print(f"\nplan: {report.plan if report.fallback is None else 'none: ' + report.fallback}")
    if report.fallback is None:
        print(f"      ({report.source}; promised cost {report.cost:+.1%} on its calibration text; mode {report.mode})")

    calls = {name: functools.partial(generate, twin, batch, tokenizer, args.new_tokens) for name, twin in rows.items()}
    timings = time_interleaved(calls, args.reps, warmup=0)  # each call's result: (tokens, ms per decode step)
    times = {name: [step_ms for _, step_ms in results] for name, results in timings.results.items()}
    print(f"\ngreedy generation, static cache, {len(PROMPTS)} prompts in a batch, {args.new_tokens} new tokens, "
          f"{args.reps} interleaved calls each; ms per decode step (median, p10-p90), tokens/s:")
    for name, values in times.items():
        spread = Summary.of(values)
        print(f"  {name:<9} {spread.median:7.2f} ms  ({spread.p10:.2f}-{spread.p90:.2f})  "
              f"{len(PROMPTS) * 1e3 / spread.median:6.1f} tokens/s")
    ratio = median(times["cqil"]) / median(times["plain"])
    print(f"  cqil / plain = {ratio:.3f} ({ratio - 1:+.1%} time per token)")
    for name, out in answers.items():
        print(f"  {name}:")
        for prompt, answer in zip(PROMPTS, tokenizer.batch_decode(out, skip_special_tokens=True)):
            print(f"    {prompt!r} -> {answer.strip()!r}")

    held_out = token_batches(tokenizer, "licenses", seq_len=256, num_batches=args.held_out)
    base = perplexity(model, held_out)
    print(f"\nquality on held-out licence text ({args.held_out * 256} tokens, never used for planning):")
    print(f"  original  perplexity {base:.2f}")
    if report.fallback is None:
        planned = perplexity(model, held_out, plan=report.plan)
        print(f"  cqil      perplexity {planned:.2f} ({planned / base - 1:+.1%}; budget "
              f"+{cqil_backend.config.budget:.0%})")
        same = sum(a == b for a, b in zip(tokenizer.batch_decode(answers["cqil"]),
                                          tokenizer.batch_decode(answers["plain"])))
        print(f"  greedy answers equal to the original's: {same} of {len(PROMPTS)}")
    if recovered_plan is not None:
        rec = perplexity(recovered_model, held_out, plan=recovered_plan)
        print(f"  recovered perplexity {rec:.2f} ({rec / base - 1:+.1%})")
    else:
        point_to_shipped_adapters()
    print(f"\ndemo took {time.perf_counter() - started:.0f} s after loading")


def point_to_shipped_adapters() -> None:
    """One line per adapter set in the repository's ``adapters/``, with what its recovery measured."""
    for record in sorted((Path(__file__).resolve().parent.parent / "adapters").glob("*/recovery.json")):
        ppl = json.loads(record.read_text())["perplexity"]
        plan = Plan.from_dict(json.loads((record.parent / "plan.json").read_text()))
        print(f"  shipped adapters {record.parent.name} ({plan.saved_blocks} block-times saved): "
              f"perplexity {ppl['cqil'] / ppl['original'] - 1:+.1%} -> {ppl['recovered'] / ppl['original'] - 1:+.1%} "
              f"on licence text when trained (recovery.json); --recovered {os.path.relpath(record.parent)} "
              f"adds their row")


if __name__ == "__main__":
    main()
