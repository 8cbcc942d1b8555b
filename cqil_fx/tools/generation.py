"""Generation helpers: a compiled twin of a Hugging Face causal LM, and per-token timing of ``generate``.

    twin = compiled_twin(model, make_backend(config))          # weights shared with ``model``
    out = twin.generate(ids, max_new_tokens=64, do_sample=False, cache_implementation="static")

``model.generate`` calls ``self.forward``, so the way to generate through a
backend is to compile ``forward`` (not to wrap the module in
``torch.compile``, whose ``OptimizedModule`` is not what ``generate`` calls).
``compiled_twin`` does that on a shallow copy, so one loaded model can be
compiled with several backends (the original and a CQIL plan, say) side by
side without loading its weights twice.
"""

from __future__ import annotations

import copy
import time
from typing import Any

import torch
from transformers import StoppingCriteria

from ..errors import CQILConfigError


def compiled_twin(model: torch.nn.Module, backend: Any, **compile_kwargs: Any) -> torch.nn.Module:
    """A shallow copy of ``model`` (parameters, buffers and config shared) whose ``forward`` is
    ``torch.compile(forward, backend=backend, **compile_kwargs)``.

    The twin gets its own ``generation_config`` with ``disable_compile=True``:
    transformers would otherwise wrap the decode step in a second ``torch.compile``
    of its own when the cache is static on a GPU.
    """
    twin = copy.copy(model)
    twin.generation_config = copy.deepcopy(model.generation_config)
    twin.generation_config.disable_compile = True
    twin.forward = torch.compile(twin.forward, backend=backend, **compile_kwargs)
    return twin


class TokenClock(StoppingCriteria):
    """A stopping criterion that never stops and records when each new token was chosen.

    ``generate`` calls it once per forward, after the token is appended, so
    ``stamps[0]`` is the end of the prefill step and ``stamps[i] - stamps[i-1]``
    the wall time of decode step ``i`` (forward, logits processing, sampling).
    """

    def __init__(self) -> None:
        self.stamps: list[float] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any) -> torch.BoolTensor:
        self.stamps.append(time.perf_counter())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    def per_token_ms(self) -> float:
        """Mean milliseconds per decode step (the steps after the prefill)."""
        if len(self.stamps) < 2:
            raise CQILConfigError("per-token time needs at least two generated tokens")
        return (self.stamps[-1] - self.stamps[0]) * 1e3 / (len(self.stamps) - 1)
