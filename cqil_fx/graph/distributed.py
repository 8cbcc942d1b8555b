"""SPMD runtime (``mode="spmd"``): the ranks' process group, agreement on plans, clear errors, weights per rank.

    # torchrun --nproc-per-node 2 script.py
    import torch.distributed as dist
    dist.init_process_group()                         # gloo on CPU, nccl on CUDA
    model = load_model()
    release_other_members(model, CQILConfig(start=12, end=28, parallel=2))   # optional: free weights
    fast = torch.compile(model, backend=make_backend(start=12, end=28, parallel=2, mode="spmd"))

The graph rewrite is :func:`cqil_fx.passes.place_members`; this module is what it
needs around it at compile time and run time:

* :func:`spmd_world`: rank, world size and a process group of cqil's own,
  made once with ``new_group(timeout=config.collective_timeout)``, so a rank
  that stops answering makes the others raise after that many seconds instead
  of the default process group's 30 minutes;
* :func:`agree`: before a graph is placed, the ranks exchange what they are
  about to compile (the plan, or why the graph is left unchanged); different
  answers raise :class:`CQILDistributedError` on every rank instead of
  deadlocking in mismatched collectives;
* :func:`guard_collectives`: a collective that fails at run time (a rank died,
  or timed out) is re-raised as :class:`CQILDistributedError` naming the rank;
  failures are told apart by type (``torch.distributed.DistError`` and its
  subclasses, which the process-group backends raise), never by message;
* :func:`release_other_members` / :func:`parameter_bytes`: each rank keeps
  real weights only for the blocks it computes.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import hashlib
import logging
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.fx
from torch import nn
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from ..config import CQILConfig, Plan
from ..errors import CQILDistributedError, CQILUnsupportedError
from ..fingerprint import plain_components
from ..stack import decoder_layers
from .shm import gathered_like

log = logging.getLogger(__name__)

_GROUPS: dict[float, dist.ProcessGroup] = {}


@dataclasses.dataclass(frozen=True)
class SpmdWorld:
    """This rank's place among the SPMD ranks and the group cqil's collectives run in."""

    rank: int
    world_size: int
    group: Any  # torch.distributed.ProcessGroup
    timeout: float

    @property
    def group_name(self) -> str:
        return self.group.group_name


def distributed_world_size() -> int:
    """World size of the initialised default process group; 1 when there is none."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def spmd_world(timeout: float) -> SpmdWorld:
    """The SPMD world; makes cqil's process group on first use (every rank must get here)."""
    if not (dist.is_available() and dist.is_initialized()):
        raise CQILUnsupportedError(
            "mode='spmd' runs under torch.distributed: launch with torchrun (one process per group "
            "member) and call torch.distributed.init_process_group() before the first compiled call"
        )
    if timeout not in _GROUPS:
        # new_group is itself collective: all ranks reach it at their first SPMD compile.
        _GROUPS[timeout] = dist.new_group(timeout=datetime.timedelta(seconds=timeout))
        log.info("cqil: SPMD process group over %d ranks, collective timeout %.0f s",
                 dist.get_world_size(), timeout)
    return SpmdWorld(dist.get_rank(), dist.get_world_size(), _GROUPS[timeout], timeout)


_CALL = "a call with inputs"  # how check_inputs describes a call to agree()


def agree(world: SpmdWorld, what: str, action: str = "compile") -> None:
    """Raise on every rank unless all ranks are about to compile (``action``) the same ``what``."""
    digest = hashlib.sha256(what.encode()).hexdigest()[:16]
    answers: list[Any] = [None] * world.world_size
    try:
        dist.all_gather_object(answers, (digest, what), group=world.group)
    except Exception as e:  # noqa: BLE001 - gloo and nccl raise several types; re-raised with context
        point = "graph compile" if action == "compile" else "call of the compiled model"
        raise CQILDistributedError(
            f"rank {world.rank}: the other ranks did not all reach the same {point} within "
            f"{world.timeout:.0f} s (collective_timeout): a rank died, or runs a different model"
        ) from e
    if len({d for d, _ in answers}) > 1:
        listing = "; ".join(f"rank {r}: {w}" for r, (_, w) in enumerate(answers))
        calls = {w.startswith(_CALL) for _, w in answers}
        history = ("; some ranks compile a graph where others call one they compiled before, so Dynamo's "
                   "compiles differed between ranks: an earlier compile of the same forward on some ranks only "
                   "makes their next one dynamic (automatic dynamic shapes); call torch._dynamo.reset() on those "
                   "ranks after it, or compile with dynamic=False") if calls == {True, False} else ""
        raise CQILDistributedError(
            f"rank {world.rank}: the ranks disagree on what to {action} ({listing}); give every rank "
            f"the same model, plan and inputs{history}"
        )


_VALUES_CHECKED = 1 << 16  # integer inputs up to this many elements are compared by value, larger ones by shape


def describe_input(name: str, x: torch.Tensor) -> str:
    """``name: [sizes]``, and for an integer or bool tensor of up to 65,536 elements a digest of its values."""
    text = f"{name}: {list(x.shape)}"
    if (not x.is_floating_point() and not x.is_complex()) and x.numel() <= _VALUES_CHECKED:
        data = x.detach().to("cpu", copy=True).reshape(-1).view(torch.uint8).numpy().tobytes()
        text += f" values {hashlib.sha256(data).hexdigest()[:12]}"
    return text


def check_inputs(fn: Callable[..., Any], world: SpmdWorld, inputs: dict[int, str],
                 calls: int) -> Callable[..., Any]:
    """``fn`` whose first ``calls`` calls compare their inputs across the ranks first.

    ``inputs`` maps argument positions to names: the graph's inputs that are not
    parameters or buffers (token ids, masks, positions, cache positions).  Every
    rank sends :func:`describe_input` of each (sizes; values of integer ones)
    over cqil's process group; if they differ, every rank raises
    :class:`CQILDistributedError` listing what each rank passed, before the
    first collective of the graph.  That covers what the collectives cannot:
    ranks that pass different token ids of the same shape (every collective
    would run and return a wrong answer), and different shapes under the
    process-group transport (gloo and NCCL would fail blaming a dead rank, or
    hang).  The message has the form of :func:`agree`'s, so a rank that is
    calling a graph while another compiles a new one (a shape Dynamo had not
    seen) fails the same way on both.  Each checked call costs one
    ``all_gather_object`` of a few hundred bytes (a fraction of a millisecond
    over gloo on one host), so only the first ``calls`` are checked.
    """
    if calls <= 0 or not inputs:
        return fn
    remaining = [calls]

    @functools.wraps(fn)
    def run(*args):  # Dynamo calls a backend's result with the inputs unpacked (see with_constants)
        if remaining[0] > 0:
            remaining[0] -= 1
            what = ", ".join(describe_input(name, args[i]) for i, name in inputs.items()
                             if isinstance(args[i], torch.Tensor))
            agree(world, f"{_CALL} {what}", action="call the compiled model with")
        return fn(*args)

    return run


def guard_collectives(fn: Callable[..., Any], world: SpmdWorld) -> Callable[..., Any]:
    """``fn`` with a failure of torch.distributed (``DistError``) re-raised as :class:`CQILDistributedError`.

    The graph's own collectives raise :class:`CQILDistributedError` themselves
    (``cqil::pg_*`` and ``cqil::shm_*`` ops); any other exception is the
    caller's and passes through as it is.
    """

    @functools.wraps(fn)
    def run(*args):
        try:
            return fn(*args)
        except dist.DistError as e:
            raise CQILDistributedError(
                f"rank {world.rank}: a collective of the CQIL forward failed or waited longer than "
                f"{world.timeout:.0f} s (collective_timeout); another rank has probably died or "
                f"stopped calling the model ({type(e).__name__}: {str(e).splitlines()[0][:200]})"
            ) from e

    run._boxed_call = getattr(fn, "_boxed_call", False)  # type: ignore[attr-defined]
    return run


def choose_transport(gm: torch.fx.GraphModule, world: SpmdWorld, transport: str) -> str:
    """Carry the placed graph's collectives over ``transport``; returns the one used.

    "auto" takes shared memory when every collective moves a CPU tensor of
    known size and all ranks share an x86-64 host; every rank sees the same
    graph and host list, so all ranks choose alike.
    """
    from ..passes.spmd import collective_inputs, fold_linear_gathers, replace_collectives

    from . import shm

    inputs = [n.meta.get("example_value") for n in collective_inputs(gm)]
    if not inputs:
        return "process_group"
    channel = None
    if transport != "process_group":
        usable = all(isinstance(v, torch.Tensor) and v.device.type == "cpu" for v in inputs)
        if not usable and transport == "shared_memory":
            raise CQILDistributedError("transport='shared_memory' needs CPU tensors of known size; "
                                       "use transport='process_group'")
        if usable:
            capacity = shm.capacity_for(max(v.numel() * v.element_size() * world.world_size for v in inputs))
            channel = shm.open_channel(world.group, world.rank, world.world_size, capacity, world.timeout,
                                       required=transport == "shared_memory")
    if channel is not None:
        replace_collectives(gm, torch.ops.cqil.shm_all_reduce.default, torch.ops.cqil.shm_all_gather.default,
                            channel)
        fold_linear_gathers(gm, torch.ops.cqil.shm_all_gather.default, torch.ops.cqil.shm_linear_all_gather.default)
        return "shared_memory"
    _PROCESS_GROUPS[world.group_name] = world
    replace_collectives(gm, torch.ops.cqil.pg_all_reduce.default, torch.ops.cqil.pg_all_gather.default,
                        world.group_name)
    return "process_group"


# The process-group transport: the functional collectives, called from ops of our own so that a
# failure inside a collective (a rank died, a timeout: gloo raises a plain RuntimeError) is known
# to be one by where it was raised, and reaches the caller as CQILDistributedError.
_PROCESS_GROUPS: dict[str, SpmdWorld] = {}


def _collective(group_name: str, what: str, run: Callable[[], torch.Tensor]) -> torch.Tensor:
    world = _PROCESS_GROUPS[group_name]
    try:
        return run()
    except Exception as e:  # noqa: BLE001 - raised inside the collective: it is the collective's failure
        raise CQILDistributedError(
            f"rank {world.rank}: a collective ({what}) of the CQIL forward failed or waited longer than "
            f"{world.timeout:.0f} s (collective_timeout); another rank has probably died or stopped "
            f"calling the model ({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''})"
        ) from e


@torch.library.custom_op("cqil::pg_all_reduce", mutates_args=())
def pg_all_reduce(x: torch.Tensor, group_name: str, after: torch.Tensor | None = None) -> torch.Tensor:
    """Sum of ``x`` over the process group ``group_name`` (``after``: only orders the collectives)."""
    f = torch.ops._c10d_functional
    return _collective(group_name, "all_reduce",
                       lambda: f.wait_tensor(f.all_reduce(x.contiguous(), "sum", group_name)))


@pg_all_reduce.register_fake
def _(x: torch.Tensor, group_name: str, after: torch.Tensor | None = None) -> torch.Tensor:
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.custom_op("cqil::pg_all_gather", mutates_args=())
def pg_all_gather(x: torch.Tensor, group_name: str, after: torch.Tensor | None = None, dim: int = 0) -> torch.Tensor:
    """The ranks' ``x`` concatenated along ``dim``, in rank order."""
    f = torch.ops._c10d_functional
    world = _PROCESS_GROUPS[group_name].world_size

    def gather() -> torch.Tensor:
        gathered = f.wait_tensor(f.all_gather_into_tensor(x.contiguous(), world, group_name))
        return gathered if dim == 0 else torch.cat(gathered.chunk(world), dim=dim)

    return _collective(group_name, "all_gather", gather)


@pg_all_gather.register_fake
def _(x: torch.Tensor, group_name: str, after: torch.Tensor | None = None, dim: int = 0) -> torch.Tensor:
    return gathered_like(x, _PROCESS_GROUPS[group_name].world_size, dim)


def release_other_members(model: nn.Module, plan: Plan | CQILConfig, rank: int | None = None) -> int:
    """Free the weights of the group members other ranks compute; returns the bytes released.

    Each such parameter keeps its shape, dtype and device (Dynamo traces the
    whole model on every rank) but becomes a zero-stride view of a single
    element, so it holds no memory.  The SPMD graph never reads them.  Call it
    before compiling, with the plan the backend will use. A quantized weight
    (a tensor subclass such as torchao's) is released component by component
    and stays an instance of its class.
    """
    if rank is None:
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    layers = decoder_layers(model)
    plan = plan.plan_for(len(layers)) if isinstance(plan, CQILConfig) else plan
    before = parameter_bytes(model)
    for group in plan.groups:
        if rank >= len(group):
            raise CQILDistributedError(f"rank {rank} has no member in group {list(group)}")
        for k, index in enumerate(group):
            if k != rank:
                for module in layers[index].modules():
                    for name, p in list(module.named_parameters(recurse=False)):
                        _release(module, name, p)
    released = before - parameter_bytes(model)
    log.info("cqil: rank %d released %.1f MB of other members' weights", rank, released / 2**20)
    return released


def _stand_in(t: torch.Tensor) -> torch.Tensor:
    """``t``'s shape, dtype and device in one element (a traceable subclass: each plain component so)."""
    if not is_traceable_wrapper_subclass(t):
        return torch.zeros((), dtype=t.dtype, device=t.device).expand(t.shape)
    names, context = t.__tensor_flatten__()
    inner = {n: _stand_in(getattr(t, n)) for n in names}
    return type(t).__tensor_unflatten__(inner, context, t.shape, t.stride())


def _release(module: nn.Module, name: str, p: nn.Parameter) -> None:
    if is_traceable_wrapper_subclass(p):
        setattr(module, name, nn.Parameter(_stand_in(p), requires_grad=p.requires_grad))
    else:
        p.data = _stand_in(p)


def parameter_bytes(model: nn.Module) -> int:
    """Bytes of memory actually held by the model's parameters (shared storage counted once; a tensor
    subclass such as a quantized weight by its plain components)."""
    storages = {}
    for p in model.parameters():
        for _, part in plain_components(p):
            s = part.untyped_storage()
            storages[(s.data_ptr(), part.device)] = s.nbytes()
    return sum(storages.values())
