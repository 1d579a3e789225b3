"""Gaussian noise from the run key, with full tails and an exact truncation bound.

What is drawn.  Normals come in pairs by Box-Muller in float64 from four 64-bit words of the
keyed stream (domain "noise"; AES-256 in counter mode, block ``step * 2^64 + j``)::

    theta = 2 pi a 2^-53                       a: the top 53 bits of word 0
    U     = 2^-(e+1) (1 + (f + 1) 2^-52)       f: the top 52 bits of word 1,
                                               e: leading zeros of the 128 bits (word 2, word 3)
    R     = sqrt(-2 ln U)
    (z1, z2) = (R cos theta, R sin theta),     a draw of std s: ((R s) cos theta, (R s) sin theta)

``U`` is uniform on (0, 1] with extended precision near 0: its exponent is geometric, as for
a uniform real, down to ``2^-129``, so ``|z|`` reaches ``R_max = sqrt(258 ln 2) = 13.37``
(float32 ``torch.randn`` on CPU stops at ``sqrt(48 ln 2) = 5.77``).  The counter of step ``t``
is ``(t, j)``, so step ``t`` draws the same noise whether or not the run was interrupted, and
on any device (the stream is computed on the CPU and moved to the parameter's device).

Arithmetic (stream ``aes256-ctr-box-muller-v2``).  ``U`` is exact: its float64 bits are
assembled from ``e`` and ``f``.  ``ln``, ``cos`` and ``sin`` are torch's float64 kernels
(SLEEF, within 1 ulp), ``sqrt`` and the products are correctly rounded, then each value is
rounded once more to the tensor's dtype.  Every kernel is elementwise and vectorized for every
element, so the values do not depend on the thread count or on how a draw is cut into chunks;
on a CPU with another vector instruction set (torch's ``ATEN_CPU_CAPABILITY``) they may differ
in the last float64 bit.  Stream v1 computed the same ``U`` and ``theta`` with numpy ufuncs as
``sqrt(2 ((e + 1) ln 2 - log1p(...)))`` and ``(R cos theta) s``: the same law, other last bits.

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
import os
import threading
from bisect import bisect_right
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from queue import SimpleQueue
from typing import TYPE_CHECKING, Any

import numpy as np

from .secret import RunKey

if TYPE_CHECKING:
    from torch import Tensor

ETA_PER_PAIR = 2.0**-129
"""Total variation between one pair of this sampler (exact arithmetic) and ``N(0, I_2)``."""
RADIUS_MAX = math.sqrt(258 * math.log(2))
_CHUNK = 1 << 16  # pairs per chunk (a job of one thread: 2 MB of words, 512 KB per buffer)
STREAM = "aes256-ctr-box-muller-v2"
"""The generator's name in checkpoints (v1: the same law, numpy ufuncs: other last bits)."""


_POOLS: dict[int, ThreadPoolExecutor] = {}  # by worker count: the process's noise pools
_POOLS_LOCK = threading.Lock()


def _forget_pools() -> None:  # a forked child has none of the parent's worker threads
    global _POOLS_LOCK
    _POOLS.clear()
    _POOLS_LOCK = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pools)


def noise_pool(workers: int) -> ThreadPoolExecutor:
    """The process's noise pool of ``workers`` threads (``torch.get_num_threads()``), shared
    by every sampler: samplers drawing at once (the clients of an in-process federated
    simulation) queue their chunks on it, so noise never runs on more threads than torch
    is given.  Made on first need; its idle workers block on the queue (they do not spin)."""
    with _POOLS_LOCK:
        pool = _POOLS.get(workers)
        if pool is None:
            import torch

            pool = ThreadPoolExecutor(workers, "dptrain-noise", initializer=_serial_worker)
            started = threading.Barrier(workers + 1)
            for _ in range(workers):  # start every thread now (each blocks until all are up)
                pool.submit(started.wait, 60)
            started.wait(60)
            torch.set_num_threads(workers)  # the process-wide count the initializers lowered
            _POOLS[workers] = pool
        return pool


def pairs_for(tensors: Iterable[Tensor]) -> int:
    """The Gaussian pairs one draw of noise shaped like ``tensors`` takes:
    ``sum_i ceil(n_i / 2)`` (one noise tensor per tensor, an odd ``n_i`` drops a normal)."""
    return sum((t.numel() + 1) // 2 for t in tensors)


def truncation_delta(epsilon: float, pairs: int) -> float:
    """``(1 + e^eps) * pairs * 2^-129``: the delta the noise sampler adds (see the module)."""
    if pairs <= 0:
        return 0.0
    if not math.isfinite(epsilon):
        return math.inf
    return (1.0 + math.exp(min(epsilon, 700.0))) * pairs * ETA_PER_PAIR


_M52, _M53 = (1 << 52) - 1, (1 << 53) - 1
_EXPONENT = 0x7FF << 52  # the exponent field of a float64
_U_OFFSET = 1 - (53 << 52)  # U's bits: v's exponent field lowered by 53, plus f + 1
_ANGLE = math.pi * 2.0**-52  # 2 pi 2^-53, exact scaling of float64 2 pi


def _bit_length(x: np.ndarray) -> np.ndarray:
    """Bits of each uint64 (0 for 0), exactly: float64 exponents of 53-bit values."""
    big = x >= np.uint64(1 << 53)
    top = np.where(big, x >> np.uint64(11), x).astype(np.float64)  # exact: below 2^53
    return np.frexp(top)[1].astype(np.int64) + np.where(big, 11, 0)


def _radius_angle(words: np.ndarray, radius: Tensor, angle: Tensor, ints: Tensor) -> None:
    """``radius <- R``, ``angle <- theta`` of the ``(m, 4)`` uint64 ``words`` (module docstring),
    in the given ``(m,)`` buffers (float64, float64, int64).

    ``U`` is built exactly from its bits: ``v`` = the top 53 bits of word 2 is exact in
    float64, and for ``v >= 1`` (``e <= 52``) its exponent is ``52 - e``, so ``U``'s bits are
    the exponent field of ``v`` lowered by 53 plus the mantissa ``f + 1`` (``f + 1 = 2^52``
    carries into the exponent: ``U = 2^-e``, as the formula gives).  Words with ``v = 0``
    (probability 2^-53 per pair) are set apart from the 128-bit leading-zero count.  Then
    ``R = sqrt(-2 ln U)`` (the same ``U``, one ``log`` instead of ``log1p`` and a sum)."""
    import torch

    w = torch.from_numpy(words.view(np.int64))  # the same bits, as torch shifts int64
    torch.bitwise_right_shift(w[:, 2], 11, out=ints)
    ints.bitwise_and_(_M53)  # v: a logical shift of the unsigned word
    rare = int(ints.min()) == 0 if ints.numel() else False
    radius.copy_(ints)  # exact below 2^53
    bits = radius.view(torch.int64)
    bits.bitwise_and_(_EXPONENT)
    torch.bitwise_right_shift(w[:, 1], 12, out=ints)
    ints.bitwise_and_(_M52)  # f
    ints.add_(_U_OFFSET)
    bits.add_(ints)  # U = 2^-(e+1) (1 + (f + 1) 2^-52), exactly
    if rare:
        i = np.flatnonzero(words[:, 2] < np.uint64(1 << 11))
        hi, lo = words[i, 2], words[i, 3]
        e = np.where(hi > 0, 64 - _bit_length(hi), 128 - _bit_length(lo))
        f = (words[i, 1] >> np.uint64(12)).astype(np.int64)
        bits[torch.from_numpy(i)] = torch.from_numpy(((1022 - e) << 52) + f + 1)
    radius.log_().mul_(-2.0).sqrt_()
    torch.bitwise_right_shift(w[:, 0], 11, out=ints)
    ints.bitwise_and_(_M53)  # a
    angle.copy_(ints)
    angle.mul_(_ANGLE)


def normals_from_words(words: np.ndarray) -> np.ndarray:
    """``2 m`` standard normals from ``(m, 4)`` uint64 words (see the module docstring)."""
    import torch

    w = np.ascontiguousarray(words, dtype=np.uint64).reshape(-1, 4)
    m = w.shape[0]
    radius, angle, trig = (torch.empty(m, dtype=torch.float64, device="cpu") for _ in range(3))
    _radius_angle(w, radius, angle, torch.empty(m, dtype=torch.int64, device="cpu"))
    out = torch.empty((m, 2), dtype=torch.float64, device="cpu")
    torch.mul(radius, torch.cos(angle, out=trig), out=out[:, 0])
    torch.mul(radius, torch.sin(angle, out=trig), out=out[:, 1])
    return out.reshape(-1).numpy()


class _Scratch:
    """Reused buffers for one chunk of up to ``size`` pairs: its AES output and the float64 /
    int64 buffers of the Box-Muller step (one per worker thread)."""

    def __init__(self, size: int) -> None:
        import torch

        self.size = size
        self.words = np.empty(4 * size + 2, dtype=np.uint64)
        self.radius, self.angle, self.trig = (
            torch.empty(size, dtype=torch.float64, device="cpu") for _ in range(3)
        )
        self.ints = torch.empty(size, dtype=torch.int64, device="cpu")


def _serial_worker() -> None:
    """Pool initializer: torch ops of this thread run on this thread alone (the pool's threads
    are the parallelism; a kernel that waited for torch's other intra-op threads at every
    operation stalls for milliseconds whenever another process holds a core)."""
    import torch

    torch.get_num_threads()  # torch's per-thread set-up first (it reads the global count)
    torch.set_num_threads(1)  # this thread's OpenMP and MKL counts; the global is restored


def _box_muller_into(
    words: np.ndarray,
    d: int,
    scratch: _Scratch,
    pieces: list[tuple[int, int, Tensor, float]],
    k: int,
) -> None:
    """The normals of the chunk of pairs ``[d, d + m)`` (``words``: its ``(m, 4)`` words), each
    ``(R std) cos theta`` (even index) or ``(R std) sin theta`` (odd) in float64, rounded into
    the pieces (from piece ``k`` on) that hold those pairs."""
    import torch

    m = words.shape[0]
    radius, angle, trig = scratch.radius[:m], scratch.angle[:m], scratch.trig[:m]
    _radius_angle(words, radius, angle, scratch.ints[:m])
    segments = []  # (first, end) in the chunk, the even and the odd outputs
    for start, n, out, std in pieces[k:]:
        if start >= d + m:
            break
        a, b = max(d, start), min(d + m, start + (n + 1) // 2)
        if a < b:
            if std != 1.0:
                radius[a - d : b - d].mul_(std)  # pieces hold disjoint pairs
            o, end = 2 * (a - start), 2 * (b - start)  # end is n + 1 for an odd n's last pair
            segments.append((a - d, b - d, out[o:end:2], out[o + 1 : end : 2]))
    torch.cos(angle, out=trig)
    for i, j, even, _ in segments:
        torch.mul(radius[i:j], trig[i:j], out=even)
    torch.sin(angle, out=trig)
    for i, _, _, odd in segments:
        j = i + odd.numel()
        torch.mul(radius[i:j], trig[i:j], out=odd)


class GaussianNoise:
    """``noise(like, std)`` returns ``N(0, std^2)`` shaped like ``like``, from the keyed stream.

    The engine calls :meth:`begin_step` with the step number before a step's draws; draws
    within a step continue the step's counter.  State (for checkpoints): the position in the
    stream and the number of pairs drawn, never the key.  Large draws run on the process's
    noise pool (:func:`noise_pool`, ``torch.get_num_threads()`` workers shared by every
    sampler, each running torch single-threaded), in the sampler's reused chunk buffers
    (~12 MB at 2 threads; freed by :meth:`close`): one sampler draws from one thread at a
    time.  The values depend on neither.
    ``backend``: ``"auto"`` (ChaCha20 on the device for CUDA parameters, AES otherwise),
    ``"aes-cpu"`` or ``"chacha-device"`` (:mod:`dptrain.device_noise`).
    """

    def __init__(self, key: RunKey | None = None, *, backend: str = "auto") -> None:
        from .device_noise import Backends  # imports torch: not at module import

        self.key = key if key is not None else RunKey.generate()
        self.backends = Backends(self.key, backend)  # ChaCha on the device for CUDA draws
        self._prf = self.key.prf("noise")
        self.step = 0
        self.block = 0  # next block of this step
        self.pairs = 0  # pairs drawn over the run (for the truncation bound)
        self._scratch: list[_Scratch] = []  # chunk buffers, made on the first draw

    @staticmethod
    def _executor(workers: int) -> ThreadPoolExecutor:
        return noise_pool(workers)

    def close(self) -> None:
        """Free the chunk buffers (a later draw makes new ones; the pool is the process's)."""
        self._scratch = []

    def __getstate__(self) -> dict[str, Any]:  # buffers are not copied or pickled
        return {**self.__dict__, "_scratch": []}

    @property
    def description(self) -> str:
        return (
            f"AES-256-CTR stream of the run key -> Box-Muller in float64 ({STREAM}) with a "
            f"128-bit radius exponent (|z| up to {RADIUS_MAX:.2f}; truncation "
            f"{ETA_PER_PAIR:.3g} per pair); "
            + ("secure key" if self.key.secure else f"INSECURE seed {self.key.insecure_seed}")
            + self.backends.describe()
        )

    def begin_step(self, step: int) -> None:
        """Position the stream at step ``step``'s first block."""
        self.step = int(step)
        self.block = 0

    def prepare(self, device: Any) -> None:
        """Ready the generator that will draw on ``device`` (the device kernels' one-time
        build on CUDA) before training starts; draws nothing."""
        import torch

        self.backends.prepare(torch.device(device))

    def standard(self, n: int) -> np.ndarray:
        """The next ``n`` standard normals of this step (float64)."""
        if self.backends.use_device(self.step, None):  # a step ChaCha drew: its stream
            return self.backends.standard(self, n)
        import torch

        out = torch.empty(max(int(n), 0), dtype=torch.float64, device="cpu")
        self._fill((out.numel() + 1) // 2, [(0, out.numel(), out, 1.0)])
        return out.numpy()

    def __call__(self, like: Tensor, std: float) -> Tensor:
        import torch

        if std == 0:
            return torch.zeros_like(like)
        if self.backends.use_device(self.step, like.device):
            return self.backends.draw(self, [like], [std])[0]
        # drawn on the CPU (AES-CTR and Box-Muller in float64, rounded to the dtype here), then
        # moved: the values are the same on every device; pinned memory makes the copy async
        pin = like.device.type == "cuda"
        out = torch.empty(like.numel(), dtype=like.dtype, device="cpu", pin_memory=pin)
        self._fill((out.numel() + 1) // 2, [(0, out.numel(), out, float(std))])
        return out.view(like.shape).to(like.device, non_blocking=pin)

    def many(self, likes: list[Tensor], stds: list[float]) -> list[Tensor]:
        """``[self(like, std) for like, std in zip(likes, stds)]``, the same values, drawn at once.

        The draws of one step are consecutive counter ranges of the stream (``like`` ``i`` takes
        ``m_i = ceil(n_i / 2)`` pairs from block ``block + 2 sum_{j<i} m_j``), so one run of
        ``sum_i m_i`` pairs, cut into chunks (the values do not depend on the cut), gives every
        tensor its own pairs; an odd ``n_i`` drops its last pair's second normal as a single
        call does.  Each value is ``(R std) cos theta`` (or ``sin``) in float64 rounded to the
        tensor's dtype, as in :meth:`__call__`.  Memory: the outputs and the sampler's chunk
        buffers.
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
            out = torch.empty(like.numel(), dtype=like.dtype, device="cpu", pin_memory=pin)
            outs.append(out)
            pieces.append((pairs, like.numel(), out, float(std)))
            pairs += (like.numel() + 1) // 2
        self._fill(pairs, pieces)
        result = []
        for like, out in zip(likes, outs, strict=True):
            if out.device != like.device or out.shape != like.shape:
                out = out.view(like.shape).to(like.device, non_blocking=out.is_pinned())
            result.append(out)
        return result

    def _buffers(self, size: int, count: int) -> SimpleQueue[_Scratch]:
        """``count`` chunk buffers of ``size`` pairs (the sampler's, grown when needed)."""
        if any(b.size < size for b in self._scratch):
            self._scratch = []
        while len(self._scratch) < count:
            self._scratch.append(_Scratch(size))
        free: SimpleQueue[_Scratch] = SimpleQueue()
        for b in self._scratch:
            free.put(b)
        return free

    def _fill(self, pairs: int, pieces: list[tuple[int, int, Tensor, float]]) -> None:
        """Draw ``pairs`` pairs of this step and write each piece's normals, scaled, into it.

        Chunks of ``_CHUNK`` pairs, each (AES-CTR into a reused buffer, then Box-Muller with
        torch's float64 kernels on one thread) a job of the process's noise pool of
        ``torch.get_num_threads()`` threads (AES and torch release the GIL), or of this thread
        when that is 1.  Each chunk's counter range is fixed in advance and every kernel is
        elementwise, so the values do not depend on the thread count or the cut.  A piece is
        ``(first pair, n, flat output, std)``; pieces are in pair order, the chunks write
        disjoint parts of them."""
        import torch

        if pairs <= 0:
            return
        first, step = self.block, self.step
        self.block += 2 * pairs
        self.pairs += pairs
        jobs = [(d, min(_CHUNK, pairs - d)) for d in range(0, pairs, _CHUNK)]
        threads = torch.get_num_threads()
        free = self._buffers(jobs[0][1], min(threads, len(jobs)))
        starts = [piece[0] for piece in pieces]

        def draw(job: tuple[int, int]) -> None:
            d, m = job
            scratch = free.get()
            try:
                words = self._prf.run(step, first + 2 * d, 2 * m, out=scratch.words)
                k = max(bisect_right(starts, d) - 1, 0)  # the piece holding pair d
                _box_muller_into(words.reshape(m, 4), d, scratch, pieces, k)
            finally:
                free.put(scratch)

        if threads > 1:
            for _ in self._executor(threads).map(draw, jobs):
                pass
        else:
            for job in jobs:
                draw(job)

    def truncation_delta(self, epsilon: float) -> float:
        return truncation_delta(epsilon, self.pairs)

    def state_dict(self) -> dict[str, Any]:
        return {
            "stream": STREAM,
            "key_id": self.key.key_id,
            "step": self.step,
            "block": self.block,
            "pairs": self.pairs,
            **self.backends.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("stream") != STREAM:
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
