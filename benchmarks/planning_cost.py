"""What planning costs on a model of the size users run: forwards counted, seconds measured and predicted.

    python benchmarks/planning_cost.py --out benchmarks/results/planning-cost     # ~25 min on 2 cores

``cqil_fx.plan(model)`` (the default plan's search: self-written text, KL to
the original, corrections, a copying floor) costs forwards of the model. How
many depends on the depth (the windows screened and grown) and on which
windows fit the budget, not on the width; what one costs depends on the
width. So:

1. **Counted**: the search runs on a random-weight stand-in of each shape's
   depth (``--stand-in-width`` wide; every search of a run with a plan cache
   of the run's own, so none is read from an earlier one), hooks counting the model's calls, the
   tokens they read and the tokens every decoder layer processes
   (``layer_tokens``; a full-model token is ``num_layers`` of them). A real
   model's count differs by how many windows fit its budget.
2. **Measured**: one forward of ``--tokens`` tokens of the real shape (random
   weights, float32) on this machine, so the search's seconds on this machine
   are estimated as ``layer_tokens / num_layers`` full-model tokens at that
   per-token cost (decode steps of the self-written text run in batches of
   16 and cost more per token than that: the estimate is a floor for them).
3. **Searched** (``--search``): the whole search on the real shape with random
   weights (float32: this CPU has no native bf16 arithmetic), each in a fresh
   process with a plan cache of its own, timed, its forwards counted and its
   peak resident memory read (``ru_maxrss``) after the model is built and after
   the search. Random weights group more windows than trained ones (they change
   the stream little), so the time is that of a search growing a large plan.
4. **Predicted** for the 8B shape on one H200: the FLOPs of those tokens
   (2 x parameters per token) at ``--gpu-tflops`` effective bf16 TFLOP/s,
   plus ``--gpu-call-ms`` per model call (launches and Python, with no CUDA
   graphs in the eager search). Both are assumptions, written into the JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import cqil_fx  # noqa: E402
from cqil_fx.stack import decoder_layers  # noqa: E402
from parts import python_child  # noqa: E402
from sweep.shapes import SHAPES, build_model, parameter_count  # noqa: E402


class LayerTokenCounter:
    """Counts calls of the model, the tokens it reads, decoder-layer calls and the tokens they process."""

    def __init__(self, model: torch.nn.Module):
        self.calls = self.tokens = self.layer_calls = self.layer_tokens = 0
        self.handles = [model.register_forward_pre_hook(self._model, with_kwargs=True)]
        self.handles += [layer.register_forward_pre_hook(self._layer, with_kwargs=True)
                         for layer in decoder_layers(model)]

    def _model(self, module, args, kwargs) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        self.calls += 1
        self.tokens += ids.numel() if isinstance(ids, torch.Tensor) else 0

    def _layer(self, module, args, kwargs) -> None:
        hidden = args[0] if args else kwargs.get("hidden_states")
        self.layer_calls += 1
        self.layer_tokens += hidden.shape[:-1].numel() if isinstance(hidden, torch.Tensor) else 0

    def remove(self) -> dict:
        for handle in self.handles:
            handle.remove()
        return dict(model_calls=self.calls, tokens=self.tokens, layer_calls=self.layer_calls,
                    layer_tokens=self.layer_tokens)


def count(shape_name: str, width: int) -> dict:
    """The default search on a random stand-in of the shape's depth: what it ran, and its plan."""
    shape = SHAPES[shape_name]
    stand_in = dataclasses.replace(shape, hidden=width, heads=4, kv_heads=2, intermediate=2 * width, vocab=2048,
                                   layers=shape.full_layers)
    model = build_model(stand_in, "cpu", torch.float32)
    counter = LayerTokenCounter(model)
    started = time.perf_counter()
    plan = cqil_fx.plan(model, progress=False, remember=False)
    seconds = time.perf_counter() - started
    counted = counter.remove()
    full_tokens = counted["layer_tokens"] / stand_in.layers
    return dict(counted, layers=stand_in.layers, full_model_tokens=full_tokens, plan=repr(plan),
                stand_in_seconds=seconds, stand_in=dataclasses.asdict(stand_in))


def forward_cost(shape_name: str, tokens: int) -> dict:
    """Seconds per token of one forward of the real shape (random weights, float32) on this machine."""
    shape = SHAPES[shape_name]
    model = build_model(dataclasses.replace(shape, layers=shape.full_layers), "cpu", torch.float32)
    ids = torch.arange(tokens)[None] % shape.vocab
    times = []
    with torch.no_grad():
        for _ in range(3):
            t = time.perf_counter()
            model(ids, use_cache=False)
            times.append(time.perf_counter() - t)
    best = sorted(times)[1]  # the median of three
    return dict(parameters=parameter_count(model), forward_tokens=tokens, forward_s=best,
                seconds_per_token=best / tokens, threads=torch.get_num_threads())


SEARCH = """
import dataclasses, json, resource, sys, time
import torch
sys.path.insert(0, sys.argv[2])
import cqil_fx
from planning_cost import LayerTokenCounter
from sweep.shapes import SHAPES, build_model, parameter_count
shape = SHAPES[sys.argv[1]]
model = build_model(dataclasses.replace(shape, layers=shape.full_layers), "cpu", torch.float32)
built_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
counter = LayerTokenCounter(model)
started = time.perf_counter()
plan = cqil_fx.plan(model, remember=False)
seconds = time.perf_counter() - started
counted = counter.remove()
print(json.dumps(dict(counted, seconds=seconds, plan=repr(plan), parameters=parameter_count(model),
                      weights_gib=sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30,
                      peak_after_build_gib=built_kib / 2**20,
                      peak_gib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
                      full_model_tokens=counted["layer_tokens"] / shape.full_layers, dtype="float32",
                      threads=torch.get_num_threads())))
"""


def search(shape_name: str) -> dict:
    """The whole default search on the real shape (random weights), in a fresh process with an empty plan
    cache: seconds, forwards and peak resident memory. The search's progress goes to this process's stderr."""
    with tempfile.TemporaryDirectory(prefix="cqil-planning-cost-") as cache:
        return json.loads(python_child(f"the search on {shape_name}", SEARCH, shape_name,
                                       str(Path(__file__).resolve().parent),
                                       env=dict(os.environ, CQIL_FX_PLAN_CACHE=cache), show_stderr=True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="+", default=["smollm2-135m", "qwen2.5-0.5b", "llama-3.2-1b", "llama-3.1-8b"],
                        choices=sorted(SHAPES))
    parser.add_argument("--measure", nargs="*", default=["llama-3.2-1b"], choices=sorted(SHAPES),
                        help="shapes whose real-size forward is timed on this machine")
    parser.add_argument("--search", nargs="*", default=["qwen2.5-0.5b", "llama-3.2-1b"], choices=sorted(SHAPES),
                        help="shapes searched whole, with random weights, timed and their peak memory read")
    parser.add_argument("--stand-in-width", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--gpu-tflops", type=float, default=100.0,
                        help="assumed effective bf16 TFLOP/s of the search's forwards on one H200")
    parser.add_argument("--gpu-call-ms", type=float, default=50.0, help="assumed overhead per model call on a GPU")
    parser.add_argument("--out", default="benchmarks/results/planning-cost")
    args = parser.parse_args()
    # every search here runs, none is read from the plan cache: a cache of this run's own
    os.environ["CQIL_FX_PLAN_CACHE"] = tempfile.mkdtemp(prefix="cqil-planning-cost-")
    result = {"date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "threads": torch.get_num_threads(),
              "assumptions": {"gpu_tflops": args.gpu_tflops, "gpu_call_ms": args.gpu_call_ms},
              "shapes": {}}
    for name in args.shapes:
        counted = count(name, args.stand_in_width)
        entry = {"counted": counted}
        print(f"{name}: {counted['model_calls']} model calls, {counted['tokens']} tokens read, "
              f"{counted['full_model_tokens']:.0f} full-model tokens ({counted['layer_calls']} layer calls); "
              f"stand-in plan {counted['plan']}", flush=True)
        if name in args.measure:
            cost = forward_cost(name, args.tokens)
            entry["cpu"] = dict(cost, estimated_search_s=counted["full_model_tokens"] * cost["seconds_per_token"])
            print(f"  this machine: {cost['seconds_per_token'] * 1e3:.1f} ms per token of a {args.tokens}-token "
                  f"forward; the search estimated at {entry['cpu']['estimated_search_s']:.0f} s", flush=True)
        if name in args.search:
            entry["searched"] = search(name)
            done = entry["searched"]
            print(f"  searched on this machine: {done['seconds']:.0f} s, {done['model_calls']} model calls, "
                  f"{done['full_model_tokens']:.0f} full-model tokens; peak memory {done['peak_gib']:.2f} GiB "
                  f"({done['weights_gib']:.2f} GiB of weights); plan {done['plan']}", flush=True)
        params = parameter_count(build_model(dataclasses.replace(SHAPES[name], layers=SHAPES[name].full_layers),
                                             "meta", torch.bfloat16))
        flops = 2 * params * counted["full_model_tokens"]
        entry["h200_prediction"] = dict(parameters=params, tflop=flops / 1e12,
                                        seconds=flops / (args.gpu_tflops * 1e12)
                                        + counted["model_calls"] * args.gpu_call_ms / 1e3)
        print(f"  one H200, predicted: {entry['h200_prediction']['seconds']:.0f} s "
              f"({flops / 1e12:.0f} TFLOP at {args.gpu_tflops:.0f} TFLOP/s + {counted['model_calls']} calls x "
              f"{args.gpu_call_ms:.0f} ms)", flush=True)
        result["shapes"][name] = entry
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "planning_cost.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out / 'planning_cost.json'}")


if __name__ == "__main__":
    main()
