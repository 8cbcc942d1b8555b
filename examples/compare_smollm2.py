"""`make demo`: what backend="cqil" with no arguments does for SmolLM2-135M-Instruct, and what it costs.

    python examples/compare_smollm2.py                     # the default plan, then the shipped adapters' row
    python examples/compare_smollm2.py --no-adapters       # the default plan only

Side by side, in one process:

1. **Planning ahead**: ``cqil_fx.plan(model)`` searches the default plan on
   text the model writes itself (minutes, the first time; then the plan
   cache), and ``torch.compile(model, backend="cqil")`` uses it.
2. **Its quality cost** on held-out text of another kind than anything it
   was calibrated on (English licence texts, ``token_batches(...,
   "licenses")``): perplexity, and the share of positions whose most likely
   next token is the original's.
3. **Its speed**: greedy static-cache generation, each model's ``generate``
   called in turn (interleaved), milliseconds per decode step (median,
   p10-p90) against plain ``torch.compile``; and the time to the first answer
   (planning and compiling included).
4. **The answers** side by side. The prompts follow a rule fixed before any
   run, not chosen for how they come out: the first 16 tokens of held-out
   windows 0, 3 and 6, continued greedily.
5. A second row, the shipped adapters (``adapters/``: 8 block-times saved,
   trained to win back quality), unless ``--no-adapters``.

The picture of the whole trade (every plan's held-out cost against the
block-times it saves, and the time per token it buys) is
docs/results/frontier.png, written by ``benchmarks/frontier.py``.
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import logging
import time
from pathlib import Path

import torch

import cqil_fx
from cqil_fx import load_recovered, make_backend
from cqil_fx.eager.quality import QualityProbe
from cqil_fx.tools.generation import TokenClock, compiled_twin
from cqil_fx.tools.models import load_smollm2, token_batches
from cqil_fx.tools.timing import Summary, time_interleaved

ROOT = Path(__file__).resolve().parent.parent
ADAPTERS = ROOT / "adapters" / "smollm2-135m-s12-e28-p2"
FRONTIER = ROOT / "docs" / "results" / "frontier.png"
PROMPT_WINDOWS, PROMPT_TOKENS = (0, 3, 6), 16


def generate(twin, prompts: torch.Tensor, new_tokens: int) -> tuple[torch.Tensor, float]:
    """Greedy continuations of ``prompts`` and the milliseconds per decode step."""
    clock = TokenClock()
    with torch.no_grad():
        out = twin.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=new_tokens,
                            min_new_tokens=new_tokens, do_sample=False, cache_implementation="static",
                            pad_token_id=0, stopping_criteria=[clock])
    return out[:, prompts.shape[1]:], clock.per_token_ms()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=5, help="interleaved timed generate calls of each model")
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--held-out", type=int, default=8, help="256-token windows of licence text")
    parser.add_argument("--no-adapters", action="store_true", help="leave out the shipped adapters' row")
    args = parser.parse_args()
    if args.reps < 2 or args.new_tokens < 2 or args.held_out <= max(PROMPT_WINDOWS):
        parser.error(f"--reps and --new-tokens must be >= 2, --held-out > {max(PROMPT_WINDOWS)}")
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    started = time.perf_counter()
    model, tokenizer = load_smollm2()
    print(f"SmolLM2-135M-Instruct, float32, {torch.get_num_threads()} threads, torch {torch.__version__}\n")
    held_out = token_batches(tokenizer, "licenses", seq_len=256, num_batches=args.held_out)
    prompts = torch.cat([held_out[i][:, :PROMPT_TOKENS] for i in PROMPT_WINDOWS])

    print("1. planning ahead: cqil_fx.plan(model) (the model writes its own calibration text; cached after)")
    t = time.perf_counter()
    plan = cqil_fx.plan(model)
    plan_s = time.perf_counter() - t
    print(f"   {plan}, in {plan_s:.0f} s\n")

    rows = {"plain": compiled_twin(model, "inductor", dynamic=False),
            "cqil": compiled_twin(model, cqil_fx.cqil_backend, dynamic=False)}
    plans = {"cqil": plan}
    models = {"cqil": model}
    if not args.no_adapters:
        recovered = copy.deepcopy(model)
        plans["adapters"] = load_recovered(recovered, ADAPTERS)
        models["adapters"] = recovered
        rows["adapters"] = compiled_twin(recovered, make_backend(plans["adapters"]), dynamic=False)

    first = {}
    for name, twin in rows.items():  # the first call compiles the prefill and decode graphs
        t = time.perf_counter()
        generate(twin, prompts, args.new_tokens)
        first[name] = time.perf_counter() - t
    report = cqil_fx.cqil_backend.reports[-1]
    mode = report.mode if report.fallback is None else f"unchanged ({report.fallback})"
    print(f"   backend='cqil' compiled with that plan ({report.source}), mode {mode}\n")

    print(f"2. quality on held-out licence text ({args.held_out * 256} tokens no plan was fitted on):")
    probe = QualityProbe(model, held_out, prompts, new_tokens=args.new_tokens)
    base = probe.measure(removed=())
    quality = {}
    for name, plan_ in plans.items():
        quality[name] = QualityProbe.like(probe, models[name]).measure(plan_)
    print(f"   {'':9} {'saves':>11} {'perplexity':>18} {'next-token agreement':>22}")
    print(f"   {'original':9} {'':>11} {base.perplexity:10.2f}{'':8} {'100.0 %':>22}")
    for name, q in quality.items():
        print(f"   {name:9} {plans[name].saved_blocks:>2} of 30 {q.perplexity:10.2f} ({q.perplexity / base.perplexity - 1:+6.1%}) "
              f"{100 * q.next_token:20.1f} %")

    calls = {name: functools.partial(generate, twin, prompts, args.new_tokens) for name, twin in rows.items()}
    timings = time_interleaved(calls, args.reps, warmup=0)  # each call's result: (tokens, ms per decode step)
    per_token = {name: [ms for _, ms in results] for name, results in timings.results.items()}
    print(f"\n3. speed: greedy generation, static cache, {len(PROMPT_WINDOWS)} prompts in a batch, {args.new_tokens} new "
          f"tokens, {args.reps} interleaved calls; ms per decode step, median (p10-p90):")
    for name, values in per_token.items():
        spread = Summary.of(values)
        line = f"   {name:9} {spread.median:7.2f} ms ({spread.p10:.2f}-{spread.p90:.2f})"
        if name != "plain":
            ratio = Summary.of([a / b for a, b in zip(values, per_token["plain"])])
            line += (f"   {ratio.median - 1:+.1%} time per token against plain torch.compile "
                     f"(p10-p90 {ratio.p10 - 1:+.1%} to {ratio.p90 - 1:+.1%})")
        print(line)
    print(f"   time to the first answer: plain {first['plain']:.0f} s (compile); cqil {plan_s + first['cqil']:.0f} s "
          f"(planning {plan_s:.0f} s + compile {first['cqil']:.0f} s)"
          + (f"; adapters {first['adapters']:.0f} s (compile)" if "adapters" in first else ""))

    print(f"\n4. answers (greedy; prompts: the first {PROMPT_TOKENS} tokens of held-out windows "
          f"{', '.join(map(str, PROMPT_WINDOWS))}):")
    outputs = {name: res[-1][0] for name, res in timings.results.items()}
    for i in range(len(PROMPT_WINDOWS)):
        print(f"   prompt    {tokenizer.decode(prompts[i])!r}")
        for name, out in outputs.items():
            same = "" if name == "plain" else ("  (= plain)" if torch.equal(out[i], outputs["plain"][i]) else "")
            print(f"   {name:9} {tokenizer.decode(out[i], skip_special_tokens=True)!r}{same}")

    cost = quality["cqil"].perplexity / base.perplexity - 1
    ratio = Summary.of([a / b for a, b in zip(per_token["cqil"], per_token["plain"])]).median
    print(f"\nthe default's trade here: {plan.saved_blocks} of 30 block-times saved, {ratio - 1:+.1%} time per token, "
          f"{cost:+.1%} held-out perplexity, {100 * quality['cqil'].next_token:.1f} % of next tokens as the original's")
    if "adapters" in quality:
        recovery = json.loads((ADAPTERS / "recovery.json").read_text())
        print(f"the shipped adapters: {plans['adapters'].saved_blocks} block-times saved at "
              f"{quality['adapters'].perplexity / base.perplexity - 1:+.1%} (the plan alone: "
              f"{recovery['perplexity']['cqil'] / recovery['perplexity']['original'] - 1:+.1%}, recovery.json)")
    where = FRONTIER.relative_to(ROOT) if FRONTIER.exists() else "not written yet: python benchmarks/frontier.py"
    print(f"the whole trade (every plan, removal, corrections, adapters) as a picture: {where}")
    print(f"\ndemo took {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
