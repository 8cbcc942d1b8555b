"""How each column of the sweep is compiled and called: compiled twins, their step clocks and static
caches, decode and prefill calls, thread counts."""

from __future__ import annotations

import dataclasses
import inspect
import math
import time
import types
from collections.abc import Callable
from typing import Any

import torch
import transformers

from cqil_fx import Plan, make_backend
from cqil_fx.graph.executor import segment_settings
from cqil_fx.tools.generation import TokenClock
from cqil_fx.tools.timing import median

from .work import Part, column_parts


def inductor_with(patches: dict[str, Any]) -> Callable:
    """Inductor under ``config_patches`` (e.g. ``{"triton.cudagraphs": True}``), as a Dynamo backend."""
    def backend(gm, example_inputs):
        from torch._inductor.compile_fx import compile_fx  # heavy: import on first use

        return compile_fx(gm, example_inputs, config_patches=patches)

    return backend


def compile_settings(column: str, plans: dict[str, Plan], part: Part) -> tuple[dict[str, Any], Any]:
    """``torch.compile`` keyword arguments for ``column``, and its cqil backend (for its reports) or None."""
    kind, key, _ = column_parts(column)
    if kind == "ideal":
        kind = part.ideal_like
    inductor = part.compiler == "inductor"
    if kind in ("inductor", "inductor-graphs", "inductor-cpp"):
        if not inductor:
            return {"backend": part.compiler}, None
        if kind == "inductor-graphs":
            return {"backend": "inductor", "mode": "reduce-overhead"}, None
        # inductor-cpp: the settings of concurrent mode's shared segments (the C++ wrapper, built apart at
        # -O1 from the kernels: the same per call, about half the cold compile; docs/notes/performance.md)
        cpp = segment_settings(shared=True, device_type="cpu")
        return {"backend": inductor_with(cpp) if kind == "inductor-cpp" else "inductor"}, None
    plan = plans[key]
    if kind == "cqil-local-graphs":
        inner = inductor_with({"triton.cudagraphs": True}) if inductor else part.compiler
        backend = make_backend(plan, mode="local", inner=inner)
    elif kind == "cqil-concurrent-graphs":
        backend = make_backend(plan, mode="concurrent", cuda_graphs=True, inner=part.compiler)
    elif kind == "cqil-concurrent":
        backend = make_backend(plan, mode="concurrent", inner=part.compiler)
    else:
        raise ValueError(f"unknown column {column!r}")
    return {"backend": backend}, backend


class StepClock:
    """A compiled twin's ``forward``, timed; the prefill of ``generate`` goes to the uncompiled forward.

    Set ``prefill_next`` before ``generate``: its first forward (the prompt) then runs eagerly and is not
    timed, so a decode cell compiles the decode graph only.  Every other forward's span is recorded
    (CUDA events on a GPU, so launches are not serialised by the clock).
    """

    def __init__(self, twin: torch.nn.Module, cuda: bool):
        self.compiled = twin.forward
        self.eager = types.MethodType(type(twin).forward, twin)
        self.cuda = cuda
        self.prefill_next = False
        self.spans: list[tuple[Any, Any]] = []
        twin.forward = self

    def __call__(self, *args, **kwargs):
        if self.prefill_next:
            self.prefill_next = False
            return self.eager(*args, **kwargs)
        start = self._now()
        out = self.compiled(*args, **kwargs)
        self.spans.append((start, self._now()))
        return out

    def _now(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def take_ms(self) -> float:
        """The median span since the last ``take_ms``, in ms."""
        if not self.spans:
            return math.nan
        if self.cuda:
            self.spans[-1][1].synchronize()
            ms = [start.elapsed_time(end) for start, end in self.spans]
        else:
            ms = [(end - start) * 1e3 for start, end in self.spans]
        self.spans.clear()
        return median(ms)


@dataclasses.dataclass
class Twin:
    """One column's compiled twin of a model, with its clock, static caches and cqil backend."""

    module: torch.nn.Module
    clock: StepClock
    backend: Any
    caches: dict[int, Any] = dataclasses.field(default_factory=dict)


def static_cache(model: torch.nn.Module, batch: int, max_cache_len: int):
    """A transformers ``StaticCache`` for ``model``: made lazily on its first update (transformers 5), or
    up front where the constructor still asks for the batch, device and dtype (older releases)."""
    try:
        return transformers.StaticCache(config=model.config, max_cache_len=max_cache_len)
    except TypeError:
        parameter = next(model.parameters())
        return transformers.StaticCache(config=model.config, max_batch_size=batch, max_cache_len=max_cache_len,
                                        device=parameter.device, dtype=parameter.dtype)


def cache_argument(model: torch.nn.Module) -> str:
    """The name ``generate`` takes a cache by: ``cache`` in newer transformers, ``past_key_values`` before."""
    return "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"


def decode_call(twin: Twin, ids: torch.Tensor, part: Part) -> Callable[[], dict]:
    """One static-cache ``generate`` of ``part.new_tokens`` tokens; returns ms per token and per forward."""
    batch = ids.shape[0]
    if batch not in twin.caches:
        twin.caches[batch] = static_cache(twin.module, batch, part.prompt + part.new_tokens)
    cache, mask, name = twin.caches[batch], torch.ones_like(ids), cache_argument(twin.module)

    def call() -> dict:
        cache.reset()
        tokens = TokenClock()
        twin.clock.spans.clear()
        twin.clock.prefill_next = True
        twin.module.generate(ids, attention_mask=mask, max_new_tokens=part.new_tokens,
                             min_new_tokens=part.new_tokens, do_sample=False, stopping_criteria=[tokens],
                             pad_token_id=0, **{name: cache})
        return {"token_ms": tokens.per_token_ms(), "forward_ms": twin.clock.take_ms()}

    return call


def with_threads(call: Callable[[], dict], threads: int) -> Callable[[], dict]:
    """``call`` under ``torch.set_num_threads(threads)`` (its first call compiles: Inductor reads the count then).

    Inductor's ``cpp.threads`` is set to the same count for the call: its FX graph cache keys include the
    thread count a C++ kernel bakes in only from torch 2.13 on, and the cache must not hand a compile made
    on one count to a column on another (gpu_session.sh fills it from processes of different counts).
    Members of a concurrent group keep their own ``cpp.threads`` (``threads // P``).
    """
    from torch._inductor import config as inductor_config

    def threaded() -> dict:
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            with inductor_config.patch({"cpp.threads": threads}):
                return call()
        finally:
            torch.set_num_threads(before)

    return threaded


def prefill_call(twin: Twin, ids: torch.Tensor) -> Callable[[], dict]:
    """One compiled forward of the whole prompt without a cache, the last position's logits only."""
    def call() -> dict:
        twin.clock.compiled(ids, use_cache=False, logits_to_keep=1)
        return {}

    return call
