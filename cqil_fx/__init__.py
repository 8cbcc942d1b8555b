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


def _passes_from_checkout() -> None:
    """Serve ``passes/`` as :mod:`cqil_fx.passes` from a source checkout that is not installed.

    Installed (``pip install [-e] .``), setuptools maps ``passes/`` to
    ``cqil_fx.passes``; a checkout put on ``PYTHONPATH`` as it is (a GPU
    machine's copy of the working tree, say) has it beside this package.
    """
    import importlib.util
    import sys
    from pathlib import Path

    if importlib.util.find_spec(f"{__name__}.passes") is not None:
        return
    checkout = Path(__file__).resolve().parent.parent / "passes"
    if (checkout / "__init__.py").is_file():
        spec = importlib.util.spec_from_file_location(f"{__name__}.passes", checkout / "__init__.py",
                                                      submodule_search_locations=[str(checkout)])
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)


_passes_from_checkout()

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
