"""cqil_fx: run quasi-independent decoder layers concurrently, as a torch.compile backend.

    import torch
    import cqil_fx

    plan = cqil_fx.plan(model, budget=0.10)                  # ahead of time: searched once, cached
    fast = torch.compile(model, backend="cqil")              # uses that plan
    fast = torch.compile(model, backend=cqil_fx.make_backend(cqil_fx.CQILConfig(start=20, end=28, parallel=2)))

The package in pipeline order, each floor importing only those below it
(docs/architecture.md has a file per stage):

* :mod:`cqil_fx.config`, :mod:`cqil_fx.errors`, :mod:`cqil_fx.stack`, :mod:`cqil_fx.fingerprint`, ... --
  what every part shares: the request, the plan, the mode table, one exception family, the decoder stack;
* :mod:`cqil_fx.passes` -- the FX passes (find blocks, rewrite groups, bypass, segments, SPMD placement)
  and their driver, ``apply_plan``;
* :mod:`cqil_fx.eager` -- the eager side, on module hooks: the reference semantics, quality,
  similarity, corrections, distillation;
* :mod:`cqil_fx.planning` -- the planning stage: the budgeted search, the meters (eager and graph),
  the default plan, the plan cache, and :func:`plan`, the explicit step;
* :mod:`cqil_fx.graph` -- the runtime: the backend's one pipeline, the execution modes, the
  concurrent executor, the SPMD runtime and its transports;
* :mod:`cqil_fx.tools` -- inspection, the CLI, the quality study, the real model and text, timing,
  latency assertions, generation.

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
                     LatencyRegressionError, ModelCacheError, ModelNotAvailableError, RecoveredWeightsError,
                     TextSplitError, UncalibratableGraphError, UnrecognisedBlockError)
from .graph.backend import CQILBackend, cqil_backend, make_backend, rewrite_graph
from .graph.report import CompileReport
from .planning import plan


def _register_without_install() -> None:
    """``backend="cqil"`` from a source checkout that is not installed (its entry point then missing):
    register the backend with Dynamo directly. An installed package leaves it to the entry point
    (registering both would be a duplicate)."""
    from importlib.metadata import entry_points

    from torch._dynamo.backends.registry import _COMPILER_FNS, register_backend

    if "cqil" not in entry_points(group="torch_dynamo_backends").names and "cqil" not in _COMPILER_FNS:
        register_backend(cqil_backend, name="cqil")


_register_without_install()

__all__ = [
    "CQILBackend",
    "CQILConfig",
    "CQILConfigError",
    "CQILDistributedError",
    "CQILError",
    "CQILPlanError",
    "CQILUnsupportedError",
    "CompileReport",
    "LatencyRegressionError",
    "ModelCacheError",
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
    "plan",
    "recover",
    "rewrite_graph",
    "save_recovered",
]
