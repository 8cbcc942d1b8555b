"""Progress output for long work (similarity, perplexity, plan search, distillation)::

    for window in progress(windows, enabled=True, desc="screen windows"):
        ...

A tqdm bar on stderr when ``enabled``; the items themselves otherwise.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TypeVar

T = TypeVar("T")


def progress(items: Iterable[T], enabled: bool = True, desc: str = "") -> Iterable[T]:
    """``items``, wrapped in a transient tqdm bar labelled ``desc`` when ``enabled``."""
    if not enabled:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, leave=False)
