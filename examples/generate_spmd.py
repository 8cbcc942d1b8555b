"""Greedy generation with SmolLM2-135M, one group member per rank (``mode="spmd"``).

    torchrun --nproc-per-node 2 examples/generate_spmd.py                 # CPU: gloo, one thread per rank
    torchrun --nproc-per-node 2 examples/generate_spmd.py --start 12 --end 28 --bypass 1 --tokens 32

Every rank loads the model, releases the weights of the members other ranks
compute, and generates with a static KV cache through the cqil backend; the
ranks' collectives keep them in step, so every rank produces the same tokens.
Rank 0 prints the text, tokens/s, and what each rank holds.  On GPUs the same
script runs with NCCL (``cuda:<local rank>``).
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.distributed as dist

from cqil_fx import CQILConfig, make_backend
from cqil_fx.distributed import parameter_bytes, release_other_members
from cqil_fx.models import load_smollm2

PROMPT = "In Python, a list comprehension is"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--start", type=int, default=20)
    parser.add_argument("--end", type=int, default=28)
    parser.add_argument("--bypass", type=int, default=0)
    parser.add_argument("--tokens", type=int, default=24)
    parser.add_argument("--prompt", default=PROMPT)
    args = parser.parse_args()

    device = torch.device("cpu")
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(1)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    config = CQILConfig(start=args.start, end=args.end, parallel=world, bypass=args.bypass, mode="spmd")

    model, tokenizer = load_smollm2()
    full = parameter_bytes(model)
    release_other_members(model, config)
    model.to(device)
    model.generation_config.cache_implementation = "static"
    backend = make_backend(config)
    model.forward = torch.compile(model.forward, backend=backend, dynamic=False)

    batch = tokenizer(args.prompt, return_tensors="pt").to(device)
    generate = dict(max_new_tokens=args.tokens, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    with torch.no_grad():
        model.generate(**batch, **generate)  # compiles the prefill and decode graphs for this cache size
        dist.barrier()
        started = time.perf_counter()
        out = model.generate(**batch, **generate)
        seconds = time.perf_counter() - started
    new = out[0, batch["input_ids"].shape[1]:]
    tokens = [None] * world
    dist.all_gather_object(tokens, new.tolist())
    if rank == 0:
        print(f"plan: {backend.reports[-1].plan}; {world} ranks; transport {backend.reports[-1].transport}")
        print(f"weights held per rank: {parameter_bytes(model) / 2**20:.0f} MiB of {full / 2**20:.0f} MiB")
        print(f"{args.prompt!r} ->{tokenizer.decode(new)!r}")
        print(f"{len(new)} tokens in {seconds:.2f} s: {len(new) / seconds:.1f} tokens/s")
        print("every rank produced the same tokens:", all(t == tokens[0] for t in tokens))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
