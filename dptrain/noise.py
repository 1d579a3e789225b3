"""Gaussian noise from the run key, with full tails and an exact truncation bound.

What is drawn.  Normals come in pairs by Box-Muller in float64 from four 64-bit words of the
keyed stream (domain "noise"; AES-256 in counter mode, block ``step * 2^64 + j``)::

    theta = 2 pi a 2^-53                       a: the top 53 bits of word 0
    U     = 2^-(e+1) (1 + (f + 1) 2^-52)       f: the top 52 bits of word 1,
                                               e: leading zeros of the 128 bits (word 2, word 3)
    R     = sqrt(-2 ln U) = sqrt(2 ((e + 1) ln 2 - log1p((f + 1) 2^-52)))
    (z1, z2) = (R cos theta, R sin theta)

``U`` is uniform on (0, 1] with extended precision near 0: its exponent is geometric, as for
a uniform real, down to ``2^-129``, so ``|z|`` reaches ``R_max = sqrt(258 ln 2) = 13.37``
(float32 ``torch.randn`` on CPU stops at ``sqrt(48 ln 2) = 5.77``).  The counter of step ``t``
is ``(t, j)``, so step ``t`` draws the same noise whether or not the run was interrupted, and
on any device (the stream is computed on the CPU and moved to the parameter's device).

Truncation bound.  With exact arithmetic on continuous uniforms the construction is the
standard 2-D Gaussian except that ``U`` never falls in ``(0, 2^-129]``; that mass is moved
into ``(2^-129, 2^-128]``.  The radius map is a bijection, so each pair is within total
variation ``eta = 2^-129`` of ``N(0, I_2)``, and ``n`` pairs within ``n eta``.  A mechanism
within total variation ``tau`` of an ``(eps, delta)``-DP one is ``(eps, delta + (1 + e^eps)
tau)``-DP; :func:`truncation_delta` is that extra term, which runs add to their delta.

Floating-point caveats (Mironov 2012).  The uniforms are discrete (53-bit angles, 52-bit
mantissas), so the outputs lie on a discrete set and their fine structure differs from a
Gaussian's; the noisy sum is then rounded to the parameter dtype.  We do not claim protection
against attacks on the low-order bits of released floats beyond this (no snapping mechanism).

Backends.  CUDA parameters get the same construction from ChaCha20 bits computed on the GPU
(:mod:`dptrain.device_noise`: ``backend="auto"``, the default; ``"aes-cpu"`` or
``"chacha-device"`` force one): values then depend on the backend, never on the thread count
or chunking, and the state records which backend drew each step.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import numpy as np

from .secret import RunKey

if TYPE_CHECKING:
    from torch import Tensor

ETA_PER_PAIR = 2.0**-129
"""Total variation between one pair of this sampler (exact arithmetic) and ``N(0, I_2)``."""
RADIUS_MAX = math.sqrt(258 * math.log(2))
_CHUNK = 1 << 20  # pairs per batch of stream evaluation (32 MB of words)


def truncation_delta(epsilon: float, pairs: int) -> float:
    """``(1 + e^eps) * pairs * 2^-129``: the delta the noise sampler adds (see the module)."""
    if pairs <= 0:
        return 0.0
    if not math.isfinite(epsilon):
        return math.inf
    return (1.0 + math.exp(min(epsilon, 700.0))) * pairs * ETA_PER_PAIR


def _leading_zeros(hi: np.ndarray, lo: np.ndarray) -> np.ndarray:
    """Leading zeros of the 128-bit words ``hi * 2^64 + lo`` (0..128), exactly: from the
    float64 exponent of ``hi >> 11`` (exact below 2^53); the rare words with ``hi < 2^11``
    (probability 2^-53 each) are counted in Python."""
    lead = (53 - np.frexp((hi >> np.uint64(11)).astype(np.float64))[1]).astype(np.float64)
    for i in np.flatnonzero(hi < np.uint64(1 << 11)):
        h = int(hi[i])
        lead[i] = 64 - h.bit_length() if h else 128 - int(lo[i]).bit_length()
    return lead


def normals_from_words(words: np.ndarray) -> np.ndarray:
    """``2 m`` standard normals from ``(m, 4)`` uint64 words (see the module docstring).

    Computed in place on three float64 buffers, in the order of the formulas above (each
    operation rounds as the one-expression form would: the same bits, fewer temporaries)."""
    w = np.asarray(words, dtype=np.uint64).reshape(-1, 4)
    radius = _leading_zeros(w[:, 2], w[:, 3])  # the exponent e, 0..128
    frac = (w[:, 1] >> np.uint64(12)).astype(np.float64)
    frac += 1.0
    frac *= 2.0**-52  # (0, 1]
    np.log1p(frac, out=frac)
    radius += 1
    radius *= math.log(2.0)
    radius -= frac
    radius *= 2.0
    np.sqrt(radius, out=radius)  # sqrt(2 ((e + 1) ln 2 - log1p(...)))
    theta = (w[:, 0] >> np.uint64(11)).astype(np.float64)
    theta *= 2.0**-53
    theta *= 2.0 * math.pi
    out = np.empty((w.shape[0], 2), dtype=np.float64)
    np.cos(theta, out=frac)
    np.multiply(radius, frac, out=out[:, 0])
    np.sin(theta, out=frac)
    np.multiply(radius, frac, out=out[:, 1])
    return out.reshape(-1)


def _trim(chunks: Iterator[np.ndarray], n: int) -> Iterator[np.ndarray]:
    """``chunks`` cut to ``n`` values in all."""
    left = n
    for z in chunks:
        yield z[:left]
        left -= min(left, z.size)


class GaussianNoise:
    """``noise(like, std)`` returns ``N(0, std^2)`` shaped like ``like``, from the keyed stream.

    The engine calls :meth:`begin_step` with the step number before a step's draws; draws
    within a step continue the step's counter.  State (for checkpoints): the position in the
    stream and the number of pairs drawn, never the key.  Large draws run on one thread pool
    per sampler, made on first need and shut down by :meth:`close` (or when the sampler is
    collected, or at interpreter exit).  ``backend``: ``"auto"`` (ChaCha20 on the device for
    CUDA parameters, AES otherwise), ``"aes-cpu"`` or ``"chacha-device"``
    (:mod:`dptrain.device_noise`).
    """

    def __init__(self, key: RunKey | None = None, *, backend: str = "auto") -> None:
        from .device_noise import Backends  # imports torch: not at module import

        self.key = key if key is not None else RunKey.generate()
        self.backends = Backends(self.key, backend)  # ChaCha on the device for CUDA draws
        self._prf = self.key.prf("noise")
        self.step = 0
        self.block = 0  # next block of this step
        self.pairs = 0  # pairs drawn over the run (for the truncation bound)
        self._pool: ThreadPoolExecutor | None = None
        self._pool_size = 0
        self._finalizer: weakref.finalize | None = None

    def _executor(self, workers: int) -> ThreadPoolExecutor:
        """This sampler's pool with ``workers`` threads (re-made if the thread count changed)."""
        if self._pool is None or self._pool_size != workers:
            self.close()
            self._pool, self._pool_size = ThreadPoolExecutor(workers), workers
            self._finalizer = weakref.finalize(self, self._pool.shutdown, wait=False)
        return self._pool

    def close(self) -> None:
        """Shut the thread pool down (a later large draw makes a new one)."""
        if self._finalizer is not None:
            self._finalizer()  # shuts the pool down once
        self._pool, self._pool_size, self._finalizer = None, 0, None

    def __getstate__(self) -> dict[str, Any]:  # a pool is not copied or pickled
        return {**self.__dict__, "_pool": None, "_pool_size": 0, "_finalizer": None}

    @property
    def description(self) -> str:
        return (
            "AES-256-CTR stream of the run key -> Box-Muller in float64 with a 128-bit radius "
            f"exponent (|z| up to {RADIUS_MAX:.2f}; truncation {ETA_PER_PAIR:.3g} per pair); "
            + ("secure key" if self.key.secure else f"INSECURE seed {self.key.insecure_seed}")
            + self.backends.describe()
        )

    def begin_step(self, step: int) -> None:
        """Position the stream at step ``step``'s first block."""
        self.step = int(step)
        self.block = 0

    def _chunks(self, n: int) -> Iterator[np.ndarray]:
        """The next ``n`` standard normals of this step, in float64 chunks of up to
        ``2 * _CHUNK``, computed on up to ``torch.get_num_threads()`` threads of the sampler's
        pool (AES and numpy release the GIL; each chunk's counter range is fixed in advance, so
        the values do not depend on the thread count).  An odd ``n`` drops the last pair's second normal."""
        pairs = (n + 1) // 2
        jobs = [(self.block + 2 * d, min(_CHUNK, pairs - d)) for d in range(0, pairs, _CHUNK)]
        self.block += 2 * pairs
        self.pairs += pairs
        step = self.step

        def draw(job: tuple[int, int]) -> np.ndarray:
            block, m = job
            return normals_from_words(self._prf.run(step, block, 2 * m).reshape(m, 4))

        import torch  # here, not at import: `dptrain epsilon` reads truncation_delta only

        threads = torch.get_num_threads()
        if min(len(jobs), threads) > 1:
            yield from _trim(self._executor(threads).map(draw, jobs), n)
        else:
            yield from _trim(map(draw, jobs), n)

    def standard(self, n: int) -> np.ndarray:
        """The next ``n`` standard normals of this step (float64)."""
        if self.backends.use_device(self.step, None):  # a step ChaCha drew: its stream
            return self.backends.standard(self, n)
        return np.concatenate([np.empty(0), *self._chunks(n)])

    def __call__(self, like: Tensor, std: float) -> Tensor:
        import torch

        if std == 0:
            return torch.zeros_like(like)
        if self.backends.use_device(self.step, like.device):
            return self.backends.draw(self, [like], [std])[0]
        # drawn on the CPU (AES-CTR and Box-Muller in float64, rounded to the dtype here), then
        # moved: the values are the same on every device; pinned memory makes the copy async
        pin = like.device.type == "cuda"
        out = torch.empty(like.numel(), dtype=like.dtype, pin_memory=pin)
        start = 0
        for z in self._chunks(like.numel()):
            np.multiply(z, std, out=z)
            out[start : start + z.size] = torch.from_numpy(z)
            start += z.size
        return out.view(like.shape).to(like.device, non_blocking=pin)

    def many(self, likes: list[Tensor], stds: list[float]) -> list[Tensor]:
        """``[self(like, std) for like, std in zip(likes, stds)]``, the same values, drawn at once.

        The draws of one step are consecutive counter ranges of the stream (``like`` ``i`` takes
        ``m_i = ceil(n_i / 2)`` pairs from block ``block + 2 sum_{j<i} m_j``), so one run of
        ``sum_i m_i`` pairs, cut into chunks evaluated in parallel (the values do not depend on
        the cut), gives every tensor its own pairs; an odd ``n_i`` drops its last pair's second
        normal as a single call does.  Each value is ``z * std`` in float64 rounded to the
        tensor's dtype, as in :meth:`__call__`.  Memory: the outputs and one chunk per thread.
        """
        import torch

        if len(likes) != len(stds):
            raise ValueError("many() needs one std per tensor")
        device = next((t.device for t in likes if t.device.type == "cuda"), None)
        if likes and self.backends.use_device(self.step, device or likes[0].device):
            return self.backends.draw(self, likes, stds)
        outs: list[Tensor] = []
        pieces: list[tuple[int, int, Tensor, float]] = []  # (first pair, n, flat output, std)
        pairs = 0
        for like, std in zip(likes, stds, strict=True):
            if std == 0:  # no draw, as in __call__
                outs.append(torch.zeros_like(like))
                continue
            pin = like.device.type == "cuda"
            out = torch.empty(like.numel(), dtype=like.dtype, pin_memory=pin)
            outs.append(out)
            pieces.append((pairs, like.numel(), out, float(std)))
            pairs += (like.numel() + 1) // 2
        if pairs:
            self._fill(pairs, pieces)
        result = []
        for like, out in zip(likes, outs, strict=True):
            if out.device != like.device or out.shape != like.shape:
                out = out.view(like.shape).to(like.device, non_blocking=out.is_pinned())
            result.append(out)
        return result

    def _fill(self, pairs: int, pieces: list[tuple[int, int, Tensor, float]]) -> None:
        """Draw ``pairs`` pairs of this step and write each piece's normals, scaled, into it."""
        import torch

        threads = torch.get_num_threads()
        size = max(1 << 14, min(_CHUNK, -(-pairs // (2 * threads))))
        jobs = [(d, min(size, pairs - d)) for d in range(0, pairs, size)]
        first, step = self.block, self.step
        self.block += 2 * pairs
        self.pairs += pairs

        def draw(job: tuple[int, int]) -> tuple[int, np.ndarray]:
            d, m = job
            words = self._prf.run(step, first + 2 * d, 2 * m).reshape(m, 4)
            return d, normals_from_words(words)

        chunks = (
            self._executor(threads).map(draw, jobs)
            if min(len(jobs), threads) > 1
            else map(draw, jobs)
        )
        k = 0  # the first piece that may overlap the next chunk
        for d, z in chunks:
            lo, hi = 2 * d, 2 * d + z.size  # normals [lo, hi) of the run
            while k < len(pieces) and 2 * pieces[k][0] + pieces[k][1] <= lo:
                k += 1
            j = k
            while j < len(pieces) and 2 * pieces[j][0] < hi:
                start, n, out, std = pieces[j]
                a, b = max(lo, 2 * start), min(hi, 2 * start + n)
                if a < b:
                    part = np.multiply(z[a - lo : b - lo], std)
                    out[a - 2 * start : b - 2 * start] = torch.from_numpy(part)
                j += 1

    def truncation_delta(self, epsilon: float) -> float:
        return truncation_delta(epsilon, self.pairs)

    def state_dict(self) -> dict[str, Any]:
        return {
            "stream": "aes256-ctr-box-muller-v1",
            "key_id": self.key.key_id,
            "step": self.step,
            "block": self.block,
            "pairs": self.pairs,
            **self.backends.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("stream") != "aes256-ctr-box-muller-v1":
            raise ValueError(
                "the checkpoint's noise comes from another generator (an older dptrain?); "
                "resume it with the version that wrote it, or start a new run"
            )
        if state.get("key_id") != self.key.key_id:
            raise ValueError(
                "the checkpoint was written with another run key than this run's secret.key "
                "(or insecure_seed); restore the run's own key file to resume"
            )
        self.step, self.block, self.pairs = (
            int(state["step"]),
            int(state["block"]),
            int(state["pairs"]),
        )
        self.backends.load_state_dict(state)
