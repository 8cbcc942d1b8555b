"""`make demo`: plain torch.compile against backend="cqil" with no arguments, on SmolLM2-135M-Instruct.

    python examples/compare_smollm2.py                 # the default backend: a measured plan, mode "auto"
    python examples/compare_smollm2.py --recovered DIR # plus a row for weights `cqil-fx recover` wrote

Side by side, in one process:

* **latency** of a 256-token prefill, both compiled models called in turn
  (interleaved), medians with p10/p90, and their ratio;
* **generation**: greedy, static KV cache, the same prompts for both; the
  answers and tokens per second;
* **the plan** the default backend chose (searched at the first compile, on
  text the model wrote itself, then cached: a second run reuses it) and its
  quality cost on held-out text of another kind than anything it was
  calibrated on: perplexity of English licence texts (``token_batches(...,
  "licenses")``), original against the plan.
"""

from __future__ import annotations

import argparse
import copy
import logging
import statistics
import time

import torch

from cqil_fx import cqil_backend, cqil_reference, load_recovered, make_backend
from cqil_fx.eager.quality import perplexity
from cqil_fx.tools.generation import TokenClock, compiled_twin
from cqil_fx.tools.models import load_smollm2, token_batches

PROMPTS = ("The capital of France is", "Water freezes at a temperature of", "The largest planet in the solar system is")


def timed(fn, *args, reps: int, **kwargs) -> list[float]:
    out = []
    for _ in range(reps):
        t = time.perf_counter()
        fn(*args, **kwargs)
        out.append((time.perf_counter() - t) * 1e3)
    return out


def interleaved(columns: dict, ids: torch.Tensor, reps: int) -> dict[str, list[float]]:
    """Each column called once per repetition, in turn (order alternating), after one warm-up call."""
    times: dict[str, list[float]] = {name: [] for name in columns}
    names = list(columns)
    with torch.no_grad():
        for fn in columns.values():
            fn(ids, use_cache=False)
        for rep in range(reps):
            for name in names if rep % 2 == 0 else reversed(names):
                times[name] += timed(columns[name], ids, reps=1, use_cache=False)
    return times


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=10)[int(q * 10) - 1] if len(values) > 1 else values[0]


def generate(twin, tokenizer, prompts, new_tokens: int) -> tuple[list[str], float]:
    """Greedy answers to ``prompts`` (left-padded into one batch) and decode tokens per second."""
    tokenizer.padding_side = "left"
    batch = tokenizer(list(prompts), return_tensors="pt", padding="max_length", max_length=16)
    clock = TokenClock()
    with torch.no_grad():
        out = twin.generate(**batch, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                            cache_implementation="static", pad_token_id=tokenizer.pad_token_id,
                            stopping_criteria=[clock])
    answers = tokenizer.batch_decode(out[:, batch.input_ids.shape[1]:], skip_special_tokens=True)
    return answers, len(prompts) * 1e3 / clock.per_token_ms()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=256, help="prefill length for the latency comparison")
    parser.add_argument("--reps", type=int, default=9, help="interleaved timed calls of each model")
    parser.add_argument("--new-tokens", type=int, default=12)
    parser.add_argument("--held-out", type=int, default=8, help="256-token windows of licence text for perplexity")
    parser.add_argument("--recovered", help="a directory written by `cqil-fx recover` (or save_recovered)")
    args = parser.parse_args()
    if args.tokens < 2 or args.reps < 2 or args.new_tokens < 2 or args.held_out < 1:
        parser.error("--tokens, --reps and --new-tokens must be >= 2, --held-out >= 1")
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    logging.getLogger("cqil_fx").setLevel(logging.INFO)

    model, tokenizer = load_smollm2()
    print(f"SmolLM2-135M-Instruct, {torch.get_num_threads()} threads, torch {torch.__version__}\n")
    plain = compiled_twin(model, "inductor", dynamic=False)
    cqil = compiled_twin(model, cqil_backend, dynamic=False)
    ids = token_batches(tokenizer, "evaluation", seq_len=args.tokens, num_batches=1)[0]

    started = time.perf_counter()
    with torch.no_grad():
        for name, twin in (("plain torch.compile", plain), ('backend="cqil"', cqil)):
            t = time.perf_counter()
            twin(ids, use_cache=False)
            print(f"first call (compile) of {name}: {time.perf_counter() - t:.0f} s")
    report = cqil_backend.reports[-1]
    print(f"\nplan: {report.plan if report.fallback is None else 'none: ' + report.fallback}")
    if report.fallback is None:
        print(f"      ({report.source}; promised cost {report.cost:+.1%} on its calibration text; mode {report.mode})")

    times = interleaved({"plain": plain, "cqil": cqil}, ids, args.reps)
    print(f"\nprefill-{args.tokens} latency, {args.reps} interleaved calls each (median, p10-p90):")
    for name, values in times.items():
        print(f"  {name:<6} {statistics.median(values):8.1f} ms   ({percentile(values, 0.1):.1f}-"
              f"{percentile(values, 0.9):.1f})")
    ratio = statistics.median(times["cqil"]) / statistics.median(times["plain"])
    print(f"  cqil / plain = {ratio:.3f} ({1 - ratio:+.1%} time saved)")

    print(f"\ngreedy generation, static cache, {args.new_tokens} new tokens, {len(PROMPTS)} prompts in a batch:")
    rows = [("plain", plain), ("cqil", cqil)]
    recovered_model = recovered_plan = None
    if args.recovered:
        recovered_model = copy.deepcopy(model)
        recovered_plan = load_recovered(recovered_model, args.recovered)
        rows.append(("recovered", compiled_twin(recovered_model, make_backend(recovered_plan), dynamic=False)))
    for name, twin in rows:
        answers, rate = generate(twin, tokenizer, PROMPTS, args.new_tokens)
        print(f"  {name}: {rate:.1f} tokens/s")
        for prompt, answer in zip(PROMPTS, answers):
            print(f"    {prompt!r} -> {answer.strip()!r}")

    held_out = token_batches(tokenizer, "licenses", seq_len=256, num_batches=args.held_out)
    base = perplexity(model, held_out)
    print(f"\nquality on held-out licence text ({args.held_out * 256} tokens, never used for planning):")
    print(f"  original  perplexity {base:.2f}")
    if report.fallback is None:
        planned = perplexity(model, held_out, plan=report.plan)
        print(f"  cqil      perplexity {planned:.2f} ({planned / base - 1:+.1%}; budget "
              f"+{cqil_backend.config.budget:.0%})")
        with torch.no_grad():
            check = cqil_reference(model, report.plan, ids, use_cache=False).logits
            err = ((cqil(ids, use_cache=False).logits - check).norm() / check.norm()).item()
        print(f"  compiled cqil vs the eager reference of its plan: relative error {err:.1e}")
    if recovered_plan is not None:
        rec = perplexity(recovered_model, held_out, plan=recovered_plan)
        print(f"  recovered perplexity {rec:.2f} ({rec / base - 1:+.1%})")
    print(f"\ndemo took {time.perf_counter() - started:.0f} s after loading")


if __name__ == "__main__":
    main()
