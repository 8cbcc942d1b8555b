"""CQIL on quantized weights: int8 weight-only SmolLM2-135M with and without CQIL, side by side, one process.

    python benchmarks/quantized.py --out benchmarks/results/quantized      # JSON + PNG, ~15 min on 2 cores

``--dtype`` is the activations' dtype of the quantized model: ``bfloat16``
(the default) is what a CPU user of int8 weights runs, because Inductor then
computes each int8 linear with one int8 kernel (``aten._weight_int8pack_mm``);
with ``float32`` activations it converts every weight to a new float32 buffer
on every call instead (docs/notes/quantized.md).

Columns, all compiled with ``dynamic=False`` on the same threads and called
interleaved (``cqil_fx.tools.timing``: each column once per repetition, the
order rotated), medians and p10/p90, ratios per repetition:

* ``fp32``: the float32 model, plain ``torch.compile`` (Inductor);
* ``bf16``: the same in bfloat16 (with ``--dtype bfloat16``);
* ``int8``: the model in ``--dtype`` with torchao's int8 weight-only weights
  (``cqil_fx.tools.quant.quantize(model, "int8-weight-only")``), plain compile;
* ``int8-cpp``: the same with Inductor's C++ wrapper;
* ``int8+cqil <plan>``: the int8 model under ``backend=make_backend(plan)``
  in the mode ``"auto"`` picks (two or more threads: concurrent), for each plan:
  ``S12-E28`` (the paper's uniform plan) and ``default`` (``cqil_fx.plan`` on
  the int8 model itself: searched on text it writes, timed, and cached);
* ``int8 ideal <plan>``: the int8 model with the blocks the plan saves removed,
  compiled like ``int8``: what a perfectly concurrent run of the plan costs.

Workloads: ``decode-1`` (a 1-token forward, no cache), ``prefill-256`` (a
256-token forward) and ``generate`` (greedy static-cache generation of
``--new-tokens`` tokens for 3 prompts; milliseconds per decode step).

Quality beside every plan, on held-out text of another kind than any
calibration (English licence texts, ``token_batches(tokenizer, "licenses")``):
perplexity of the int8 model under the plan against the int8 model alone (the
quantized model is its own reference), and of the int8 model against float32
(and bfloat16).
Exactness: the compiled int8 + CQIL logits against the plan's eager reference
on the int8 model (``cqil_reference``).
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import sys
import time
from pathlib import Path

import torch

import cqil_fx
from cqil_fx import CQILConfig, cqil_backend, cqil_reference, make_backend
from cqil_fx.eager.quality import perplexity
from cqil_fx.stack import without_blocks
from cqil_fx.tools.generation import TokenClock, compiled_twin
from cqil_fx.tools.models import load_smollm2, token_batches
from cqil_fx.tools.quant import quantize
from cqil_fx.tools.timing import Summary, time_interleaved

sys.path.insert(0, str(Path(__file__).resolve().parent))
from parts import inductor, save_figure  # noqa: E402

PROMPTS = ("The capital of France is", "Water freezes at a temperature of", "The largest planet in the solar system is")
UNIFORM = CQILConfig(start=12, end=28, parallel=2)


def generate_ms(twin, batch, pad: int, new_tokens: int) -> float:
    clock = TokenClock()
    with torch.no_grad():
        twin.generate(**batch, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                      cache_implementation="static", pad_token_id=pad, stopping_criteria=[clock])
    return clock.per_token_ms()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=11)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--held-out", type=int, default=8, help="256-token windows of licence text")
    parser.add_argument("--workloads", nargs="+", default=["decode-1", "prefill-256", "generate"],
                        choices=["decode-1", "prefill-256", "generate"])
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"],
                        help="activations of the quantized model (module docs)")
    parser.add_argument("--out", default="benchmarks/results/quantized")
    args = parser.parse_args()
    if args.reps < 3 or args.new_tokens < 2 or args.held_out < 1:
        parser.error("--reps >= 3, --new-tokens >= 2 and --held-out >= 1")
    torch._dynamo.config.recompile_limit = 64
    fp32, tokenizer = load_smollm2()
    floats = {"fp32": fp32}
    if args.dtype == "bfloat16":
        floats["bf16"] = copy.deepcopy(fp32).to(torch.bfloat16)
    int8 = quantize(copy.deepcopy(floats["bf16" if args.dtype == "bfloat16" else "fp32"]), "int8-weight-only")
    result = {"threads": torch.get_num_threads(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
              "reps": args.reps, "model": "SmolLM2-135M-Instruct", "quantization": "int8-weight-only",
              "dtype": args.dtype, "plans": {}, "workloads": {}}

    t = time.perf_counter()
    default = cqil_fx.plan(int8)  # searched on the int8 model (or from the cache), remembered for its weights
    result["plan_seconds"] = time.perf_counter() - t
    plans = {"S12-E28": UNIFORM.plan_for(30), "default": default}
    print(f"default plan of the int8 model: {default} ({result['plan_seconds']:.0f} s)", flush=True)

    held_out = token_batches(tokenizer, "licenses", seq_len=256, num_batches=args.held_out)
    base = {name: perplexity(model, held_out) for name, model in [*floats.items(), ("int8", int8)]}
    result["quality"] = {"tokens": 256 * args.held_out, "perplexity": base,
                         "int8_over_fp32": base["int8"] / base["fp32"] - 1}
    for name, plan in plans.items():
        planned = perplexity(int8, held_out, plan=plan) if plan.groups else base["int8"]
        result["plans"][name] = {"plan": repr(plan), "saved_blocks": plan.saved_blocks, "perplexity": planned,
                                 "cost_vs_int8": planned / base["int8"] - 1, "cost_vs_fp32": planned / base["fp32"] - 1}
        print(f"{name}: {plan}: held-out perplexity {planned:.2f} ({planned / base['int8'] - 1:+.1%} against int8 "
              f"alone, {planned / base['fp32'] - 1:+.1%} against float32)", flush=True)

    columns = {name: compiled_twin(model, inductor(False), dynamic=False) for name, model in floats.items()}
    columns["int8"] = compiled_twin(int8, inductor(False), dynamic=False)
    columns["int8-cpp"] = compiled_twin(int8, inductor(True), dynamic=False)
    for name, plan in plans.items():
        if plan.groups:  # the default plan through backend="cqil" itself: it finds the plan chosen above
            backend = cqil_backend if name == "default" else make_backend(plan)
            columns[f"int8+cqil {name}"] = compiled_twin(int8, backend, dynamic=False)
            saved = [i for g in plan.groups for i in g[1:]]
            columns[f"int8 ideal {name}"] = compiled_twin(without_blocks(int8, saved), inductor(False), dynamic=False)

    ids = held_out[0][:1, :64]  # text: on made-up ids, bfloat16's own rounding moves the logits by half their norm
    with torch.no_grad():
        for name, plan in plans.items():
            if plan.groups:
                got = columns[f"int8+cqil {name}"](ids, use_cache=False).logits
                ref = cqil_reference(int8, CQILConfig(plan=plan), ids, use_cache=False).logits
                result["plans"][name]["relative_error_vs_reference"] = relative_error(got, ref)
        # the noise floor: bfloat16 rounds differently in Inductor's kernels than in eager
        result["int8_compiled_vs_eager"] = relative_error(columns["int8"](ids, use_cache=False).logits,
                                                          int8(ids, use_cache=False).logits)
        if default.groups:
            report = cqil_backend.reports[-1]
            result["plans"]["default"]["backend_cqil"] = {"plan": repr(report.plan), "source": report.source,
                                                          "mode": report.mode}

    tokenizer.padding_side = "left"
    batch = tokenizer(list(PROMPTS), return_tensors="pt", padding="max_length", max_length=16)
    for workload in args.workloads:
        result["workloads"][workload] = measure(workload, columns, batch, tokenizer.pad_token_id, args, fp32)
        print(workload, json.dumps(result["workloads"][workload]["ratios"], indent=1), flush=True)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "quantized.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(result, out / "quantized.png")
    print(f"wrote {out}/quantized.json, quantized.png")


def relative_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    got, ref = got.float(), ref.float()
    return ((got - ref).norm() / ref.norm()).item()


def measure(workload: str, columns: dict, batch, pad: int, args, model) -> dict:
    """First-call seconds, per-call ms (median, p10/p90) and per-repetition ratios of one workload."""
    if workload == "generate":
        calls = {name: functools.partial(generate_ms, twin, batch, pad, args.new_tokens) for name, twin in columns.items()}
    else:
        tokens = 1 if workload == "decode-1" else 256
        ids = torch.arange(tokens)[None] % model.config.vocab_size
        calls = {name: functools.partial(twin, ids, use_cache=False) for name, twin in columns.items()}
    first = {}
    with torch.no_grad():
        for name, call in calls.items():  # compiles
            t = time.perf_counter()
            call()
            first[name] = time.perf_counter() - t
        timings = time_interleaved(calls, args.reps, warmup=1)
    if workload == "generate":  # each call returns its own ms per decode step: time the steps, not the prefill
        ms = {name: list(values) for name, values in timings.results.items()}
    else:
        ms = {name: list(timings.ms[name]) for name in calls}
    summary = {name: Summary.of(values) for name, values in ms.items()}
    ratios = {}
    for name in ms:
        if name != "int8":
            paired = Summary.of([a / b for a, b in zip(ms[name], ms["int8"])])
            ratios[f"{name} / int8"] = {"median": paired.median, "p10": paired.p10, "p90": paired.p90}
    realised = {}
    for name in ms:
        if name.startswith("int8+cqil"):
            plan = name.split(" ", 1)[1]
            ideal = summary[f"int8 ideal {plan}"].median
            saved = summary["int8"].median - ideal
            realised[plan] = (summary["int8"].median - summary[name].median) / saved if saved > 0 else float("nan")
    return {"first_call_s": first, "ms": {n: {"median": s.median, "p10": s.p10, "p90": s.p90} for n, s in summary.items()},
            "ratios": ratios, "realised": realised}


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workloads = list(result["workloads"])
    fig, axes = plt.subplots(1, len(workloads), figsize=(5.5 * len(workloads), 4.5), squeeze=False)
    for ax, workload in zip(axes[0], workloads):
        data = result["workloads"][workload]["ms"]
        names = list(data)
        ax.barh(names, [data[n]["median"] for n in names],
                xerr=[[data[n]["median"] - data[n]["p10"] for n in names], [data[n]["p90"] - data[n]["median"] for n in names]],
                color=["gray" if n in ("fp32", "bf16", "int8", "int8-cpp") else "tab:green" if "ideal" in n else "tab:blue"
                       for n in names])
        ax.invert_yaxis()
        ax.set_xlabel("ms per call (generate: per decode step), median and p10-p90")
        ax.set_title(workload)
    costs = ", ".join(f"{name} {p['cost_vs_int8']:+.1%}" for name, p in result["plans"].items())
    save_figure(fig, path, f"{result['model']} int8 weight-only, {result.get('dtype', 'float32')} activations, "
                           f"{result['threads']} threads, {result['date']}; "
                           f"held-out perplexity cost of each plan against int8 alone: {costs}")


if __name__ == "__main__":
    main()
