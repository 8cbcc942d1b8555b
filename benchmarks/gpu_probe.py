"""Concurrent mode on CUDA, generate after generate: tokens against local mode, one stage per process.

The sweep (benchmarks/gpu_sweep.py) saw an illegal memory access in the second static-cache
``generate`` of a P = 4 concurrent-graphs column (llama-3.2-1b shape, bf16, H200). This probe
repeats what the sweep does (the prompt prefilled eagerly, decode steps compiled, the cache reset
before each call) several times per model and plan, and after every call prints the tokens'
agreement with local mode's, each layer's cache length and the CUDA-graph counters. Each
stage runs in a process of its own, so a stage that kills its CUDA context leaves the others.

    python3 benchmarks/gpu_probe.py            # every stage
    python3 benchmarks/gpu_probe.py tiny-P4    # one stage, in this process
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks"), str(ROOT / "tests")]

import torch  # noqa: E402
from torch._dynamo.utils import counters  # noqa: E402

import gpu_sweep  # noqa: E402  (puts passes/ in place as cqil_fx.passes)
from cqil_fx import CQILConfig, make_backend  # noqa: E402
from cqil_fx.tools.generation import compiled_twin  # noqa: E402

# name -> (model, P, cuda_graphs, environment), in the order they run: the sweep's failure first
STAGES = {
    "1b-P4": ("llama-3.2-1b", 4, True, {}),
    "1b-P4-blocking": ("llama-3.2-1b", 4, True, {"CUDA_LAUNCH_BLOCKING": "1"}),
    "tiny-P4": ("tiny", 4, True, {}),
    "1b-P4-streams": ("llama-3.2-1b", 4, False, {}),
    "tiny-P2": ("tiny", 2, True, {}),
}
STAGE_S = 75  # one stage's limit
DEADLINE_S = float(os.environ.get("PROBE_DEADLINE_S", 220))  # no stage starts after this
CALLS = 4
DEVICE = os.environ.get("PROBE_DEVICE", "cuda")  # "cpu": a check of the script itself


def build(name: str, parallel: int):
    if name == "tiny":
        from tiny_models import tiny_model

        model = tiny_model("llama").to(DEVICE)
        return model, CQILConfig(start=2, end=6, parallel=parallel).plan_for(8), 24, 8
    shape = gpu_sweep.SHAPES[name]
    model = gpu_sweep.build_model(shape, DEVICE, torch.bfloat16)
    return model, gpu_sweep.sweep_plans(shape.layers, parallel)[f"P{parallel}"], 512, 16


def reference_tokens(model, plan, ids, settings: dict, length: int) -> torch.Tensor:
    """What the sweep's procedure gives in local mode (exact against the eager reference in the tests):
    the prompt prefilled by the original model, the decode steps by the plan."""
    twin = compiled_twin(model, make_backend(plan, mode="local"), dynamic=False)
    clock = gpu_sweep.StepClock(twin, cuda=False)
    clock.prefill_next = True
    cache = gpu_sweep.static_cache(model, 1, length)
    with torch.no_grad():
        return twin.generate(ids, **settings, **{gpu_sweep.cache_argument(model): cache})[:, ids.shape[1]:]


def stage(key: str) -> None:
    name, parallel, graphs, _ = STAGES[key]
    torch.backends.cuda.matmul.allow_tf32 = False
    model, plan, prompt, new = build(name, parallel)
    print(f"[{key}] plan {gpu_sweep.plan_label(plan)}, cuda_graphs={graphs}", flush=True)
    backend = make_backend(plan, mode="concurrent", cuda_graphs=graphs and DEVICE == "cuda")
    twin = compiled_twin(model, backend, dynamic=False)
    clock = gpu_sweep.StepClock(twin, cuda=DEVICE == "cuda")
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (1, prompt), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    settings = dict(attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                    do_sample=False, pad_token_id=0)
    name_ = gpu_sweep.cache_argument(model)
    cache = gpu_sweep.static_cache(model, 1, prompt + new)
    expected = reference_tokens(model, plan, ids, settings, prompt + new)
    for call in range(CALLS):
        started = time.perf_counter()
        cache.reset()
        clock.prefill_next = True
        with torch.no_grad():
            out = twin.generate(ids, **settings, **{name_: cache})[:, prompt:]
        if DEVICE == "cuda":
            torch.cuda.synchronize()
        lengths = sorted({int(layer.cumulative_length) for layer in cache.layers
                          if torch.is_tensor(getattr(layer, "cumulative_length", None))})
        agree = (out == expected).float().mean().item()
        print(f"[{key}] call {call}: {time.perf_counter() - started:.1f} s, tokens agree {agree:.2f}, "
              f"cache lengths {lengths}, cqil counters {dict(counters['cqil'])}", flush=True)


def main() -> int:
    if len(sys.argv) > 1:
        if sys.argv[1] not in STAGES:
            sys.exit(f"gpu_probe.py: unknown stage {sys.argv[1]!r}; stages: {', '.join(STAGES)}")
        stage(sys.argv[1])
        return 0
    failed, started = [], time.perf_counter()
    for key, (_, _, _, env) in STAGES.items():
        if time.perf_counter() - started > DEADLINE_S - STAGE_S / 2:
            print(f"[{key}] skipped: past the deadline", flush=True)
            continue
        if key.endswith("-blocking") and "1b-P4" not in failed:
            continue  # only to locate a failure
        try:
            done = subprocess.run([sys.executable, __file__, key], env={**os.environ, **env}, timeout=STAGE_S)
            code = done.returncode
        except subprocess.TimeoutExpired:
            code = "timeout"
        print(f"[{key}] exit {code}", flush=True)
        if code != 0:
            failed.append(key)
    print("failed stages:", failed or "none", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Exception:  # noqa: BLE001 - a stage's traceback, printed whole
        traceback.print_exc()
        sys.exit(1)
