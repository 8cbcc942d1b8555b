"""Tiny random HF decoder-only models of several families, built from configs (no downloads).

Weights are drawn with a large ``initializer_range`` so that every block moves
the residual stream a lot: a wrong rewrite then changes the logits by far more
than float32 rounding, and the tests can tell CQIL output from the original's.
"""

from __future__ import annotations

import functools

import torch
import transformers

VOCAB = 96
LAYERS = 8
HIDDEN = 32
INIT = 0.15

_COMMON = dict(vocab_size=VOCAB, initializer_range=INIT, tie_word_embeddings=False)
_LLAMA_LIKE = dict(
    hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=LAYERS,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
)

# family -> (config class, model class, config kwargs, residual kind)
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", _LLAMA_LIKE, "sequential"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", _LLAMA_LIKE, "sequential"),
    "mistral": ("MistralConfig", "MistralForCausalLM", _LLAMA_LIKE, "sequential"),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(_LLAMA_LIKE, head_dim=8), "sequential"),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel",
             dict(n_embd=HIDDEN, n_layer=LAYERS, n_head=4, n_positions=128), "sequential"),
    "phi": ("PhiConfig", "PhiForCausalLM",
            dict(hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=LAYERS,
                 num_attention_heads=4, max_position_embeddings=128), "parallel"),
    "gptj": ("GPTJConfig", "GPTJForCausalLM",
             dict(n_embd=HIDDEN, n_layer=LAYERS, n_head=4, rotary_dim=4, n_positions=128), "parallel"),
}
SEQUENTIAL = [f for f, spec in FAMILIES.items() if spec[3] == "sequential"]
PARALLEL = [f for f, spec in FAMILIES.items() if spec[3] == "parallel"]


@functools.cache
def tiny_model(family: str, seed: int = 0) -> torch.nn.Module:
    """A float32 eval-mode model of ``family``; cached, so never modify it in a test."""
    config_cls, model_cls, kwargs, _ = FAMILIES[family]
    config = getattr(transformers, config_cls)(**_COMMON, **kwargs)
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(config).eval()
    model.requires_grad_(False)
    return model


def tokens(batch: int = 2, length: int = 11, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch, length), generator=g)
