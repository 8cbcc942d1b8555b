"""cqil_fx: run quasi-independent decoder layers concurrently, as a torch.compile backend.

    import torch
    from cqil_fx import cqil_backend, make_backend, CQILConfig

    fast = torch.compile(model, backend=make_backend(CQILConfig(start=20, end=28, parallel=2, bypass=1)))

See docs/ for the semantics (CQIL, Zou et al., ACL 2024) and the pipeline.
"""

from .backend import CompileReport, cqil_backend, make_backend, rewrite_graph
from .config import CQILConfig, Plan
from .distill import (PlanMismatchWarning, RecoveredWeightsError, Recovery, distill_plan, load_recovered, recover,
                      save_recovered)
from .errors import CQILConfigError, CQILDistributedError, CQILPlanError, CQILUnsupportedError
from .reference import cqil_reference

__all__ = [
    "CQILConfig",
    "CQILConfigError",
    "CQILDistributedError",
    "CQILPlanError",
    "CQILUnsupportedError",
    "CompileReport",
    "Plan",
    "PlanMismatchWarning",
    "RecoveredWeightsError",
    "Recovery",
    "cqil_backend",
    "cqil_reference",
    "distill_plan",
    "load_recovered",
    "make_backend",
    "recover",
    "rewrite_graph",
    "save_recovered",
]
