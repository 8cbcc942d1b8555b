"""cqil_fx: run quasi-independent decoder layers concurrently, as a torch.compile backend.

    import torch
    from cqil_fx import cqil_backend, make_backend, CQILConfig

    fast = torch.compile(model, backend=make_backend(CQILConfig(start=20, end=28, parallel=2, bypass=1)))

The package in pipeline order (docs/architecture.md has a file per stage):

* :mod:`cqil_fx.config`, :mod:`cqil_fx.errors`, :mod:`cqil_fx.stack` -- what every part shares:
  the request, the plan, one exception family, the one definition of the decoder stack;
* :mod:`cqil_fx.passes` -- the FX passes (find blocks, rewrite groups, bypass, segments, SPMD placement);
* :mod:`cqil_fx.planning` -- the budgeted plan search, whatever measures the plans;
* :mod:`cqil_fx.graph` -- the graph side: the backend, calibration on the captured graph,
  the concurrent executor, the SPMD runtime and its transports;
* :mod:`cqil_fx.eager` -- the eager side, on module hooks: the reference semantics, quality,
  similarity, the eager planner, distillation, the quality study;
* :mod:`cqil_fx.tools` -- inspection, the CLI, the real model and text, latency assertions, generation.

See docs/ for the semantics (CQIL, Zou et al., ACL 2024) and the pipeline.
"""

from .config import CQILConfig, Plan
from .eager.distill import PlanMismatchWarning, Recovery, distill_plan, load_recovered, recover, save_recovered
from .eager.reference import cqil_reference
from .errors import (CQILConfigError, CQILDistributedError, CQILError, CQILPlanError, CQILUnsupportedError,
                     ModelNotAvailableError, RecoveredWeightsError, TextSplitError, UncalibratableGraphError,
                     UnrecognisedBlockError)
from .graph.backend import CompileReport, CQILBackend, cqil_backend, make_backend, rewrite_graph

__all__ = [
    "CQILBackend",
    "CQILConfig",
    "CQILConfigError",
    "CQILDistributedError",
    "CQILError",
    "CQILPlanError",
    "CQILUnsupportedError",
    "CompileReport",
    "ModelNotAvailableError",
    "Plan",
    "PlanMismatchWarning",
    "RecoveredWeightsError",
    "Recovery",
    "TextSplitError",
    "UncalibratableGraphError",
    "UnrecognisedBlockError",
    "cqil_backend",
    "cqil_reference",
    "distill_plan",
    "load_recovered",
    "make_backend",
    "recover",
    "rewrite_graph",
    "save_recovered",
]
