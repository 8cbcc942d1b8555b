"""Shared-memory collectives for SPMD ranks on one CPU host (``transport="shared_memory"``).

A gloo ``all_reduce`` between two processes on one machine costs about as
much as a decoder block of a small model at one token, even when both ranks
are ready: the bytes travel over TCP loopback and each message wakes a
sleeping thread (docs/notes/performance.md has the measurements), so a collective
per group eats what CQIL saves.  Here the ranks instead share one memory
segment and spin: a rank copies its tensor into
its slot, publishes a sequence number, waits (spinning, so no wake-up
latency) until every rank has published the same number, and sums the slots
in rank order, so every rank gets bit-identical results.

The collectives are the torch ops ``cqil::shm_all_reduce``,
``cqil::shm_all_gather`` and ``cqil::shm_linear_all_gather`` (a linear whose
output is gathered along its features: the vocabulary-split LM head, computed
straight into the slot); custom ops with fake kernels, so Inductor schedules
them as extern calls.  Every rank must issue them in the same order, and a
compiler is free to reorder independent ops (on rank 0 a group's all_reduce
does not depend on its all_gather), so each collective takes the previous
one's output as an extra, unused input: the order is a data dependency.  Slots are double-buffered by sequence parity: a rank
can only start collective s+1 after every rank has published s, which each
did only after it finished reading the slots of s-1.

Limits: ranks on one host (checked at set-up), x86-64 (its store order makes
"data, then flag" visible in that order to the other process; elsewhere use
``transport="process_group"``), tensors up to the channel's capacity (the
backend checks sizes at compile time).  A rank that stops answering makes the
others raise after the collective timeout.
"""

from __future__ import annotations

import dataclasses
import math
import mmap
import os
import platform
import socket
import time
import uuid

import torch
import torch.distributed as dist

from ..errors import CQILDistributedError

_FLAG_STRIDE = 8  # int64 per flag, padded to one 64-byte cache line each
_HEADER = 64  # bytes at the start of each data slot: the tensor's rank and sizes (int64), for the shape check
_MAX_DIMS = _HEADER // 8 - 1
_SPIN_POLLS = 2000  # polls without pausing (each a few hundred ns of Python),
_YIELD_SECONDS = 0.005  # then polls that yield the core, up to 5 ms,
_SLEEP_SECONDS = 0.0005  # then polls 0.5 ms apart until the collective timeout
_CHANNELS: dict[str, "Channel"] = {}


@dataclasses.dataclass(eq=False)
class Channel:
    """One shared segment: W padded flags, then 2 x W data slots of ``capacity`` bytes."""

    name: str
    rank: int
    world_size: int
    capacity: int
    timeout: float
    buffer: mmap.mmap
    sequence: int = 0

    def __post_init__(self) -> None:
        self.flags = memoryview(self.buffer)[: self._data_offset].cast("q")
        self.words = memoryview(self.buffer).cast("q")  # the slots' headers, as int64
        self.data = torch.frombuffer(self.buffer, dtype=torch.uint8, offset=self._data_offset,
                                     count=2 * self.world_size * self.capacity)

    @property
    def _data_offset(self) -> int:
        return self.world_size * _FLAG_STRIDE * 8

    def _slot_start(self, j: int) -> int:
        return ((self.sequence % 2) * self.world_size + j) * self.capacity

    def _slots(self, nbytes: int) -> list[torch.Tensor]:
        return [self.data[self._slot_start(j) + _HEADER:self._slot_start(j) + _HEADER + nbytes]
                for j in range(self.world_size)]

    def exchange(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's ``x``, as views of the shared slots.

        Every rank publishes its tensor's sizes with it; ranks that reach the same
        collective with different shapes all raise :class:`CQILDistributedError`
        naming every rank's shape (the sizes are checked, not the values).
        """
        self.begin(x.shape, x.dtype).copy_(x)
        return self.publish(x.shape, x.dtype)

    def begin(self, shape: torch.Size | tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """Start the next collective: this rank's slot, as a tensor of ``shape`` to write its part into.

        :meth:`publish` then hands it to the other ranks; writing there directly
        (an op's ``out=``) saves the copy :meth:`exchange` makes.
        """
        nbytes = math.prod(shape) * dtype.itemsize
        if nbytes + _HEADER > self.capacity:
            raise CQILDistributedError(
                f"a {nbytes}-byte tensor does not fit the shared-memory channel ({self.capacity} bytes); "
                "use transport='process_group'")
        self.sequence += 1
        self._write_shape(torch.Size(shape))
        return self._slots(nbytes)[self.rank].view(dtype).view(shape)

    def publish(self, shape: torch.Size | tuple[int, ...], dtype: torch.dtype) -> list[torch.Tensor]:
        """Finish the collective :meth:`begin` started: every rank's part, as views of the shared slots."""
        self.flags[self.rank * _FLAG_STRIDE] = self.sequence
        self._wait_for_all()
        self._check_shapes(tuple(shape))
        return [s.view(dtype).view(shape) for s in self._slots(math.prod(shape) * dtype.itemsize)]

    def _write_shape(self, shape: torch.Size) -> None:
        word = (self._data_offset + self._slot_start(self.rank)) // 8
        sizes = list(shape) if len(shape) <= _MAX_DIMS else [-1] * _MAX_DIMS  # rank > 7: numel only
        self.words[word] = len(shape) if len(shape) <= _MAX_DIMS else -shape.numel()
        for i, size in enumerate(sizes):
            self.words[word + 1 + i] = size

    def _shape_of(self, j: int) -> tuple[int, ...] | str:
        word = (self._data_offset + self._slot_start(j)) // 8
        ndim = self.words[word]
        if ndim < 0:
            return f"{-ndim} elements"
        return tuple(self.words[word + 1 + i] for i in range(ndim))

    def _check_shapes(self, mine: tuple[int, ...]) -> None:
        shapes = [self._shape_of(j) for j in range(self.world_size)]
        if len(mine) <= _MAX_DIMS and all(s == mine for s in shapes):
            return
        if len(mine) > _MAX_DIMS and len(set(map(str, shapes))) == 1:
            return
        listing = ", ".join(f"rank {j}: {list(s) if isinstance(s, tuple) else s}" for j, s in enumerate(shapes))
        raise CQILDistributedError(
            f"rank {self.rank}: the ranks reached shared-memory collective {self.sequence} with tensors of "
            f"different shapes ({listing}); every rank must call the compiled model with inputs of the "
            "same shape (the same batch size and prompt length)")

    def _wait_for_all(self) -> None:
        flags, seq, stride = self.flags, self.sequence, _FLAG_STRIDE
        ranks = range(self.world_size)
        polls = 0
        started = time.monotonic()
        while not all(flags[j * stride] >= seq for j in ranks):
            polls += 1
            if polls < _SPIN_POLLS:
                continue  # the other ranks are usually microseconds away: spinning has no wake-up latency
            # A rank that is far behind (compiling, or a slow step) must not have to compete with
            # our polling for a core: yield, then sleep between polls.
            waited = time.monotonic() - started
            if waited < _YIELD_SECONDS:
                os.sched_yield()
            elif waited < self.timeout:
                time.sleep(_SLEEP_SECONDS)
            else:
                late = [j for j in ranks if flags[j * stride] < seq]
                raise CQILDistributedError(
                    f"rank {self.rank}: ranks {late} did not reach shared-memory collective {seq} within "
                    f"{self.timeout:.0f} s (collective_timeout); a rank has probably died or stopped "
                    "calling the model")


def open_channel(group, rank: int, world_size: int, capacity: int, timeout: float,
                 required: bool = True) -> str | None:
    """Create (rank 0) or attach to a shared segment for ``group``; returns its channel name.

    Collective: every rank of ``group`` must call it with the same arguments.
    Where shared memory cannot work (ranks on several hosts, not x86-64) it
    raises if ``required``, else returns None on every rank.
    """
    key = f"{group.group_name}:{capacity}"
    if key in _CHANNELS:
        return key
    hosts: list = [None] * world_size
    path = f"/dev/shm/cqil-{uuid.uuid4().hex}" if rank == 0 else None
    dist.all_gather_object(hosts, (socket.gethostname(), platform.machine(), path), group=group)
    why = None
    if len({h for h, _, _ in hosts}) > 1:
        why = f"every rank on one host; they are on {sorted({h for h, _, _ in hosts})}"
    elif any(m not in ("x86_64", "AMD64") for _, m, _ in hosts):
        why = f"x86-64 (its store order publishes data before flags), not {platform.machine()}"
    if why:
        if required:
            raise CQILDistributedError(f"transport='shared_memory' needs {why}; use transport='process_group'")
        return None
    path = hosts[0][2]
    size = world_size * _FLAG_STRIDE * 8 + 2 * world_size * capacity
    if rank == 0:
        with open(path, "wb") as f:
            f.truncate(size)
    dist.barrier(group=group)
    with open(path, "r+b") as f:
        buffer = mmap.mmap(f.fileno(), size)
    dist.barrier(group=group)
    if rank == 0:
        os.unlink(path)  # the mappings stay valid; nothing is left behind in /dev/shm
    _CHANNELS[key] = Channel(key, rank, world_size, capacity, timeout, buffer)
    return key


@torch.library.custom_op("cqil::shm_all_reduce", mutates_args=())
def shm_all_reduce(x: torch.Tensor, channel: str, after: torch.Tensor | None = None) -> torch.Tensor:
    """Sum of ``x`` over the ranks of ``channel``, added in rank order (identical on every rank).

    ``after`` is unused; passing the previous collective's output orders the two
    (see :func:`cqil_fx.passes.spmd.replace_collectives`).
    """
    slots = _CHANNELS[channel].exchange(x)
    out = torch.add(slots[0], slots[1]) if len(slots) > 1 else slots[0].clone()  # one pass over the slots
    for s in slots[2:]:
        out += s
    return out


@shm_all_reduce.register_fake
def _(x: torch.Tensor, channel: str, after: torch.Tensor | None = None) -> torch.Tensor:
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.custom_op("cqil::shm_all_gather", mutates_args=())
def shm_all_gather(x: torch.Tensor, channel: str, after: torch.Tensor | None = None, dim: int = 0) -> torch.Tensor:
    """The ranks' ``x`` concatenated along ``dim``, in rank order (``after``: as for all_reduce).

    Each slot is copied once, straight to its place in the result: gathering the
    vocabulary-split logits along their last dim this way saves the two copies of
    "gather along dim 0, then chunk and concatenate" (most of a prefill's
    collective time under tensor parallelism, docs/notes/performance.md).
    """
    return torch.cat(_CHANNELS[channel].exchange(x), dim=dim)


@shm_all_gather.register_fake
def _(x: torch.Tensor, channel: str, after: torch.Tensor | None = None, dim: int = 0) -> torch.Tensor:
    return gathered_like(x, _CHANNELS[channel].world_size, dim)


@torch.library.custom_op("cqil::shm_linear_all_gather", mutates_args=())
def shm_linear_all_gather(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, channel: str,
                          after: torch.Tensor | None = None) -> torch.Tensor:
    """``linear(x, weight, bias)`` of every rank, concatenated along the last dim (``after``: as for all_reduce).

    The vocabulary-split LM head and the gather of its logits in one op: the
    product is computed straight into this rank's shared slot, so the rank's
    part of the logits is neither allocated on its own nor copied
    (:func:`cqil_fx.passes.spmd.fold_linear_gathers` puts it in the graph).
    """
    out_features = weight.shape[0]
    channel_ = _CHANNELS[channel]
    shape = (*x.shape[:-1], out_features)
    mine = channel_.begin(shape, x.dtype).view(-1, out_features)
    rows = x.reshape(-1, x.shape[-1])
    if bias is None:
        torch.mm(rows, weight.t(), out=mine)
    else:
        torch.addmm(bias, rows, weight.t(), out=mine)
    return torch.cat(channel_.publish(shape, x.dtype), dim=-1)


@shm_linear_all_gather.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, channel: str,
      after: torch.Tensor | None = None) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], weight.shape[0] * _CHANNELS[channel].world_size))


def gathered_like(x: torch.Tensor, world_size: int, dim: int) -> torch.Tensor:
    """An empty tensor of the shape ``world_size`` copies of ``x`` make, concatenated along ``dim``."""
    shape = list(x.shape)
    shape[dim] *= world_size
    return x.new_empty(shape)


def capacity_for(nbytes: int) -> int:
    """Slot size for collectives of up to ``nbytes`` (and the slot's header): a power of two, at least 64 KiB."""
    return max(1 << 16, 1 << (nbytes + _HEADER - 1).bit_length())
