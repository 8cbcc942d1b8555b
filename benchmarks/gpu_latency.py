"""One GPU, batch 1: plain Inductor vs CQIL local vs CQIL concurrent (CUDA streams), each with and
without CUDA graphs.

    python benchmarks/gpu_latency.py --out DIR [--reps 30]

The model has SmolLM2-135M's architecture (LLaMA, 30 blocks, hidden 576) with
random weights: the real weights ship as a GGUF too large to carry to a GPU
machine, and latency does not depend on the weights' values.  Plan S12-E28,
P = 2, D = 0; interleaved repetitions, medians, CUDA-synchronised timing.

Columns: ``inductor`` (``torch.compile`` default), ``inductor-graphs``
(``mode="reduce-overhead"``: Inductor's CUDA graph trees), ``cqil-local`` and
``cqil-local-graphs`` (the rewritten graph compiled by Inductor without / with
``triton.cudagraphs``), ``cqil-concurrent`` (member segments launched on their
own streams) and ``cqil-concurrent-graphs`` (``cuda_graphs=True``: the whole
concurrent program captured into one CUDA graph).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import transformers
from torch._inductor.compile_fx import compile_fx

from cqil_fx import CQILConfig, make_backend
from cqil_fx.tools.timing import Summary
from latency import WORKLOADS, measure

PLAN = dict(start=12, end=28, parallel=2, bypass=0)


def smollm2_shaped(dtype: torch.dtype) -> torch.nn.Module:
    config = transformers.LlamaConfig(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
        num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048, tie_word_embeddings=True)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval().to("cuda", dtype)


def inductor_with_graphs(gm, example_inputs):
    return compile_fx(gm, example_inputs, config_patches={"triton.cudagraphs": True})


def columns(model) -> dict:
    def cqil(**fields):
        return torch.compile(model, backend=make_backend(CQILConfig(**PLAN, **fields)), dynamic=False)

    return {
        "inductor": torch.compile(model, backend="inductor", dynamic=False),
        "inductor-graphs": torch.compile(model, mode="reduce-overhead", dynamic=False),
        "cqil-local": cqil(mode="local"),
        "cqil-local-graphs": cqil(mode="local", inner=inductor_with_graphs),
        "cqil-concurrent": cqil(mode="concurrent"),
        "cqil-concurrent-graphs": cqil(mode="concurrent", cuda_graphs=True),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--workloads", nargs="+", default=["decode", "prefill-512"],
                        choices=[w for w, (_, new) in WORKLOADS.items() if not new])
    args = parser.parse_args()
    torch._dynamo.config.recompile_limit = 64
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
               "date": time.strftime("%Y-%m-%d"), "plan": "S12-E28 P2 D0", "rows": []}
    dtype = torch.bfloat16
    model = smollm2_shaped(dtype)
    fns = columns(model)

    def sync() -> None:
        torch.cuda.synchronize()
        torch.compiler.cudagraph_mark_step_begin()  # each call is a new step for Inductor's graph trees

    for workload in args.workloads:
        ids = torch.randint(0, 49152, (1, WORKLOADS[workload][0]), device="cuda")
        t = time.perf_counter()
        measure(fns, workload, ids, reps=0, warmup=3, sync=sync)
        compile_s = time.perf_counter() - t
        times, _ = measure(fns, workload, ids, args.reps, sync=sync)
        for name, ts in times.items():
            spread = Summary.of(ts)
            row = dict(dtype=str(dtype), workload=workload, column=name, median_ms=spread.median,
                       p10_ms=spread.p10, p90_ms=spread.p90, compile_s=compile_s)
            results["rows"].append(row)
            print(json.dumps(row), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_latency.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
