"""What to rewrite: :class:`CQILConfig` (the user's request) and :class:`Plan`.

A config is validated when it is built, before any compile work; it becomes a
:class:`Plan` once the number of decoder blocks is known (at compile time)::

    >>> CQILConfig(start=20, end=28, parallel=2, bypass=1).plan_for(30)
    Plan(30 blocks: [20-21] [22-23] [24-25] [26-27], bypass 1, saves 4 block-times)

Block indices are positions in the model's decoder-layer list (the HF layer
index).
"""

from __future__ import annotations

import base64
import dataclasses
import functools
import json
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from .errors import CQILConfigError, CQILError, CQILPlanError

AUTO = "auto"


@dataclasses.dataclass(frozen=True)
class ModeRow:
    """One execution mode: its name, the module that implements it (a module under
    :mod:`cqil_fx.graph.modes` whose ``MODE`` is the mode's class, imported when a graph is compiled in
    it) and the config options that apply to it besides the common ones."""

    name: str
    module: str
    options: frozenset[str] = frozenset()


# The execution modes: adding one is a module under cqil_fx/graph/modes/ and a row here. "auto" is a rule over
# this table (cqil_fx.graph.modes.execution_mode): it tries the rows from the last to the first, most
# specialised first, and takes the first mode that suits the graph; local, the first row, always does.
MODE_TABLE = (
    ModeRow("local", "cqil_fx.graph.modes.local"),
    ModeRow("concurrent", "cqil_fx.graph.modes.concurrent", frozenset({"cuda_graphs"})),
    ModeRow("spmd", "cqil_fx.graph.modes.spmd", frozenset({"tensor_parallel", "tp_fallback"})),
)
AUTO_OPTIONS = frozenset({"tensor_parallel", "tp_fallback"})  # auto may pick spmd, never cuda_graphs by itself
MODES = (AUTO, *(row.name for row in MODE_TABLE))
INNER_COMPILERS = ("inductor", "aot_eager", "eager")
TRANSPORTS = ("auto", "process_group", "shared_memory")

# The paper-style uniform plan over the middle of the stack (default_span).  The
# first ~40 % of blocks change the residual stream fast (their inputs are not
# similar) and the last two blocks shape the logits.
DEFAULT_START_FRACTION = 0.4
DEFAULT_TAIL_BLOCKS = 2
# The default quality budget: the relative perplexity increase a plan may cost
# (the default plan searches at a fraction of it: cqil_fx.planning.auto.SAFETY).
DEFAULT_BUDGET = 0.10


@dataclasses.dataclass(frozen=True, eq=False)
class LowRank:
    """A low-rank linear term of a group correction: member k adds ``(Δ_k @ down[k]) @ up``.

    ``down`` holds one ``(hidden, rank)`` tensor per member, ``up`` one
    ``(rank, hidden)`` tensor, float32 on the CPU; together they are the rank-r
    linear map ``concat_k(Δ_k) @ W`` with ``W = concat_k(down[k]) @ up``, fitted
    by :func:`cqil_fx.eager.correction.fit_corrections` (``low_rank=``). Each member
    applies its own share, so in SPMD mode the term rides in the all-reduce the
    group already pays. In JSON the tensors are base64 of their little-endian
    float32 bytes (a plan stays one file).
    """

    down: tuple[Any, ...]
    up: Any

    def __post_init__(self) -> None:
        shapes = {tuple(d.shape) for d in self.down}
        up = tuple(self.up.shape)
        if len(shapes) != 1 or len(up) != 2 or next(iter(shapes)) != (up[1], up[0]):
            raise CQILConfigError(f"a low-rank correction needs one (hidden, rank) factor per member and one "
                                  f"(rank, hidden) factor, got {sorted(shapes)} and {up}")

    @property
    def rank(self) -> int:
        return int(self.up.shape[0])

    @property
    def hidden_size(self) -> int:
        return int(self.up.shape[1])

    def tensors(self, like) -> tuple[list, object]:
        """(per-member down factors, up factor) in ``like``'s dtype and device."""
        where = dict(dtype=like.dtype, device=like.device)  # like may be a fake tensor: only its dtype and device
        return [d.to(**where) for d in self.down], self.up.to(**where)

    def __eq__(self, other) -> bool:
        if not isinstance(other, LowRank):
            return NotImplemented
        if len(other.down) != len(self.down):
            return False
        pairs = [*zip(self.down, other.down), (self.up, other.up)]
        return all(a.shape == b.shape and bool((a == b).all()) for a, b in pairs)

    def __hash__(self) -> int:
        return hash((len(self.down), self.rank, self.hidden_size))

    def to_dict(self) -> dict:
        return {"rank": self.rank, "dtype": "float32", "down": [_encode(d) for d in self.down],
                "up": _encode(self.up)}

    @classmethod
    def from_dict(cls, data: Mapping) -> LowRank:
        if data.get("dtype", "float32") != "float32":
            raise CQILConfigError(f"a low-rank correction is stored as float32, not {data['dtype']!r}")
        rank = int(data["rank"])
        down, up = [_decode(d) for d in data["down"]], _decode(data["up"])
        if rank < 1 or any(t.numel() % rank for t in [*down, up]):
            raise CQILConfigError(f"a low-rank correction of rank {rank} cannot have factors of "
                                  f"{[t.numel() for t in [*down, up]]} numbers")
        return cls(tuple(d.reshape(-1, rank) for d in down), up.reshape(rank, -1))


def _encode(tensor) -> str:
    import torch

    data = tensor.detach().to("cpu", torch.float32).contiguous().numpy().astype("<f4").tobytes()
    return base64.b64encode(data).decode("ascii")


def _decode(text: str):
    import torch

    data = bytearray(base64.b64decode(text, validate=True))
    if len(data) % 4:
        raise CQILConfigError(f"a low-rank factor of {len(data)} bytes is not float32 data")
    return torch.frombuffer(data, dtype=torch.float32).clone()


@dataclasses.dataclass(frozen=True)
class GroupCorrection:
    """A group's closed-form output correction: ``out = x + Σ_k (scale[k] ⊙ Δ_k(x) + Δ_k(x) D_k U) + bias``.

    ``scale`` holds one per-channel vector per member, ``bias`` one vector and
    ``low_rank`` (optional, :class:`LowRank`) the factors ``D_k``, ``U`` of a
    linear term; the values are fitted by least squares on calibration
    activations (:func:`cqil_fx.eager.correction.fit_corrections`) so the
    group's output comes closer to what the blocks compute one after the other.
    Every mode and the eager reference apply it the same way (docs/semantics.md).
    """

    scale: tuple[tuple[float, ...], ...]
    bias: tuple[float, ...]
    low_rank: LowRank | None = None

    def __post_init__(self) -> None:
        widths = {len(s) for s in self.scale} | {len(self.bias)}
        if len(widths) != 1 or not self.scale:
            raise CQILConfigError(f"a group correction needs one scale per member and a bias of the same width, "
                                  f"got widths {sorted(widths)}")
        low = self.low_rank
        if low is not None and (len(low.down) != len(self.scale) or low.hidden_size != len(self.bias)):
            raise CQILConfigError(f"a low-rank term of {len(low.down)} members and width {low.hidden_size} does "
                                  f"not fit a correction of {len(self.scale)} members and width {len(self.bias)}")

    @property
    def hidden_size(self) -> int:
        return len(self.bias)

    def tensors(self, like) -> tuple[list, object]:
        """(per-member scales, bias) as tensors of ``like``'s dtype and device."""
        import torch

        make = functools.partial(torch.tensor, dtype=like.dtype, device=like.device)
        return [make(s) for s in self.scale], make(self.bias)

    def member_terms(self, deltas: Sequence) -> list:
        """What each member adds before the bias, eagerly, in the rewritten graph's op order:
        ``Δ_k * s_k``, plus ``(Δ_k @ D_k) @ U`` with a low-rank term."""
        scales, _ = self.tensors(deltas[0])
        terms = [d * s for d, s in zip(deltas, scales)]
        if self.low_rank is not None:
            downs, up = self.low_rank.tensors(deltas[0])
            terms = [t + (d @ down) @ up for t, d, down in zip(terms, deltas, downs)]
        return terms

    def to_dict(self) -> dict:
        data = {"scale": [list(s) for s in self.scale], "bias": list(self.bias)}
        if self.low_rank is not None:
            data["low_rank"] = self.low_rank.to_dict()
        return data

    @classmethod
    def from_dict(cls, data: Mapping) -> GroupCorrection:
        low = LowRank.from_dict(data["low_rank"]) if data.get("low_rank") else None
        return cls(tuple(tuple(float(v) for v in s) for s in data["scale"]), tuple(float(v) for v in data["bias"]),
                   low)


@dataclasses.dataclass(frozen=True)
class Plan:
    """Groups of consecutive blocks that run concurrently, the bypass distance, optional corrections.

    ``groups`` holds only groups of two or more blocks, in order; every other
    block runs alone, as in the original model. ``corrections`` is empty, or
    holds one :class:`GroupCorrection` (or None) per group.
    """

    num_blocks: int
    groups: tuple[tuple[int, ...], ...]
    bypass: int = 0
    corrections: tuple[GroupCorrection | None, ...] = dataclasses.field(default=(), repr=False)

    def __post_init__(self) -> None:
        if self.corrections and len(self.corrections) != len(self.groups):
            raise CQILPlanError(f"a plan with {len(self.groups)} groups needs as many corrections (or None), "
                                f"got {len(self.corrections)}")
        for g, c in zip(self.groups, self.corrections):
            if c is not None and len(c.scale) != len(g):
                raise CQILPlanError(f"the correction of group {list(g)} has {len(c.scale)} member scales")

    def correction(self, group: int) -> GroupCorrection | None:
        """The correction of the ``group``-th group, or None."""
        return self.corrections[group] if self.corrections else None

    def without_corrections(self) -> Plan:
        return dataclasses.replace(self, corrections=())

    @property
    def saved_blocks(self) -> int:
        """Block-times a perfectly concurrent run saves: sum of (|G| - 1)."""
        return sum(len(g) - 1 for g in self.groups)

    def cover(self) -> list[tuple[int, ...]]:
        """All groups, singletons included, covering ``range(num_blocks)`` in order."""
        grouped = {i: g for g in self.groups for i in g}
        out: list[tuple[int, ...]] = []
        for i in range(self.num_blocks):
            g = grouped.get(i, (i,))
            if g[0] == i:
                out.append(g)
        return out

    def check_block_kinds(self, kinds: Mapping[int, str]) -> None:
        """Refuse bypass edges into blocks whose MLP does not read the mid-block residual."""
        if self.bypass == 0:
            return
        for g in self.groups:
            parallel = [i for i in g if kinds[i] != "sequential"]
            if parallel:
                raise CQILPlanError(
                    f"bypass={self.bypass} needs sequential blocks, but block(s) {parallel} "
                    f"are {kinds[parallel[0]]}-residual (attention and MLP both read the block "
                    f"input, so there is no MLP input to bypass into); use bypass=0 for this model"
                )

    def to_dict(self) -> dict:
        data = {"num_blocks": self.num_blocks, "groups": [list(g) for g in self.groups], "bypass": self.bypass}
        if self.corrections:
            data["corrections"] = [c.to_dict() if c is not None else None for c in self.corrections]
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_dict(cls, data: Mapping) -> Plan:
        try:
            config = CQILConfig(groups=data["groups"], bypass=data["bypass"])
            plan = config.plan_for(int(data["num_blocks"]))
            corrections = tuple(GroupCorrection.from_dict(c) if c is not None else None
                                for c in data.get("corrections") or ())
            return dataclasses.replace(plan, corrections=corrections)
        except CQILError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise CQILConfigError(f"not a cqil_fx plan: {type(e).__name__}: {e}") from e

    @classmethod
    def from_json(cls, text: str) -> Plan:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise CQILConfigError(f"not a cqil_fx plan: {e}") from e
        if not isinstance(data, dict):
            raise CQILConfigError(f"not a cqil_fx plan: a JSON {type(data).__name__}, not an object")
        return cls.from_dict(data)

    def save(self, path: str | os.PathLike) -> None:
        with open(path, "w") as f:
            f.write(self.to_json() + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike) -> Plan:
        with open(path) as f:
            return cls.from_json(f.read())

    def __repr__(self) -> str:
        spans = " ".join(f"[{g[0]}-{g[-1]}]" for g in self.groups) or "no groups"
        corrected = sum(c is not None for c in self.corrections)
        ranks = sorted({c.low_rank.rank for c in self.corrections if c is not None and c.low_rank is not None})
        fixes = f", {corrected} corrected" if corrected else ""
        fixes += f" (low rank {'/'.join(map(str, ranks))})" if ranks else ""
        return (
            f"Plan({self.num_blocks} blocks: {spans}, bypass {self.bypass}{fixes}, "
            f"saves {self.saved_blocks} block-times)"
        )


@dataclasses.dataclass(frozen=True)
class CQILConfig:
    """How the cqil backend rewrites a model.

    Name the groups either explicitly (``groups=[[3, 4, 5], [8, 9]]``) or as the
    paper's uniform plan (``start``, ``end``, ``parallel``: groups of
    ``parallel`` blocks over ``[start, end)``).  With no plan field at all the
    plan is measured, never guessed: the backend reuses a cached plan for the
    model, or lets the model write its own calibration text and searches the
    plan that saves the most block-time within ``budget``, with corrections,
    and caches it (:mod:`cqil_fx.planning.default`; or ahead of time with :func:`cqil_fx.plan`); when nothing fits, the
    graph is compiled unchanged.

    Or hand over a finished :class:`Plan` (``plan=Plan.load("plan.json")``), or
    ask for an automatic one: ``plan="auto"`` with ``calibration=`` batches of
    token ids searches, at compile time, the groups of ``parallel`` blocks that
    save the most block-time while the calibration perplexity stays within
    ``(1 + budget)`` times the original's (:mod:`cqil_fx.planning`).  Giving
    ``calibration`` with no other plan field also plans automatically.

    ``bypass`` is the paper's D: member k's MLP also reads the attention outputs
    of the D members before it.  ``mode`` picks the execution mode; ``inner``
    the compiler that turns the rewritten graph into code ("inductor",
    "aot_eager", "eager", or any Dynamo backend callable).
    ``collective_timeout`` (seconds) bounds how long an SPMD rank waits for the
    others at a collective before it raises :class:`CQILDistributedError`.
    ``transport`` carries the SPMD collectives: "process_group" (functional
    collectives over the process group: gloo, NCCL), "shared_memory" (CPU
    ranks on one x86-64 host, :mod:`cqil_fx.graph.shm`), or "auto" (shared memory
    where it applies, else the process group).  ``cuda_graphs`` (concurrent
    mode on CUDA): capture each graph's whole concurrent program, member
    streams included, into one CUDA graph and replay it
    (:class:`cqil_fx.graph.executor.CudaGraphProgram`).  ``tensor_parallel``
    (mode "spmd"): the blocks outside groups and the LM head run split over
    the ranks (heads and MLP columns, one all-reduce per half-block; the
    vocabulary, one all-gather) instead of whole on every rank
    (:mod:`cqil_fx.passes.tensor_parallel`); with no groups in the plan that
    is plain tensor parallelism.  ``tp_fallback``: where a block's head counts
    do not divide by the world size, keep its attention whole on every rank and
    split only its MLP, instead of raising :class:`CQILPlanError`.
    ``check_inputs`` (mode "spmd"): the first this many calls of each compiled
    graph compare the ranks' inputs (the shapes of token ids, masks and
    positions, and the values of integer ones) before any collective, and
    raise :class:`CQILDistributedError` on every rank when they differ; 0
    turns the check off (:func:`cqil_fx.graph.distributed.check_inputs`).
    """

    groups: Sequence[Sequence[int]] | None = None
    start: int | None = None
    end: int | None = None
    parallel: int = 2
    bypass: int = 0
    mode: str = "auto"
    inner: str | Callable[..., Any] = "inductor"
    plan: Plan | str | None = None
    budget: float = DEFAULT_BUDGET
    collective_timeout: float = 300.0
    transport: str = "auto"
    cuda_graphs: bool = False
    tensor_parallel: bool = False
    tp_fallback: bool = False
    check_inputs: int = 8
    calibration: Sequence[Any] | None = dataclasses.field(default=None, compare=False, repr=False)

    @property
    def wants_default_plan(self) -> bool:
        """No plan, groups, span or calibration: the backend's measured default plan."""
        return self.plan is None and self.groups is None and self.start is None and self.calibration is None

    @property
    def wants_auto_plan(self) -> bool:
        """Plan automatically at compile time (``plan="auto"``, or calibration and no other plan)."""
        if self.plan == AUTO:
            return True
        named = self.plan is not None or self.groups is not None or self.start is not None
        return self.calibration is not None and not named

    def __post_init__(self) -> None:
        _check_int("parallel", self.parallel, minimum=1)
        _check_int("bypass", self.bypass, minimum=0)
        self._check_plan_fields()
        if self.wants_auto_plan and self.bypass:
            raise CQILConfigError("the automatic planner chooses the bypass distance; leave bypass= unset")
        if self.transport not in TRANSPORTS:
            raise CQILConfigError(f"transport={self.transport!r} is unknown; use one of {', '.join(TRANSPORTS)}")
        if not isinstance(self.cuda_graphs, bool):
            raise CQILConfigError(f"cuda_graphs={self.cuda_graphs!r} must be True or False")
        if self.mode not in MODES:
            raise CQILConfigError(f"mode={self.mode!r} is unknown; use one of {', '.join(MODES)}")
        if self.cuda_graphs and not mode_accepts(self.mode, "cuda_graphs"):
            raise CQILConfigError(
                f"cuda_graphs=True applies to mode='concurrent'; with mode={self.mode!r} give an inner compiler "
                "that uses CUDA graphs instead (e.g. Inductor with triton.cudagraphs, docs/user-guide.md)")
        if not isinstance(self.tensor_parallel, bool):
            raise CQILConfigError(f"tensor_parallel={self.tensor_parallel!r} must be True or False")
        if self.tensor_parallel and not mode_accepts(self.mode, "tensor_parallel"):
            raise CQILConfigError(
                f"tensor_parallel=True splits blocks over the ranks of mode='spmd'; with mode={self.mode!r} "
                "there is one process: use mode='spmd' under torchrun, or tensor_parallel=False")
        _check_int("check_inputs", self.check_inputs, minimum=0)
        if not isinstance(self.tp_fallback, bool):
            raise CQILConfigError(f"tp_fallback={self.tp_fallback!r} must be True or False")
        if self.tp_fallback and not self.tensor_parallel:
            raise CQILConfigError("tp_fallback=True applies to tensor_parallel=True; set both or neither")
        if not (callable(self.inner) or self.inner in INNER_COMPILERS):
            raise CQILConfigError(
                f"inner={self.inner!r} is unknown; use one of {', '.join(INNER_COMPILERS)} "
                "or pass a Dynamo backend callable"
            )
        if self.groups is not None:
            if self.start is not None or self.end is not None:
                raise CQILConfigError("give either groups=... or start=/end=, not both")
            object.__setattr__(self, "groups", _normalise_groups(self.groups))
            largest = max((len(g) for g in self.groups), default=1)
            if self.bypass >= largest:
                raise CQILConfigError(
                    f"bypass={self.bypass} must be smaller than the largest group ({largest} blocks)"
                )
            return
        if (self.start is None) != (self.end is None):
            raise CQILConfigError("give start= and end= together (the span [start, end) to group)")
        if self.bypass >= self.parallel:
            raise CQILConfigError(
                f"bypass={self.bypass} must be smaller than parallel={self.parallel} "
                f"(a member can only read the attention outputs of earlier members)"
            )
        if self.start is not None:
            _check_int("start", self.start, minimum=0)
            _check_int("end", self.end, minimum=0)
            if self.end <= self.start:
                raise CQILConfigError(f"end={self.end} must be greater than start={self.start}")
            if (self.end - self.start) % self.parallel:
                raise CQILConfigError(
                    f"(end - start) = {self.end - self.start} is not a multiple of "
                    f"parallel={self.parallel}; move start or end"
                )

    def _check_plan_fields(self) -> None:
        timeout = self.collective_timeout
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
            raise CQILConfigError(f"collective_timeout={timeout!r} must be a positive number of seconds")
        if isinstance(self.budget, bool) or not isinstance(self.budget, (int, float)) or self.budget < 0:
            raise CQILConfigError(f"budget={self.budget!r} must be a number >= 0 (relative perplexity increase)")
        if self.plan is None:
            return
        if self.groups is not None or self.start is not None or self.end is not None:
            raise CQILConfigError("give plan=... or groups=/start=/end=, not both")
        if self.plan == AUTO:
            if self.calibration is None:
                raise CQILConfigError("plan='auto' needs calibration=[token id batches] to measure quality on")
            if self.parallel < 2:
                raise CQILConfigError(f"plan='auto' needs parallel >= 2, got {self.parallel}")
        elif not isinstance(self.plan, Plan):
            raise CQILConfigError(f"plan={self.plan!r} must be a Plan, 'auto' or None")
        elif self.bypass:
            raise CQILConfigError("a Plan carries its own bypass distance; leave bypass= unset")

    def plan_for(self, num_blocks: int) -> Plan:
        """The plan for a model with ``num_blocks`` decoder blocks (not for ``plan="auto"``)."""
        if self.wants_auto_plan:
            raise CQILConfigError("an automatic plan is searched at compile time; see cqil_fx.planning")
        if self.wants_default_plan:
            raise CQILConfigError(
                "the default plan is measured at compile time, for the model (backend.reports[-1].plan after "
                "the first call, or cqil_fx.plan(model)); give groups= or start=/end= "
                "for a fixed plan")
        if isinstance(self.plan, Plan):
            if self.plan.num_blocks != num_blocks:
                raise CQILPlanError(
                    f"the plan was made for {self.plan.num_blocks} decoder blocks, "
                    f"but the model has {num_blocks}; make a plan for this model"
                )
            return self.plan
        if self.groups is not None:
            groups = self.groups
        else:
            groups = tuple(tuple(range(s, s + self.parallel)) for s in range(self.start, self.end, self.parallel))
        out_of_range = [i for g in groups for i in g if i >= num_blocks]
        if out_of_range:
            raise CQILPlanError(
                f"block index {out_of_range[0]} is out of range: the model has {num_blocks} "
                f"decoder blocks (0..{num_blocks - 1}); fix groups= or start=/end="
            )
        return Plan(num_blocks, tuple(g for g in groups if len(g) > 1), self.bypass)


def mode_row(mode: str) -> ModeRow:
    """The row of :data:`MODE_TABLE` named ``mode`` (not "auto")."""
    return next(row for row in MODE_TABLE if row.name == mode)


def mode_accepts(mode: str, option: str) -> bool:
    """Whether ``option`` (a :class:`CQILConfig` field) applies to ``mode``."""
    return option in (AUTO_OPTIONS if mode == AUTO else mode_row(mode).options)


def default_span(num_blocks: int, parallel: int) -> tuple[int, int]:
    """The paper-style uniform span over the middle of a stack of ``num_blocks`` blocks.

    ``[round(0.4 N), N - 2)``, ``start`` moved up until it divides by
    ``parallel``; the quality study measures it (it is no longer a default).
    """
    end = max(num_blocks - DEFAULT_TAIL_BLOCKS, 0)
    start = min(round(DEFAULT_START_FRACTION * num_blocks), end)
    start += (end - start) % parallel
    return start, end


def _check_int(field: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise CQILConfigError(f"{field}={value!r} must be an int")
    if value < minimum:
        raise CQILConfigError(f"{field}={value} must be >= {minimum}")


def _normalise_groups(groups: Sequence[Sequence[int]]) -> tuple[tuple[int, ...], ...]:
    try:
        out = tuple(sorted((tuple(g) for g in groups), key=lambda g: g[0] if g else -1))
    except TypeError as e:
        raise CQILConfigError(f"groups={groups!r} must be a list of lists of block indices") from e
    previous_end = -1
    for g in out:
        if not g:
            raise CQILConfigError("groups= holds an empty group; every group needs at least one block")
        for i in g:
            _check_int("groups", i, minimum=0)
        if list(g) != list(range(g[0], g[0] + len(g))):
            raise CQILConfigError(
                f"group {list(g)} is not consecutive: a group is a run of adjacent blocks, "
                f"e.g. [{g[0]}, {g[0] + 1}]"
            )
        if g[0] <= previous_end:
            raise CQILConfigError(f"group {list(g)} overlaps another group; each block may be in one group")
        previous_end = g[-1]
    return out
