"""What one SPMD rank holds and touches while ``load_rank_weights`` loads it, with and without TP.

    python benchmarks/load_memory.py [--dir /tmp/cqil_load_memory]            # the Llama below
    python benchmarks/load_memory.py --shape qwen2.5-0.5b                      # tied embedding, 2 GB file
    python benchmarks/load_memory.py --shape smollm2                           # heads that do not divide

Saves a random model as safetensors once, then loads rank 0 of 2 in a fresh
process per setting (a process that freed memory before would reuse it unseen),
and prints ``RankWeights``: the bytes its parameters hold and the peak of the
process's resident memory above its level before the load (``PeakMemory``).
Shapes: ``llama`` (hidden 512, 8 layers, vocabulary 8192, untied: 152 MB of
float32 weights; plan S2-E6) and ``qwen2.5-0.5b`` (Qwen2.5-0.5B's shape: 24
layers, hidden 896, a 151,936-word embedding tied to the LM head, 1.98 GB;
plan S10-E22, the plan of docs/notes/performance.md's TP benchmark) and ``smollm2``
(SmolLM2-135M's shape, random weights: 30 layers, hidden 576, 9 / 3 heads, a
49,152-word tied embedding; plan S12-E28; its heads do not divide by 2, so
TP loads with ``tp_fallback=True``: attention whole on every rank).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHAPES = {  # name -> (config class, config kwargs, plan span)
    "llama": ("LlamaConfig", dict(vocab_size=8192, hidden_size=512, intermediate_size=2048, num_hidden_layers=8,
                                  num_attention_heads=8, num_key_value_heads=4, tie_word_embeddings=False), (2, 6)),
    "qwen2.5-0.5b": ("Qwen2Config", dict(vocab_size=151936, hidden_size=896, intermediate_size=4864,
                                         num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                                         tie_word_embeddings=True), (10, 22)),
    "smollm2": ("LlamaConfig", dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                                    num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True), (12, 28)),
}


def model_config(shape: str):
    import transformers

    kind, kwargs, _ = SHAPES[shape]
    return getattr(transformers, kind)(**kwargs)


def save(directory: str, shape: str) -> None:
    import torch
    import transformers

    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(model_config(shape))
    model.save_pretrained(directory)  # safetensors; a tied table is stored once


def load(directory: str, shape: str, tensor_parallel: bool) -> None:
    from cqil_fx import CQILConfig
    from cqil_fx.graph.weights import load_rank_weights

    _, kwargs, (start, end) = SHAPES[shape]
    divide = kwargs["num_attention_heads"] % 2 == 0 and kwargs["num_key_value_heads"] % 2 == 0
    config = CQILConfig(start=start, end=end, mode="spmd", tensor_parallel=tensor_parallel,
                        tp_fallback=tensor_parallel and not divide)
    _, loaded = load_rank_weights(model_config(shape), directory, config, rank=0, world_size=2)
    print(f"{shape}, tensor_parallel={tensor_parallel}, tp_fallback={config.tp_fallback}: {loaded}; peak / whole model "
          f"{loaded.peak_bytes / loaded.bytes_whole:.2f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=list(SHAPES), default="llama")
    parser.add_argument("--dir", help="where the random model is saved (default /tmp/cqil_load_memory[-SHAPE])")
    parser.add_argument("--load", choices=["plain", "tp"], help=argparse.SUPPRESS)  # one fresh process's part
    args = parser.parse_args()
    directory = args.dir or "/tmp/cqil_load_memory" + ("" if args.shape == "llama" else f"-{args.shape}")
    if args.load:
        load(directory, args.shape, args.load == "tp")
        return
    if not os.path.exists(os.path.join(directory, "model.safetensors")):
        save(directory, args.shape)
    for setting in ("plain", "tp"):
        subprocess.run([sys.executable, __file__, "--shape", args.shape, "--dir", directory, "--load", setting],
                       check=True)


if __name__ == "__main__":
    main()
