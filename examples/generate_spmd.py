"""Greedy generation with SmolLM2-135M, one group member per rank (``mode="spmd"``).

    torchrun --nproc-per-node 2 examples/generate_spmd.py                 # CPU: gloo, one thread per rank
    torchrun --nproc-per-node 2 examples/generate_spmd.py --span 12-28 --bypass 1 --tokens 32
    torchrun --nproc-per-node 2 examples/generate_spmd.py --cache dynamic   # transformers' default cache

(``--span START-END`` rather than ``--start``/``--end``: torchrun reads an
abbreviated ``--start`` after the script's name as its own ``--start-method``.)

Every rank loads the model, releases the weights of the members other ranks
compute, and generates with a static KV cache (``--cache dynamic``: the default
dynamic one, compiled with dynamic shapes) through the cqil backend; the
ranks' collectives keep them in step, so every rank produces the same tokens.
A rank neither computes nor keeps the keys and values of the other ranks'
members (docs/architecture.md, "KV-cache writes").
Rank 0 prints the text, tokens/s, and what each rank holds.  Before that, rank 0
times the original model alone (one process, same thread count and compiler)
while the other ranks wait, for the comparison.  Each model's first generate
call compiles; the second is timed.  On GPUs the same script runs with NCCL
(``cuda:<local rank>``).
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.distributed as dist

from cqil_fx import CQILConfig, make_backend
from cqil_fx.graph.distributed import parameter_bytes, release_other_members
from cqil_fx.tools.generation import compiled_twin
from cqil_fx.tools.models import load_smollm2

PROMPT = "In Python, a list comprehension is"


def timed(model, batch, generate: dict, barrier=lambda: None) -> tuple[torch.Tensor, float]:
    """(tokens, seconds) of a second generate call; the first compiles the prefill and decode graphs."""
    with torch.no_grad():
        model.generate(**batch, **generate)
        barrier()
        started = time.perf_counter()
        out = model.generate(**batch, **generate)
        return out, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--span", default="20-28", help="START-END: the blocks [START, END) to group")
    parser.add_argument("--bypass", type=int, default=0)
    parser.add_argument("--tokens", type=int, default=24)
    parser.add_argument("--prompt", default=PROMPT)
    parser.add_argument("--cache", choices=("static", "dynamic"), default="static",
                        help="transformers' KV cache: static (compiled with static shapes) or dynamic")
    args = parser.parse_args()
    try:
        start, end = (int(b) for b in args.span.split("-"))
    except ValueError:
        parser.error(f"--span takes START-END, e.g. 12-28 (got {args.span!r})")

    device = torch.device("cpu")
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(1)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    config = CQILConfig(start=start, end=end, parallel=world, bypass=args.bypass, mode="spmd")

    model, tokenizer = load_smollm2()
    model.to(device)
    if args.cache == "static":
        model.generation_config.cache_implementation = "static"
    dynamic = False if args.cache == "static" else None  # a dynamic cache grows: one graph for every length
    batch = tokenizer(args.prompt, return_tensors="pt").to(device)
    generate = dict(max_new_tokens=args.tokens, min_new_tokens=args.tokens, do_sample=False,
                    pad_token_id=tokenizer.eos_token_id)
    if rank == 0:
        original = timed(compiled_twin(model, "inductor", dynamic=dynamic), batch, generate)
        # Dynamo remembers the sizes that compile saw (automatic dynamic shapes) and would compile rank 0's
        # CQIL graphs dynamic where the others' are static: the ranks must compile the same graphs.
        torch._dynamo.reset()
    dist.barrier()

    full = parameter_bytes(model)
    release_other_members(model, config)
    backend = make_backend(config)
    cqil = timed(compiled_twin(model, backend, dynamic=dynamic), batch, generate, barrier=dist.barrier)
    new = cqil[0][0, batch["input_ids"].shape[1]:]
    tokens = [None] * world
    dist.all_gather_object(tokens, new.tolist())
    if rank == 0:
        print(f"plan: {backend.reports[-1].plan}; {world} ranks; transport {backend.reports[-1].transport}; "
              f"{args.cache} cache")
        print(f"weights held per rank: {parameter_bytes(model) / 2**20:.0f} MiB of {full / 2**20:.0f} MiB")
        for name, (out, seconds) in (("original, 1 process", original), (f"CQIL, {world} ranks", cqil)):
            text = tokenizer.decode(out[0, batch["input_ids"].shape[1]:])
            print(f"{name}: {args.tokens} tokens in {seconds:.2f} s, {args.tokens / seconds:.1f} tokens/s: {text!r}")
        print("every rank produced the same tokens:", all(t == tokens[0] for t in tokens))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
