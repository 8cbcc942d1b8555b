"""Exceptions cqil_fx raises for user mistakes.

Every one names the field or block at fault and says how to fix it. Inside
``torch.compile`` Dynamo wraps them in ``BackendCompilerFailed``, whose message
repeats ours; the original is its ``inner_exception`` (and its ``__context__``).
"""

from __future__ import annotations


class CQILConfigError(ValueError):
    """A :class:`~cqil_fx.CQILConfig` field holds an illegal value."""


class CQILPlanError(ValueError):
    """A plan does not fit the model it is applied to (indices, block kinds)."""


class CQILUnsupportedError(NotImplementedError):
    """The request is legal but this version of cqil_fx cannot carry it out."""


class CQILDistributedError(RuntimeError):
    """SPMD ranks cannot work together: one died or timed out, or they disagree on the plan."""
