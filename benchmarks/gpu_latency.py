"""One GPU: plain Inductor vs CQIL local vs CQIL concurrent (CUDA streams), batch 1.

    python benchmarks/gpu_latency.py --out DIR

The model has SmolLM2-135M's architecture (LLaMA, 30 blocks, hidden 576) with
random weights: the real weights ship as a GGUF too large to carry to a GPU
machine, and latency does not depend on the weights' values.  Plan S12-E28,
P = 2, D = 0; interleaved repetitions, medians, CUDA-synchronised timing.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import transformers

from cqil_fx import CQILConfig, make_backend
from latency import WORKLOADS, measure


def smollm2_shaped(dtype: torch.dtype) -> torch.nn.Module:
    config = transformers.LlamaConfig(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
        num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048, tie_word_embeddings=True)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval().to("cuda", dtype)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--reps", type=int, default=30)
    args = parser.parse_args()
    torch._dynamo.config.recompile_limit = 64
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": []}
    for dtype in (torch.bfloat16,):
        model = smollm2_shaped(dtype)
        fns = {
            "inductor": torch.compile(model, backend="inductor", dynamic=False),
            "cqil-local": torch.compile(model, backend=make_backend(CQILConfig(start=12, end=28, mode="local")),
                                        dynamic=False),
            "cqil-concurrent": torch.compile(
                model, backend=make_backend(CQILConfig(start=12, end=28, mode="concurrent")), dynamic=False),
        }
        for workload in ("decode", "prefill-512"):
            ids = torch.randint(0, 49152, (1, WORKLOADS[workload]), device="cuda")
            t = time.perf_counter()
            measure(fns, ids, reps=0, warmup=2, sync=torch.cuda.synchronize)
            compile_s = time.perf_counter() - t
            times = measure(fns, ids, args.reps, sync=torch.cuda.synchronize)
            for name, ts in times.items():
                row = dict(dtype=str(dtype), workload=workload, column=name, median_ms=statistics.median(ts),
                           compile_s=compile_s)
                results["rows"].append(row)
                print(json.dumps(row), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_latency.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
