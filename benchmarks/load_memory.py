"""What one SPMD rank holds and touches while ``load_rank_weights`` loads it, with and without TP.

    python benchmarks/load_memory.py [--dir /tmp/cqil_load_memory]

Saves a random Llama (hidden 512, 8 layers, vocabulary 8192: 152 MB of float32
weights) as safetensors once, then loads rank 0 of 2 with plan S2-E6 in a fresh
process per setting (a process that freed memory before would reuse it unseen),
and prints ``RankWeights``: the bytes its parameters hold and the peak of the
process's resident memory above its level before the load (``PeakMemory``).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def llama_config():
    import transformers

    return transformers.LlamaConfig(vocab_size=8192, hidden_size=512, intermediate_size=2048, num_hidden_layers=8,
                                    num_attention_heads=8, num_key_value_heads=4, tie_word_embeddings=False)


def save(directory: str) -> None:
    import torch
    import transformers
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(llama_config())
    os.makedirs(directory, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, os.path.join(directory, "model.safetensors"))


def load(directory: str, tensor_parallel: bool) -> None:
    from cqil_fx import CQILConfig
    from cqil_fx.graph.weights import load_rank_weights

    config = CQILConfig(start=2, end=6, mode="spmd", tensor_parallel=tensor_parallel)
    _, loaded = load_rank_weights(llama_config(), directory, config, rank=0, world_size=2)
    print(f"tensor_parallel={tensor_parallel}: {loaded}; peak / whole model "
          f"{loaded.peak_bytes / loaded.bytes_whole:.2f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", default="/tmp/cqil_load_memory")
    parser.add_argument("--load", choices=["plain", "tp"], help=argparse.SUPPRESS)  # one fresh process's part
    args = parser.parse_args()
    if args.load:
        load(args.dir, args.load == "tp")
        return
    if not os.path.exists(os.path.join(args.dir, "model.safetensors")):
        save(args.dir)
    for setting in ("plain", "tp"):
        subprocess.run([sys.executable, __file__, "--dir", args.dir, "--load", setting], check=True)


if __name__ == "__main__":
    main()
