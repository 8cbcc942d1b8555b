"""Planning under torch.distributed: rank 0 plans, the other ranks receive its answer.

    value = on_rank0(compute, to_json, from_json, timeout=300.0)

A plan search takes minutes; run on every rank it wastes the others' time,
and any rank that finishes first would wait at the next collective while the
collective timeout counts. So rank 0 computes alone and publishes its answer
(plain JSON) under a key of the process group's store; the other ranks wait
for that key in short steps, none of them inside a collective. Waiting is
bounded by liveness, not by how long the search takes: rank 0 bumps a
heartbeat counter in the store every few seconds while it works, and a
waiting rank raises :class:`~cqil_fx.errors.CQILDistributedError` once the
heartbeat has not moved for ``timeout`` seconds (rank 0 died or hangs) or
when rank 0 reports that its computation failed.

Every rank must call :func:`on_rank0` the same number of times in the same
order (each call takes the next key); outside a process group of more than
one rank it simply calls ``compute``.
"""

from __future__ import annotations

import datetime
import itertools
import json
import logging
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

import torch.distributed as dist

from ..errors import CQILDistributedError

log = logging.getLogger(__name__)

T = TypeVar("T")
PREFIX = "cqil_fx/planning"
_CALLS = itertools.count()


def distributed() -> bool:
    """Whether this process is one rank of an initialised process group of more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def on_rank0(compute: Callable[[], T], to_json: Callable[[T], Any], from_json: Callable[[Any], T],
             timeout: float, what: str = "the plan") -> T:
    """``compute()`` on rank 0; every other rank gets its value through the store (module docs)."""
    if not distributed():
        return compute()
    store = dist.distributed_c10d._get_default_store()
    key = f"{PREFIX}/{next(_CALLS)}"
    if dist.get_rank() == 0:
        return _compute_and_publish(store, key, compute, to_json, heartbeat=max(0.05, min(5.0, timeout / 10)))
    log.info("cqil: rank %d waits for rank 0 to find %s", dist.get_rank(), what)
    payload = _wait_for(store, key, timeout, what)
    if "error" in payload:
        raise CQILDistributedError(f"rank {dist.get_rank()}: rank 0 failed to find {what}: {payload['error']}")
    return from_json(payload["value"])


def _compute_and_publish(store, key: str, compute: Callable[[], T], to_json: Callable[[T], Any],
                         heartbeat: float) -> T:
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(heartbeat):
            try:
                store.add(f"{key}/alive", 1)
            except Exception:  # noqa: BLE001 - the store is gone; the waiting ranks will say so
                return

    thread = threading.Thread(target=beat, name="cqil-plan-heartbeat", daemon=True)
    thread.start()
    try:
        value = compute()
        payload = {"value": to_json(value)}
        return value
    except BaseException as e:
        payload = {"error": f"{type(e).__name__}: {str(e)[:500]}"}
        raise
    finally:
        stop.set()
        thread.join()
        store.set(key, json.dumps(payload))


def _wait_for(store, key: str, timeout: float, what: str) -> dict:
    step = datetime.timedelta(seconds=max(0.05, min(1.0, timeout / 10)))
    beats, moved = -1, time.monotonic()
    while True:
        try:
            store.wait([key], step)
            return json.loads(store.get(key))
        except dist.DistStoreError:
            pass  # not there yet: is rank 0 still working?
        except (RuntimeError, OSError) as e:
            if "timeout" not in str(e).lower():
                raise CQILDistributedError(f"rank {dist.get_rank()}: lost the process group's store while rank 0 "
                                           f"was finding {what} ({type(e).__name__}: {e})") from e
        now = store.add(f"{key}/alive", 0)
        if now != beats:
            beats, moved = now, time.monotonic()
        elif time.monotonic() - moved > timeout:
            raise CQILDistributedError(
                f"rank {dist.get_rank()}: rank 0 stopped working on {what}: no sign of it for {timeout:.0f} s "
                "(collective_timeout); it died or hangs")
