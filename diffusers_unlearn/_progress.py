"""Labelled status lines for long steps that have no progress bar of their own (loading, a check's images)."""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from collections.abc import Iterator

# A step announces itself once it has run this long (seconds): quick steps, and quick failures, stay silent.
ANNOUNCE_AFTER = 1.0


@contextlib.contextmanager
def phase(desc: str, enabled: bool = True) -> Iterator[None]:
    """``desc...`` on stderr once the step has run ``ANNOUNCE_AFTER`` seconds, then ``desc: done in 12.3 s`` when
    it ends, so that no long step waits in silence; nothing when ``enabled`` is False. A step that fails says
    nothing more: its error is the report."""
    if not enabled:
        yield
        return
    start = time.perf_counter()
    announced = threading.Event()

    def announce() -> None:
        announced.set()
        print(f"{desc}...", file=sys.stderr, flush=True)

    timer = threading.Timer(ANNOUNCE_AFTER, announce)
    timer.daemon = True
    if ANNOUNCE_AFTER <= 0:
        announce()
    else:
        timer.start()
    try:
        yield
    finally:
        timer.cancel()
        timer_done = announced.is_set()
    if timer_done:
        print(f"{desc}: done in {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)


__all__ = ["ANNOUNCE_AFTER", "phase"]
