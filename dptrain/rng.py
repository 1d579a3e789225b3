"""Torch's process-wide random generators, shared safely between threads.

Torch has one CPU generator (and one per CUDA device) per *process*, and dropout or weight
initialization cannot be handed another.  Every place in dptrain that seeds or swaps these
generators does it inside :func:`seeded` or with :data:`GLOBAL_RNG` held: one re-entrant lock for
the whole section.  Without it, two threads of one process (the in-process federated
simulation runs its clients as threads) interleave: a client's step seeded from its run key
while another builds its model from ``recipe.seed`` gives that model keyed weights, and the
step's dropout masks a stream the other thread moved.  Results would then follow thread
timing, and a secret-keyed stream could reach a thread that publishes what it draws.

The lock serializes such sections across threads; code that draws from the global
generators without it (not dptrain's) is not protected.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import torch

GLOBAL_RNG = threading.RLock()  # held while torch's global generators are seeded or swapped


@contextlib.contextmanager
def seeded(seed: int, device: torch.device | None = None) -> Iterator[None]:
    """Torch's CPU generator, and ``device``'s when it is a CUDA device, seeded with ``seed``
    inside the block and restored to their states after it, with :data:`GLOBAL_RNG` held
    throughout.  Other CUDA devices' generators are left alone."""
    cuda = device is not None and device.type == "cuda"
    index = 0
    if cuda:
        index = device.index if device.index is not None else torch.cuda.current_device()
    with GLOBAL_RNG, torch.random.fork_rng(devices=[index] if cuda else []):
        torch.default_generator.manual_seed(seed)
        if cuda:
            with torch.cuda.device(index):
                torch.cuda.manual_seed(seed)  # this device's generator only
        yield
