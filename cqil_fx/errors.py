"""Every exception cqil_fx raises to users, under one base: :class:`CQILError`.

Each one names the field, block or file at fault and says how to fix it, and
each also subclasses the builtin that fits it (``ValueError`` for a bad value,
``RuntimeError`` for a failure at run time, ``NotImplementedError`` for what
this version cannot do), so ``except ValueError`` keeps working::

    try:
        fast(input_ids)
    except torch._dynamo.exc.BackendCompilerFailed as e:
        ours = e.inner_exception            # a CQILError, its message repeated in e's

Inside ``torch.compile`` Dynamo wraps them in ``BackendCompilerFailed``, whose
message repeats ours; the original is its ``inner_exception``. This module
imports nothing, so the passes can use it as a shared value type.
"""

from __future__ import annotations


class CQILError(Exception):
    """Base of every exception cqil_fx raises to users; catch this to catch them all."""


class CQILConfigError(CQILError, ValueError):
    """An argument or :class:`~cqil_fx.CQILConfig` field holds an illegal value."""


class CQILPlanError(CQILError, ValueError):
    """A plan does not fit the model it is applied to (indices, block kinds, ranks)."""


class CQILUnsupportedError(CQILError, NotImplementedError):
    """The request is legal but this version of cqil_fx cannot carry it out."""


class CQILDistributedError(CQILError, RuntimeError):
    """SPMD ranks cannot work together: one died or timed out, or they disagree on the plan."""


class UnrecognisedBlockError(CQILError, ValueError):
    """The graph has decoder layers, but not in a shape the passes can rewrite."""


class SpmdPlacementError(CQILPlanError):
    """The plan's groups cannot be placed one member per rank."""


class UncalibratableGraphError(CQILError, ValueError):
    """The graph cannot be run on calibration data (no token-id input, symbolic shapes, ...)."""


class ModelNotAvailableError(CQILError, RuntimeError):
    """The weights of a model asked for by name cannot be found on this machine."""


class TextSplitError(CQILError, ValueError):
    """A text split was asked for that does not exist or is too short."""


class RecoveredWeightsError(CQILError, ValueError):
    """A recovered-weights directory is missing, malformed, or does not fit the model."""


class ModelCacheError(CQILError, FileExistsError):
    """The converted-model cache cannot be written: something that is not a finished cache is in the way."""


class LatencyRegressionError(CQILError, AssertionError):
    """:func:`cqil_fx.tools.testing.assert_latency_reduction` measured less than the reduction asked for."""
