"""Labelled status lines for long steps that have no progress bar of their own (loading, a check's images)."""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterator


@contextlib.contextmanager
def phase(desc: str, enabled: bool = True) -> Iterator[None]:
    """Print ``desc...`` to stderr when the step starts and its time when it ends (``desc... 12.3 s``), so that no
    step waits in silence; nothing when ``enabled`` is False."""
    if not enabled:
        yield
        return
    start = time.perf_counter()
    print(f"{desc}...", file=sys.stderr, flush=True)
    try:
        yield
    except BaseException:
        print(f"{desc}: stopped after {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
        raise
    print(f"{desc}: done in {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)


__all__ = ["phase"]
