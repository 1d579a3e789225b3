"""Full-tailed Gaussian noise computed on the parameter's device (ChaCha20 + float64 Box-Muller),
and which generator draws each step.

What is drawn.  The distribution contract is :mod:`dptrain.noise`'s, from other bits: pair
``j`` of step ``t`` takes the four 64-bit words ``w0..w3`` of half ``j mod 2`` of ChaCha20
block ``floor(j / 2)`` of nonce ``t`` (:mod:`dptrain.chacha`, keyed with the run key's
sub-key ``"noise/chacha"``; 64-bit word ``k`` of a block = its 32-bit words ``2k`` (low) and
``2k + 1`` (high))::

    theta = 2 pi a 2^-53                       a: the top 53 bits of w0
    U     = 2^-(e+1) (1 + (f + 1) 2^-52)       f: the top 52 bits of w1,
                                               e: leading zeros of the 128 bits (w2, w3)
    (z1, z2) = sqrt(-2 ln U) (cos theta, sin theta)

in float64 torch operations on the target device, the integer parts exactly (``a``, ``f``,
``e`` from 32-bit halves, all below 2^53), then ``z * std`` in float64 rounded to the
parameter's dtype there.  So each pair is within total variation ``2^-129`` of ``N(0, I_2)``
(``U`` never below ``2^-129``) as in :mod:`dptrain.noise`, with ``|z| <= 13.37``.  The values
depend only on (key, step, pair index): not on chunking, thread or device count; across
device types the integer words are bit-identical and the float64 ``log1p``/``sin``/``cos``
may differ in the last ulp (vendor math libraries), which rounding to the dtype hides but for
rare last-bit ties.

Backends.  ``"aes-cpu"``: :mod:`dptrain.noise`'s AES-CTR stream on the CPU (then moved);
``"chacha-device"``: this module, on the parameter's device; ``"auto"`` (the default): the
device generator for CUDA parameters, AES otherwise.  One backend draws a whole step (the one
of its first draw; later draws of the step follow it), and every step drawn is recorded in
the sampler's state (``backends``: ``[first_step, last_step, name]`` ranges), so a step the
state has seen is only ever drawn again by the backend that drew it (identical values), and a
forced backend that contradicts the record is refused.

Why a switch is sound.  A run that resumes on another device draws its later steps with the
other backend.  Both are keyed pseudorandom functions of the run key under distinct sub-keys
(``"noise"`` for AES, ``"noise/chacha"`` here), so every step's noise is fresh keyed noise,
independent of every other step's, whichever backend drew it; the accountant needs nothing
more.  Steps a crashed session drew after its last checkpoint are not in that checkpoint's
record; a resume recomputes them, possibly with the other backend.  That is sound because
nothing computed after the last checkpoint is released: ``dptrain train`` recomputes those steps
and truncates ``metrics.jsonl`` (private to the data owner in any case) to the checkpoint, and
federated clients never redraw a step (their ledger is saved after every step).
"""

from __future__ import annotations

import math
import os
import sys
from typing import TYPE_CHECKING, Any

import torch

from .errors import UserError

if TYPE_CHECKING:
    from torch import Tensor

    from .chacha import ChaCha20
    from .secret import RunKey

__all__ = [
    "AES",
    "AUTO",
    "BACKENDS",
    "CHACHA",
    "Backends",
    "DeviceNormals",
    "NoiseBackendError",
    "leading_zeros_128",
    "normals_from_keystream",
    "piece_spans",
]

AES, CHACHA, AUTO = "aes-cpu", "chacha-device", "auto"
BACKENDS = (AES, CHACHA, AUTO)
CUDA_CHUNK = 1 << 22  # ChaCha blocks per chunk on CUDA (16 M normals; about 1 GB of buffers)
# on other devices: 32 Ki normals, so each cipher operation on (4, count) words stays within
# torch's intra-op grain (32768 elements) and runs on one thread: with two threads on a loaded
# machine the ~540 small parallel operations per chunk spent far more time waiting than working
CPU_CHUNK = 1 << 13


class NoiseBackendError(UserError, ValueError):
    """A noise backend that cannot be used (unknown, or contradicting the steps the state
    records); the message names the fix."""


def _u32(x: Tensor) -> Tensor:
    """The unsigned value of int32 words, as float64 (exact)."""
    return x.to(torch.int64).bitwise_and_(0xFFFFFFFF).to(torch.float64)


def _bit_length(v: Tensor) -> Tensor:
    """``int(v).bit_length()`` of float64 holding integers in ``[0, 2^53)``, exactly: the
    biased exponent of ``v >= 1`` is ``floor(log2 v) + 1023``; ``v = 0`` gives 0."""
    return ((v.view(torch.int64) >> 52) - 1022).clamp_(min=0)


def leading_zeros_128(w3: Tensor, w2: Tensor, w1: Tensor, w0: Tensor) -> Tensor:
    """Leading zeros (0..128, int64) of the 128-bit ``w3 w2 w1 w0`` (int32 words holding
    unsigned 32-bit digits, most significant first), exactly: the bits are cut into pieces of
    53, 43 and 32 bits, each an exact float64 integer, and the first nonzero piece counts."""
    top = _u32(w3).mul_(2.0**21).add_((w2 >> 11).bitwise_and_(0x1FFFFF).to(torch.float64))
    mid = (w2 & 0x7FF).to(torch.float64).mul_(2.0**32).add_(_u32(w1))
    low = _u32(w0)
    return torch.where(
        top > 0,
        53 - _bit_length(top),
        torch.where(mid > 0, 96 - _bit_length(mid), 128 - _bit_length(low)),
    )


def normals_from_keystream(words: Tensor) -> Tensor:
    """``(count, 2, 2)`` float64 standard normals from ``(16, count)`` int32 ChaCha words:
    ``[j, h]`` is the pair of half ``h`` of block ``j`` (see the module docstring)."""
    k = words.view(2, 8, -1)  # [half, 32-bit word of the half, block]
    lo0, hi0, lo1, hi1, lo2, hi2, lo3, hi3 = k.unbind(1)
    e = leading_zeros_128(hi2, lo2, hi3, lo3).to(torch.float64)  # the exponent, 0..128
    frac = _u32(hi1).mul_(2.0**20).add_((lo1 >> 12).bitwise_and_(0xFFFFF).to(torch.float64))
    frac.add_(1.0).mul_(2.0**-52).log1p_()  # log1p((f + 1) 2^-52)
    radius = e.add_(1.0).mul_(math.log(2.0)).sub_(frac).mul_(2.0).sqrt_()
    theta = _u32(hi0).mul_(2.0**21).add_((lo0 >> 11).bitwise_and_(0x1FFFFF).to(torch.float64))
    theta.mul_(2.0**-53).mul_(2.0 * math.pi)
    out = torch.stack([radius * theta.cos(), radius * theta.sin()], dim=-1)  # [half, block, 2]
    return out.transpose(0, 1)


_COMPILED: dict[tuple[str, int], tuple[Any, Any] | None] = {}  # (device type, chunk) -> pair
_COMPILE_ERRORS: dict[tuple[str, int], str | None] = {}


def _compiled_pair(cipher: ChaCha20, device: torch.device, size: int) -> tuple[Any, Any] | None:
    """``torch.compile`` of (block function, Box-Muller) for chunks of ``size`` blocks on
    ``device``'s type, once per process (every sampler shares it), or None where it cannot be
    built or disagrees with eager on one chunk (across the counter's 32-bit carry): the
    keystream bit for bit, the normals to 1e-12 (the kernels' float64 libm may differ in ulps)."""
    slot = (device.type, size)
    if slot not in _COMPILED:
        from .chacha import block_function
        from .distributed import is_main

        if is_main():
            print(
                f"building the compiled noise kernels for {device.type} (once per process, "
                "~20 s on an H200; DPTRAIN_NOISE_COMPILE=0 keeps them eager) ...",
                file=sys.stderr,
                flush=True,
            )
        pair, error = None, None
        try:
            fast = (
                torch.compile(block_function, dynamic=False),
                torch.compile(normals_from_keystream, dynamic=False),
            )
            states = cipher.states(2**64 - 1 - size, 2**32 - size // 2, size, device)
            words, fast_words = block_function(states), fast[0](states)
            same = torch.equal(words, fast_words) and torch.allclose(
                fast[1](fast_words), normals_from_keystream(words), rtol=1e-12, atol=1e-12
            )
            pair, error = (fast, None) if same else (None, "compiled values differ from eager")
        except Exception as err:  # no inductor, no compiler, a backend that cannot build it
            error = f"{type(err).__name__}: {err}"
        _COMPILED[slot], _COMPILE_ERRORS[slot] = pair, error
    return _COMPILED[slot]


def piece_spans(
    pieces: list[tuple[int, int, Tensor, float]], lo: int, hi: int, k: int = 0
) -> tuple[int, list[tuple[int, int, int]]]:
    """Where the run-relative normals ``[lo, hi)`` of a chunk go: ``(k', [(j, a, b)])``, the
    normals ``a < b`` of the chunk that piece ``j`` ``(first pair, n, output, std)`` holds
    (its normals ``[2 first, 2 first + n)``).  Pieces are disjoint, in pair order, and those
    before ``k`` end at or before ``lo``; ``k'`` is the first that does not (the ``k`` of the
    next, later chunk)."""
    while k < len(pieces) and 2 * pieces[k][0] + pieces[k][1] <= lo:
        k += 1
    spans, j = [], k
    while j < len(pieces) and 2 * pieces[j][0] < hi:
        start, n = pieces[j][0], pieces[j][1]
        a, b = max(lo, 2 * start), min(hi, 2 * start + n)
        if a < b:
            spans.append((j, a, b))
        j += 1
    return k, spans


class DeviceNormals:
    """Standard normals of the ChaCha20 stream, computed on a given device in chunks.

    ``chunk``: ChaCha blocks per chunk (4 normals each; default by device type), which bounds
    memory and does not change the values.  ``compile``: run the block function and Box-Muller
    through ``torch.compile``, built and checked once per process (:func:`_compiled_pair`);
    eager where that fails, with the reason in ``compile_error``.  ``None``: on CUDA unless
    the environment sets ``DPTRAIN_NOISE_COMPILE=0`` (on an H200, GPT-2 124M's 124.4 M
    normals: 38.5 ms per step compiled against 217 ms eager, for a one-time 22 s build and
    check at the first step; never on the CPU, where inductor took 266 s on 2 loaded cores)."""

    def __init__(
        self, cipher: ChaCha20, *, chunk: int | None = None, compile: bool | None = None
    ) -> None:
        if chunk is not None and chunk < 1:
            raise ValueError("chunk must be a positive number of blocks")
        self.cipher = cipher
        self.chunk = chunk
        self.compile = compile
        self.compile_error: str | None = None  # why the compiled kernels are not used

    def chunk_for(self, device: torch.device) -> int:
        if self.chunk is not None:
            return self.chunk
        return CUDA_CHUNK if device.type == "cuda" else CPU_CHUNK

    def _eager(self, states: Tensor) -> Tensor:
        from .chacha import block_function

        return normals_from_keystream(block_function(states))

    def _pair(self, device: torch.device, size: int) -> tuple[Any, Any] | None:
        """The checked compiled (block function, Box-Muller), or None: eager."""
        wanted = self.compile
        if wanted is None:
            wanted = device.type == "cuda" and os.environ.get("DPTRAIN_NOISE_COMPILE") != "0"
        if not wanted:
            return None
        pair = _compiled_pair(self.cipher, device, size)
        self.compile_error = _COMPILE_ERRORS[(device.type, size)]
        return pair

    def prepare(self, device: torch.device) -> None:
        """Build and check the compiled kernels for ``device`` now (where they are wanted),
        not at the first draw: the build does not then count as a training step's time."""
        self._pair(device, self.chunk_for(device))

    def blocks(self, nonce: int, start: int, count: int, device: torch.device) -> Tensor:
        """``(count, 2, 2)`` float64 normals of blocks ``start .. start + count - 1`` (one
        computation: the caller bounds ``count``)."""
        states = self.cipher.states(nonce, start, count, device)
        pair = self._pair(device, self.chunk_for(device))
        if pair is None:
            return self._eager(states)
        size = self.chunk_for(device)
        if count < size:  # compiled for one shape: pad the last chunk (the padding is dropped)
            pad = self.cipher.states(nonce, 0, size - count, device)
            states = torch.cat([states, pad], dim=1)
        return pair[1](pair[0](states))[:count]

    def fill(
        self,
        nonce: int,
        first_pair: int,
        pieces: list[tuple[int, int, Tensor, float]],
        pairs: int,
        device: torch.device,
    ) -> None:
        """Write pairs ``first_pair .. first_pair + pairs - 1`` of ``nonce``, scaled, into the
        pieces ``(first pair of the run, n, flat output, std)``: normal ``i`` of a piece is
        normal ``2 (first_pair + start) + i`` of the stream, times ``std`` in float64, rounded
        to the output's dtype (on its device)."""
        if pairs <= 0:
            return
        b0, b1 = first_pair // 2, -(-(first_pair + pairs) // 2)  # blocks covering the pairs
        base = 2 * first_pair  # stream normal index of the run's first normal
        size, k = self.chunk_for(device), 0
        for cb in range(b0, b1, size):
            count = min(size, b1 - cb)
            z = self.blocks(nonce, cb, count, device).reshape(-1)
            lo = 4 * cb - base  # run-relative normals [lo, lo + 4 count) of this chunk
            hi = lo + z.numel()
            k, spans = piece_spans(pieces, lo, hi, k)
            for j, a, b in spans:
                start, _, out, std = pieces[j]
                out[a - 2 * start : b - 2 * start].copy_(z[a - lo : b - lo].mul(std))


class Backends:
    """Which generator draws each step of a :class:`dptrain.noise.GaussianNoise`, the record
    of it, and the device generator (see the module docstring)."""

    def __init__(self, key: RunKey, backend: str = AUTO, **device_options: Any) -> None:
        if backend not in BACKENDS:
            raise NoiseBackendError(
                f"unknown noise backend {backend!r}. Fix: one of {', '.join(BACKENDS)}"
            )
        self.choice = backend
        self.drawn: list[list[Any]] = []  # [first_step, last_step, backend] ranges
        self._key = key
        self._options = device_options
        self._normals: DeviceNormals | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_normals": None}

    @property
    def normals(self) -> DeviceNormals:
        if self._normals is None:
            self._normals = DeviceNormals(self._key.chacha("noise/chacha"), **self._options)
        return self._normals

    def recorded(self, step: int) -> str | None:
        """The backend that drew ``step`` (None: not drawn as far as this state knows)."""
        for first, last, name in self.drawn:
            if first <= step <= last:
                return name
        return None

    def prepare(self, device: torch.device) -> None:
        """Ready the device generator for draws on ``device`` if it is the one that draws
        there (forced, or ``auto`` on CUDA); nothing is drawn or recorded."""
        if self._wanted(device) == CHACHA:
            self.normals.prepare(device)

    def _wanted(self, device: torch.device | None) -> str:
        """The backend this sampler's choice picks for a draw on ``device``."""
        if self.choice != AUTO:
            return self.choice
        return CHACHA if device is not None and device.type == "cuda" else AES

    def use_device(self, step: int, device: torch.device | None) -> bool:
        """Fix (and record) the backend of a draw at ``step`` on ``device``; True for ChaCha."""
        wanted = self._wanted(device)
        recorded = self.recorded(step)
        if recorded is not None and recorded != wanted:
            if self.choice != AUTO:
                raise NoiseBackendError(
                    f"step {step}'s noise was drawn with the {recorded} backend and this sampler "
                    f"is forced to {self.choice}: drawing the step again with it would give the "
                    f"step fresh, unaccounted noise. Fix: use backend={recorded!r} or 'auto'"
                )
            wanted = recorded
        last = self.drawn[-1] if self.drawn else None
        if recorded is None:
            if last is not None and last[2] == wanted and last[0] <= step <= last[1] + 1:
                last[1] = step
            else:
                self.drawn.append([step, step, wanted])
        return wanted == CHACHA

    def draw(self, noise: Any, likes: list[Tensor], stds: list[float]) -> list[Tensor]:
        """The device generator's values for :meth:`GaussianNoise.many` (and ``__call__``):
        the same slots of the step as the AES path (like ``i`` takes ``ceil(n_i / 2)`` pairs,
        a zero std none), advancing ``noise.block`` (two per pair) and ``noise.pairs``."""
        outs: list[Tensor] = []
        pieces: list[tuple[int, int, Tensor, float]] = []
        pairs, device = 0, None
        for like, std in zip(likes, stds, strict=True):
            if std == 0:
                outs.append(torch.zeros_like(like))
                continue
            out = torch.empty(like.shape, dtype=like.dtype, device=like.device)
            outs.append(out)
            pieces.append((pairs, like.numel(), out.view(-1), float(std)))
            pairs += (like.numel() + 1) // 2
            if device is None or (like.device.type == "cuda" and device.type != "cuda"):
                device = like.device
        if pairs:
            first, noise.block, noise.pairs = (
                noise.block // 2,
                noise.block + 2 * pairs,
                noise.pairs + pairs,
            )
            self.normals.fill(noise.step, first, pieces, pairs, device)
        return outs

    def standard(self, noise: Any, n: int) -> Any:
        """``n`` float64 standard normals of the device generator, as numpy (on the CPU)."""
        cpu = torch.empty(n, dtype=torch.float64, device="cpu")  # not the default device
        return self.draw(noise, [cpu], [1.0])[0].numpy()

    def describe(self) -> str:
        device = "ChaCha20 + float64 Box-Muller on the parameter's device, same tail"
        if self.choice == AUTO:
            return f"; CUDA parameters: {device}"
        return f"; backend {self.choice}" + (f" ({device})" if self.choice == CHACHA else "")

    def state_dict(self) -> dict[str, Any]:
        return {"backends": [list(r) for r in self.drawn]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """The record of ``state``; a state from before backends existed drew every step up
        to its ``step`` with AES."""
        drawn = state.get("backends")
        if drawn is None:
            touched = state.get("block", 0) or state.get("pairs", 0) or state.get("step", 0)
            drawn = [[0, int(state.get("step", 0)), AES]] if touched else []
        ok = isinstance(drawn, list) and all(
            isinstance(r, (list, tuple)) and len(r) == 3 and r[2] in (AES, CHACHA) for r in drawn
        )
        if not ok:
            raise ValueError("the checkpoint's noise backend record is malformed")
        self.drawn = [[int(a), int(b), str(c)] for a, b, c in drawn]
