"""Progress lines for accountant work expected to be slow, on stderr.

The convention of dptrain's own progress messages (``dptrain.train.log``): a plain line, flushed
at once, from rank 0 only (``RANK`` unset or ``"0"``: torchrun sets it; importing
``torch.distributed`` here would slow ``import accountants``).  Queries expected to take less
than :data:`SLOW_SECONDS` print nothing; a slow one prints a line before (what it computes,
its size, the expected time) and one after (the time it took).
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

SLOW_SECONDS = 5.0
"""Expected seconds from which an accountant query announces itself."""


def format_seconds(seconds: float) -> str:
    """``3h05m``, ``4m10s`` or ``12s`` (also the training log's: ``dptrain.steplog``)."""
    if not math.isfinite(seconds):
        return "?"
    s = round(seconds)
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s}s"


def say(message: str) -> None:
    """Print ``message`` to stderr (rank 0 only), flushed."""
    if os.environ.get("RANK", "0") == "0":
        print(message, file=sys.stderr, flush=True)


@contextmanager
def slow_step(what: str, expected_seconds: float) -> Iterator[None]:
    """Announce ``what`` (``"... ~2m10s ..."``) and then its duration, if it is expected to
    take at least :data:`SLOW_SECONDS`; otherwise do nothing."""
    if expected_seconds < SLOW_SECONDS:
        yield
        return
    say(f"{what}: expected ~{format_seconds(expected_seconds)} ...")
    t0 = time.perf_counter()
    yield
    say(f"{what}: done in {format_seconds(time.perf_counter() - t0)}")
