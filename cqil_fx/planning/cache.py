"""The on-disk plan cache: a searched plan is paid for once per model, budget and parallelism.

    key = PlanKey.of(kinds, block_weights, budget=0.10, parallel=2)
    plan = load_plan(key)                 # None on a miss (or a corrupt entry, with a warning)
    store_plan(key, plan, {"cost": 0.061})

Where: ``$CQIL_FX_PLAN_CACHE`` if set, else ``plans/`` under ``$CQIL_FX_CACHE``
(the cqil_fx cache root, default ``~/.cache/cqil_fx``), the way Inductor's
``TORCHINDUCTOR_CACHE_DIR`` moves its cache. An entry is one JSON file named
by the key's digest: plain data, never pickle, because a cache directory is
not trusted code. The key holds what determines the answer: the decoder
stack's structure (number of blocks and their kinds), a fingerprint of every
block's weights, the budget, the group size, the measure, this package's
version and the search's own settings (the self-written text's size, the safety
factor, the correction's ridge...), so a change to the search is a miss. An entry that does not parse, or was written for another key, is
ignored with a warning; a directory that cannot be written means no cache
(one warning), never a failure. Writes go to a temporary file in the same
directory and are renamed into place, so two processes writing the same entry
at once leave one valid file.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from .config import Plan
from .errors import CQILError

log = logging.getLogger(__name__)

ENV_DIR = "CQIL_FX_PLAN_CACHE"
ENV_ROOT = "CQIL_FX_CACHE"
FORMAT = "cqil_fx.plan-cache/1"
_SAMPLE = 4096  # elements of each weight hashed (evenly strided), plus its shape and dtype


def cache_dir() -> Path:
    """The plan cache directory (see the module docstring for the environment variables)."""
    if os.environ.get(ENV_DIR):
        return Path(os.environ[ENV_DIR]).expanduser()
    root = os.environ.get(ENV_ROOT)
    return (Path(root).expanduser() if root else Path.home() / ".cache" / "cqil_fx") / "plans"


def package_version() -> str:
    try:
        return metadata.version("cqil-fx")
    except metadata.PackageNotFoundError:
        return "unknown"


def tensor_digest(t: torch.Tensor) -> str:
    """A digest of a weight: its shape, dtype and an evenly strided sample of its values."""
    flat = t.detach().reshape(-1)
    sample = flat[:: max(1, flat.numel() // _SAMPLE)]
    h = hashlib.sha256(f"{tuple(t.shape)}|{t.dtype}".encode())
    h.update(sample.to("cpu", torch.float32).numpy().tobytes())
    return h.hexdigest()


def weights_fingerprint(block_weights: Sequence[Iterable[torch.Tensor]]) -> str:
    """One digest for every block's weights, in block order; within a block, order does not matter
    (the graph and the module list their parameters in different orders)."""
    h = hashlib.sha256()
    for weights in block_weights:
        h.update(("|".join(sorted(tensor_digest(w) for w in weights)) + ";").encode())
    return h.hexdigest()


@dataclasses.dataclass(frozen=True)
class PlanKey:
    """What determines a searched plan."""

    kinds: tuple[str, ...]  # per decoder block: "sequential" or "parallel"
    weights: str  # weights_fingerprint of the blocks
    budget: float
    parallel: int
    measure: str = "kl"
    version: str = dataclasses.field(default_factory=package_version)
    search: str = ""  # the search's own settings (eager.planner.default_search_settings), as sorted JSON

    @classmethod
    def of(cls, kinds: Sequence[str], block_weights: Sequence[Iterable[torch.Tensor]], budget: float,
           parallel: int, measure: str = "kl") -> PlanKey:
        from .eager.planner import default_search_settings

        return cls(tuple(kinds), weights_fingerprint(block_weights), float(budget), int(parallel), measure,
                   search=json.dumps(default_search_settings(), sort_keys=True))

    @property
    def digest(self) -> str:
        return hashlib.sha256(json.dumps(dataclasses.asdict(self), sort_keys=True).encode()).hexdigest()[:32]


def entry_path(key: PlanKey, directory: Path | None = None) -> Path:
    return (directory or cache_dir()) / f"plan-{key.digest}.json"


def load_plan(key: PlanKey, directory: Path | None = None) -> tuple[Plan, dict] | None:
    """(the cached plan, what was stored with it), or None on a miss or an unusable entry."""
    path = entry_path(key, directory)
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except OSError as e:
        log.warning("cqil: cannot read the plan cache entry %s (%s); searching again", path, e)
        return None
    try:
        data = json.loads(text)
        if data.get("format") != FORMAT or data.get("key") != json.loads(json.dumps(dataclasses.asdict(key))):
            raise ValueError("written for another key or by another format")
        return Plan.from_dict(data["plan"]), dict(data.get("info") or {})
    except (ValueError, TypeError, KeyError, AttributeError, CQILError) as e:
        log.warning("cqil: ignoring the plan cache entry %s: %s", path, e)
        return None


def store_plan(key: PlanKey, plan: Plan, info: Mapping[str, Any] | None = None,
               directory: Path | None = None) -> Path | None:
    """Write ``plan`` for ``key``; returns the entry's path, or None (one warning) if it cannot be written."""
    path = entry_path(key, directory)
    payload = json.dumps({"format": FORMAT, "key": dataclasses.asdict(key), "plan": plan.to_dict(),
                          "info": dict(info or {})})
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        with os.fdopen(fd, "w") as f:
            f.write(payload)
        os.replace(tmp, path)  # atomic: readers see the old entry or the new one, never half of one
    except OSError as e:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        log.warning("cqil: cannot write the plan cache in %s (%s); the plan is not cached "
                    "(set %s to a writable directory)", path.parent, e, ENV_DIR)
        return None
    return path
