"""The on-disk plan cache: a searched plan is paid for once per model, budget and parallelism.

    key = PlanKey.of(kinds, block_weights, budget=0.10, parallel=2)
    plan = load_plan(key)                 # None on a miss (or a corrupt entry, with a warning)
    store_plan(key, plan, {"cost": 0.061})

Where: ``$CQIL_FX_PLAN_CACHE`` if set, else ``plans/`` under ``$CQIL_FX_CACHE``
(the cqil_fx cache root), else ``cqil_fx/plans`` under ``$XDG_CACHE_HOME``
(default ``~/.cache``), the way Inductor's ``TORCHINDUCTOR_CACHE_DIR`` moves
its cache and other Linux caches follow the XDG base directories. An entry is one JSON file named
by the key's digest: plain data, never pickle, because a cache directory is
not trusted code. The key holds what determines the answer: the decoder
stack's structure (number of blocks and their kinds), a fingerprint of every
block's weights, the budget, the group size, the measure, this package's
version and the search's own settings (the self-written text's size, the safety
factor, the correction's ridge...), so a change to the search is a miss.
A model whose weights cannot be fingerprinted (:mod:`cqil_fx.fingerprint`)
has no key: its plan is searched every time, with one log line, never cached.

Besides these searched entries, :func:`cqil_fx.planning.plan` writes a
*chosen* entry (:meth:`PlanKey.chosen`: the blocks and weights, no budget or
search settings): the plan the user picked for these weights, which the
backend with no plan fields prefers to any searched entry. An entry that does not parse, or was written for another key, is
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

from ..config import Plan
from ..errors import CQILError
from ..fingerprint import weights_fingerprint

log = logging.getLogger(__name__)

ENV_DIR = "CQIL_FX_PLAN_CACHE"
ENV_ROOT = "CQIL_FX_CACHE"
FORMAT = "cqil_fx.plan-cache/1"
CHOSEN = "chosen"  # PlanKey.measure of the plan cqil_fx.plan() picked for a model's weights


def cache_dir() -> Path:
    """The plan cache directory (see the module docstring for the environment variables)."""
    if os.environ.get(ENV_DIR):
        return Path(os.environ[ENV_DIR]).expanduser()
    root = os.environ.get(ENV_ROOT)
    if root:
        return Path(root).expanduser() / "plans"
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg and Path(xdg).is_absolute() else Path.home() / ".cache"
    return base / "cqil_fx" / "plans"


def package_version() -> str:
    try:
        return metadata.version("cqil-fx")
    except metadata.PackageNotFoundError:
        return "unknown"


@dataclasses.dataclass(frozen=True)
class PlanKey:
    """What determines a searched plan."""

    kinds: tuple[str, ...]  # per decoder block: "sequential" or "parallel"
    weights: str  # weights_fingerprint of the blocks
    budget: float
    parallel: int
    measure: str = "kl"
    version: str = dataclasses.field(default_factory=package_version)
    search: str = ""  # the search's own settings (planning.auto.default_search_settings), as sorted JSON

    @classmethod
    def of(cls, kinds: Sequence[str], block_weights: Sequence[Iterable[torch.Tensor]], budget: float,
           parallel: int, measure: str = "kl", search: Mapping[str, Any] | None = None) -> PlanKey | None:
        """The key of a searched plan; ``search``: the search's own settings. None when a weight cannot
        be fingerprinted (no cache for that model)."""
        weights = weights_fingerprint(block_weights)
        if weights is None:
            return None
        return cls(tuple(kinds), weights, float(budget), int(parallel), measure,
                   search=json.dumps(dict(search or {}), sort_keys=True))

    def chosen(self) -> PlanKey:
        """The key of the plan chosen for these blocks and weights, whatever the budget or search."""
        return dataclasses.replace(self, budget=0.0, parallel=0, measure=CHOSEN, search="")

    @property
    def digest(self) -> str:
        return hashlib.sha256(json.dumps(dataclasses.asdict(self), sort_keys=True).encode()).hexdigest()[:32]


# Chosen plans also kept in memory, per cache directory, so that cqil_fx.plan() then backend="cqil" works in
# one process even where the directory cannot be written.
_CHOSEN: dict[tuple[Path, str], tuple[Plan, dict]] = {}


def entry_path(key: PlanKey, directory: Path | None = None) -> Path:
    return (directory or cache_dir()) / f"plan-{key.digest}.json"


def load_plan(key: PlanKey, directory: Path | None = None) -> tuple[Plan, dict] | None:
    """(the cached plan, what was stored with it), or None on a miss or an unusable entry."""
    if key.measure == CHOSEN and (directory or cache_dir(), key.digest) in _CHOSEN:
        plan, info = _CHOSEN[directory or cache_dir(), key.digest]
        return plan, dict(info)
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
    if key.measure == CHOSEN:
        _CHOSEN[directory or cache_dir(), key.digest] = (plan, dict(info or {}))
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
