"""Weights per SPMD rank: build the model on the meta device, read only this rank's tensors.

    # torchrun --nproc-per-node 2 script.py
    model, loaded = load_rank_weights(config, "model.safetensors", CQILConfig(start=12, end=28, mode="spmd",
                                                                              tensor_parallel=True))
    print(loaded)            # RankWeights(rank 0: 61.2 MB of 134.5 MB, ...)
    fast = torch.compile(model, backend=make_backend(loaded.config))

The model is built under accelerate's ``init_empty_weights`` (no memory) and
each parameter is materialised with ``set_module_tensor_to_device`` from the
safetensors file, read through ``safe_open(...).get_slice`` so that a rank
reads only the rows or columns it keeps:

* the members of its own groups: whole;
* the members other ranks compute: a zero-stride view of one element (no
  memory; Dynamo still sees the parameter's shape, the placed graph never
  reads it), as :func:`~cqil_fx.graph.distributed.release_other_members` does;
* with ``tensor_parallel``, the linears of the blocks outside groups and the
  LM head: the rank's slice, as the model's own transformers tensor-parallel
  plan (``model._tp_plan``: ``colwise``, ``rowwise``, ``colwise_gather_output``)
  names them; the parameter *is* the slice, and carries ``_cqil_shard`` so
  :func:`~cqil_fx.passes.tensor_parallel.shard_blocks` adds the collectives
  without slicing it again.  A row-parallel bias stays whole (added once,
  after the all-reduce);
* with ``tensor_parallel``, the input embedding: the rank's rows of the
  vocabulary (the pass looks ids up in them and all-reduces), when the
  vocabulary divides by the world size.  An LM head tied to it is the same
  parameter, so it holds the same rows, which is the LM head's split;
* everything else (norms, position embeddings): whole.

:func:`shard_rank_weights` does the same to a model already in memory, whole
(``from_pretrained``): it replaces the parameters in place, so the rank keeps
(after garbage collection) what :func:`load_rank_weights` would have read, and
a graph traced afterwards is traced with the rank's slices, as after loading
(a dynamic KV cache then works with ``tensor_parallel``).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import logging
import os
import threading

import torch
import torch.distributed as dist
from torch import nn

from ..config import CQILConfig, Plan
from ..errors import CQILConfigError, CQILPlanError
from ..stack import decoder_layers
from .distributed import parameter_bytes

log = logging.getLogger(__name__)

SHARD_ATTRIBUTE = "_cqil_shard"  # "colwise" | "rowwise" on a parameter that holds only this rank's slice
_SPLITS = {"colwise": 0, "colwise_gather_output": 0, "rowwise": 1}
_RELEASED = "released"  # a parameter of another rank's member: a zero-stride stand-in


@dataclasses.dataclass(frozen=True)
class RankWeights:
    """What :func:`load_rank_weights` materialised on one rank (or :func:`shard_rank_weights` kept)."""

    rank: int
    world_size: int
    config: CQILConfig
    bytes_loaded: int  # bytes this rank's parameters hold
    bytes_whole: int  # bytes of the whole model's parameters
    sharded: tuple[str, ...]  # parameters holding only this rank's slice
    released: tuple[str, ...]  # parameters of other ranks' members (no memory)
    peak_bytes: int | None = None  # the process's peak resident memory above its level before the load

    @property
    def fraction(self) -> float:
        return self.bytes_loaded / self.bytes_whole

    def __repr__(self) -> str:
        return (f"RankWeights(rank {self.rank}/{self.world_size}: {self.bytes_loaded / 2**20:.2f} MB of "
                f"{self.bytes_whole / 2**20:.2f} MB ({self.fraction:.0%}), {len(self.sharded)} sharded, "
                f"{len(self.released)} released"
                + (f", peak {self.peak_bytes / 2**20:.2f} MB while loading" if self.peak_bytes is not None else "")
                + ")")


class PeakMemory:
    """The peak of this process's resident memory above its level at entry, while the block runs.

    Sampled every millisecond from ``/proc/self/statm`` by a daemon thread (so a spike shorter
    than that can be missed); it counts the pages of a memory-mapped file the block touched as
    well as its allocations. ``bytes`` is None where ``/proc`` is not there.
    """

    def __enter__(self) -> PeakMemory:
        self.base = self.peak = _resident_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True, name="cqil-peak-memory")
        if self.base is not None:
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.001):
            self.peak = max(self.peak, _resident_bytes() or 0)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        if self.base is not None:
            self.peak = max(self.peak, _resident_bytes() or 0)

    @property
    def bytes(self) -> int | None:
        return None if self.base is None else max(0, self.peak - self.base)


def _resident_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def load_rank_weights(model_config, path: str | os.PathLike, config: CQILConfig,
                      rank: int | None = None, world_size: int | None = None) -> tuple[nn.Module, RankWeights]:
    """Build ``model_config``'s causal LM on the meta device and load this rank's weights from ``path``.

    ``path`` is a safetensors file (or a directory holding ``model.safetensors``).
    ``config`` must name its plan explicitly (groups, span or Plan): the weights
    to read depend on it.  Returns the model (eval mode, no grad) and what it holds.
    """
    from accelerate import init_empty_weights
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    rank, world_size = _rank_and_world(rank, world_size, config, "load_rank_weights needs the plan before the "
                                       "model exists")
    path = os.path.join(path, "model.safetensors") if os.path.isdir(path) else path
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(model_config)
    _retie(model)  # one parameter for a tied table, read from the file once
    parts = _rank_parts(model, config, rank, world_size)
    whole = sum(p.numel() * p.element_size() for p in model.parameters())
    with PeakMemory() as peak, safe_open(path, framework="pt") as f:
        names = set(f.keys())
        for name, param in list(model.named_parameters()):
            if parts[name] == _RELEASED:
                value = torch.zeros((), dtype=param.dtype).expand(param.shape)
            else:
                value = _read(f, _stored_name(name, names), parts[name], rank, world_size, name)
            _set(model, name, value, _split(parts[name]))
    return model, _finish(model, parts, RankWeights(rank, world_size, config, 0, whole, (), (), peak.bytes))


def shard_rank_weights(model: nn.Module, config: CQILConfig, rank: int | None = None,
                       world_size: int | None = None) -> RankWeights:
    """:func:`load_rank_weights` for ``model`` already in memory with its whole weights: in place.

    Each parameter this rank would not have read is replaced (another rank's
    member: a zero-stride stand-in; a tensor-parallel split: a copy of the
    rank's slice, marked for the pass), so its whole tensor is freed once
    nothing else holds it. Call it before ``torch.compile`` traces the model. Like the loader, it
    leaves the model in eval mode without gradients.
    """
    rank, world_size = _rank_and_world(rank, world_size, config, "shard_rank_weights needs the plan")
    parts = _rank_parts(model, config, rank, world_size)
    whole = parameter_bytes(model)
    for name, param in list(model.named_parameters()):
        if parts[name] == _RELEASED:
            value = torch.zeros((), dtype=param.dtype, device=param.device).expand(param.shape)
        elif parts[name] is not None:
            dim, part = _part(param.shape, parts[name], rank, world_size, name)
            value = param.detach()[part] if dim == 0 else param.detach()[:, part]
            value = value.clone(memory_format=torch.contiguous_format)
        else:
            continue
        _set(model, name, value, _split(parts[name]))
    return _finish(model, parts, RankWeights(rank, world_size, config, 0, whole, (), ()))


def _rank_and_world(rank: int | None, world_size: int | None, config: CQILConfig, needs: str) -> tuple[int, int]:
    if config.wants_auto_plan:
        raise CQILConfigError(f"{needs}: give groups=, start=/end= or plan=, not an automatic plan")
    if rank is None or world_size is None:
        ready = dist.is_available() and dist.is_initialized()
        rank, world_size = (dist.get_rank(), dist.get_world_size()) if ready else (0, 1)
    return rank, world_size


def _rank_parts(model: nn.Module, config: CQILConfig, rank: int, world_size: int) -> dict[str, str | None]:
    """Per parameter name, what this rank holds of it: ``_RELEASED`` (another rank's member), "colwise" or
    "rowwise" (its slice), or None (whole)."""
    layers = decoder_layers(model)
    plan = config.plan_for(len(layers))
    owner = _layer_owner(model, layers)
    others = _other_members(plan, rank)
    tp_plan = _tp_plan(model) if config.tensor_parallel and world_size > 1 else {}
    if tp_plan and not _heads_divide(model.config, world_size, config.tp_fallback):
        tp_plan = {k: v for k, v in tp_plan.items() if "attn" not in k}  # tp_fallback: attention whole
    grouped = {i for g in plan.groups for i in g}
    vocabulary = _vocabulary_split(model, world_size) if tp_plan else None
    parts = {}
    for name, _ in model.named_parameters():
        layer = owner.get(name)
        if layer in others:
            parts[name] = _RELEASED
        else:
            parts[name] = "colwise" if name == vocabulary else (
                None if layer in grouped else _split_of(name, tp_plan, model))
    return parts


def _split(part: str | None) -> str | None:
    """The split ``_set`` marks a parameter with: none for a whole one or a released stand-in."""
    return None if part == _RELEASED else part


def _finish(model: nn.Module, parts: dict[str, str | None], weights: RankWeights) -> RankWeights:
    """Tie again, eval mode, no grad; ``weights`` with what the model now holds."""
    _retie(model)
    model.eval().requires_grad_(False)
    weights = dataclasses.replace(
        weights, bytes_loaded=parameter_bytes(model),
        sharded=tuple(n for n, p in parts.items() if p not in (None, _RELEASED)),
        released=tuple(n for n, p in parts.items() if p == _RELEASED))
    log.info("cqil: %s", weights)
    return weights


def _layer_owner(model: nn.Module, layers) -> dict[str, int]:
    index = {id(p): i for i, layer in enumerate(layers) for p in layer.parameters()}
    return {name: index[id(p)] for name, p in model.named_parameters() if id(p) in index}


def _other_members(plan: Plan, rank: int) -> set[int]:
    out = set()
    for group in plan.groups:
        if rank >= len(group):
            raise CQILPlanError(f"rank {rank} has no member in group {list(group)}")
        out |= {i for k, i in enumerate(group) if k != rank}
    return out


def _heads_divide(model_config, world_size: int, fallback: bool) -> bool:
    heads = getattr(model_config, "num_attention_heads", None)
    kv_heads = getattr(model_config, "num_key_value_heads", None) or heads
    if heads is None or (heads % world_size == 0 and kv_heads % world_size == 0):
        return True
    if fallback:
        return False
    raise CQILPlanError(
        f"tensor_parallel=True: {heads} attention heads and {kv_heads} key/value heads do not both divide by "
        f"the world size {world_size}; launch a world size that divides them, set tp_fallback=True (attention "
        "whole on every rank), or use tensor_parallel=False")


def _tp_plan(model: nn.Module) -> dict[str, str]:
    plan = dict(getattr(model, "_tp_plan", None) or {})
    if not plan:
        raise CQILConfigError(f"{type(model).__name__} has no transformers tensor-parallel plan (_tp_plan) "
                              "to read sharded weights by; load it whole (tensor_parallel still splits it in "
                              "the graph, from the whole weights)")
    return plan


def _split_of(name: str, tp_plan: dict[str, str], model: nn.Module) -> str | None:
    module, _, kind = name.rpartition(".")
    for pattern, style in tp_plan.items():
        if style in _SPLITS and fnmatch.fnmatchcase(module, pattern):
            if style == "rowwise" and kind == "bias":
                return None  # added once, after the all-reduce
            if style == "colwise_gather_output" and _tied(model, name):
                return None  # the LM head is the embedding's parameter: split (or not) with it
            return "rowwise" if style == "rowwise" else "colwise"
    return None


def _vocabulary_split(model: nn.Module, world_size: int) -> str | None:
    """The name of the input embedding's weight when its rows (the vocabulary) divide by ``world_size``."""
    embeddings = model.get_input_embeddings()
    weight = getattr(embeddings, "weight", None)
    if not isinstance(embeddings, nn.Embedding) or weight is None or weight.shape[0] % world_size:
        return None
    return next(name for name, p in model.named_parameters() if p is weight)


def _retie(model: nn.Module) -> None:
    """An LM head tied to the embedding holds the embedding's parameter (loading replaces parameters one by
    one, so this runs again after it)."""
    head = model.get_output_embeddings()
    if head is not None and getattr(model.config, "tie_word_embeddings", False):
        head.weight = model.get_input_embeddings().weight


def _tied(model: nn.Module, name: str) -> bool:
    embeddings = model.get_input_embeddings()
    return embeddings is not None and name.endswith("weight") and bool(
        getattr(model.config, "tie_word_embeddings", False))


def _stored_name(name: str, names: set[str]) -> str:
    if name in names:
        return name
    tail = [n for n in names if n.endswith("." + name) or name.endswith("." + n)]
    if len(tail) != 1:
        raise CQILConfigError(f"parameter {name} is not in the safetensors file (or is ambiguous: {tail})")
    return tail[0]


def _read(f, key: str, split: str | None, rank: int, world_size: int, name: str) -> torch.Tensor:
    if split is None:
        return f.get_tensor(key)
    stored = f.get_slice(key)
    dim, part = _part(stored.get_shape(), split, rank, world_size, name)
    value = stored[part] if dim == 0 else stored[:, part]
    return value.clone(memory_format=torch.contiguous_format)  # its own storage, not a view of the whole


def _part(shape, split: str, rank: int, world_size: int, name: str) -> tuple[int, slice]:
    """(the dimension ``split`` cuts a tensor of ``shape`` along, this rank's slice of it)."""
    dim = _SPLITS[split] if len(shape) > 1 else 0
    if shape[dim] % world_size:
        raise CQILPlanError(f"tensor_parallel=True: {name} has {shape[dim]} rows/columns along the split "
                            f"dimension, which do not divide by the world size {world_size}")
    size = shape[dim] // world_size
    return dim, slice(rank * size, (rank + 1) * size)


def _set(model: nn.Module, name: str, value: torch.Tensor, split: str | None) -> None:
    from accelerate.utils import set_module_tensor_to_device

    module_name, _, tensor_name = name.rpartition(".")
    module = model.get_submodule(module_name)
    if split is None and value.stride() != (0,) * value.dim():
        set_module_tensor_to_device(model, name, "cpu", value=value)
        return
    # A slice (or a zero-stride stand-in) has another shape than the meta parameter: replace it.
    param = nn.Parameter(value, requires_grad=False)
    if split is not None:
        setattr(param, SHARD_ATTRIBUTE, split)
    setattr(module, tensor_name, param)
