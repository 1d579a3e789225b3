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
import random
import threading
from collections.abc import Iterator

import numpy as np
import torch

GLOBAL_RNG = threading.RLock()  # held while torch's global generators are seeded or swapped


@contextlib.contextmanager
def seeded(seed: int, device: torch.device | None = None, *, host: bool = False) -> Iterator[None]:
    """Torch's CPU generator, and ``device``'s when it is a CUDA device, seeded with ``seed``
    inside the block and restored to their states after it, with :data:`GLOBAL_RNG` held
    throughout.  Other CUDA devices' generators are left alone.  ``host``: NumPy's and
    Python's global generators too (a model may draw its masks from them, as wav2vec2's
    SpecAugment does from NumPy)."""
    cuda = device is not None and device.type == "cuda"
    index = 0
    if cuda:
        index = device.index if device.index is not None else torch.cuda.current_device()
    with GLOBAL_RNG, torch.random.fork_rng(devices=[index] if cuda else []):
        saved = host_state() if host else None
        torch.default_generator.manual_seed(seed)
        if cuda:
            with torch.cuda.device(index):
                torch.cuda.manual_seed(seed)  # this device's generator only
        if host:
            random.seed(seed)
            np.random.seed([seed & 0xFFFFFFFF, seed >> 32])  # 64 bits as two words
        try:
            yield
        finally:
            if saved is not None:
                set_host_state(saved)


def host_state() -> tuple:
    """The states of Python's and NumPy's global generators (NumPy's as a comparable tuple)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return (random.getstate(), (kind, keys.tobytes(), pos, has_gauss, gauss))


def set_host_state(state: tuple) -> None:
    """Put back what :func:`host_state` returned."""
    random.setstate(state[0])
    kind, keys, pos, has_gauss, gauss = state[1]
    np.random.set_state((kind, np.frombuffer(keys, dtype=np.uint32), pos, has_gauss, gauss))
