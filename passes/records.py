"""What the SPMD placements did to a rank's graph: plain records that :class:`RewrittenGraph` carries.

:class:`Placement` is written by :func:`~cqil_fx.passes.spmd.place_members`,
:class:`Sharding` by :func:`~cqil_fx.passes.tensor_parallel.shard_blocks`;
they live apart from both passes so that the rewrite's value type can name
them without importing the passes that make them.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Placement:
    """What :func:`place_members` kept and inserted on one rank."""

    rank: int
    world_size: int
    kept: tuple[int, ...]  # block indices this rank computes as a group member
    dropped: tuple[int, ...]  # block indices other ranks compute
    all_reduces: int
    all_gathers: int
    nodes_removed: int
    caches_released: int = 0  # cache tensors of dropped members made one element (static: prefill; dynamic: all)

    @property
    def collectives(self) -> int:
        return self.all_reduces + self.all_gathers


@dataclasses.dataclass(frozen=True)
class Sharding:
    """What :func:`shard_blocks` split on one rank."""

    rank: int
    world_size: int
    blocks: tuple[int, ...]  # blocks whose branches run tensor-parallel
    column_linears: int
    row_linears: int  # one all-reduce each
    lm_head: bool  # the LM head split over the vocabulary (one all-gather)
    whole_branches: tuple[int, ...] = ()  # with fallback: blocks of a branch left whole (heads do not divide)
    embedding: bool = False  # the input embedding split over the vocabulary (one all-reduce)

    @property
    def all_reduces(self) -> int:
        return self.row_linears + int(self.embedding)

    @property
    def all_gathers(self) -> int:
        return int(self.lm_head)
