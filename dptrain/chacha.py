"""ChaCha20 keystream as vectorized torch integer ops, on any device.

The block function is Bernstein's ChaCha with 20 rounds (the RFC 7539 quarter-round) in the
original layout: state words 0-3 the constant ``"expand 32-byte k"``, 4-11 the 256-bit key
(little-endian words), 12-13 a 64-bit block counter (low word first) and 14-15 a 64-bit nonce.
Block ``b`` of nonce ``n`` is ``state + 20 rounds(state)`` (wrapping 32-bit adds), read as 16
little-endian words: the bytes of the ``cryptography`` package's ``ChaCha20(key, nonce16)``
with ``nonce16 = b.to_bytes(8, "little") + n.to_bytes(8, "little")`` (OpenSSL's 16-byte IV is
state words 12-15), which the tests check bit for bit, the counter carry included.

Arithmetic.  Words are held as ``int32`` (two's complement: an add wraps modulo 2^32 as the
unsigned add does); a rotation is ``(x << r) | ((x >> (32 - r)) & (2^r - 1))``, the mask making
the arithmetic right shift logical.  The four quarter-rounds of a column (or diagonal) round run
as one operation on ``(4, count)`` rows, so a block costs about 540 elementwise operations,
each over all ``count`` blocks at once.  As a PRF: ChaCha20 keyed with a uniform key is
assumed indistinguishable from a random function of (nonce, counter) (the standard assumption).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from torch import Tensor

__all__ = ["ChaCha20", "block_function"]

SIGMA = (0x61707865, 0x3320646E, 0x79622D32, 0x6B206574)  # "expand 32-byte k"
_ROUND_SHIFTS = (16, 12, 8, 7)


def _i32(x: int) -> int:
    """The int32 with the bits of the 32-bit unsigned ``x``."""
    x &= 0xFFFFFFFF
    return x - (1 << 32) if x >= 1 << 31 else x


def _rotl_(x: Tensor, r: int, tmp: Tensor) -> Tensor:
    """``x <<<= r`` in place on int32 words (``tmp``: scratch of ``x``'s shape)."""
    torch.bitwise_right_shift(x, 32 - r, out=tmp)
    tmp.bitwise_and_((1 << r) - 1)
    x.bitwise_left_shift_(r)
    return x.bitwise_or_(tmp)


def _quarter_rounds_(a: Tensor, b: Tensor, c: Tensor, d: Tensor, tmp: Tensor) -> None:
    """The RFC 7539 quarter-round on rows ``(a[i], b[i], c[i], d[i])``, in place."""
    r1, r2, r3, r4 = _ROUND_SHIFTS
    for r_d, r_b in ((r1, r2), (r3, r4)):
        a.add_(b)
        _rotl_(d.bitwise_xor_(a), r_d, tmp)
        c.add_(d)
        _rotl_(b.bitwise_xor_(c), r_b, tmp)


def block_function(state: Tensor) -> Tensor:
    """``(16, count)`` int32 keystream words of the ``(16, count)`` int32 input states: the
    states plus their 20-round permutation (10 double rounds: columns, then diagonals)."""
    a, b, c, d = (state[4 * i : 4 * i + 4].clone() for i in range(4))
    tmp = torch.empty_like(a)
    for _ in range(10):
        _quarter_rounds_(a, b, c, d, tmp)  # columns (0,4,8,12), (1,5,9,13), ...
        # diagonals (0,5,10,15), (1,6,11,12), ...: row i of b, c, d moved up by 1, 2, 3
        b, c, d = b.roll(-1, 0), c.roll(-2, 0), d.roll(-3, 0)
        _quarter_rounds_(a, b, c, d, tmp)
        b, c, d = b.roll(1, 0), c.roll(2, 0), d.roll(3, 0)
    return torch.cat([a, b, c, d]).add_(state)


class ChaCha20:
    """The ChaCha20 keystream of a 256-bit key, as int32 words on any torch device.

    Construct with :meth:`dptrain.secret.RunKey.chacha` (a sub-key of the run key); the key
    is never printed (``repr`` shows no key material).
    """

    def __init__(self, key: bytes) -> None:
        if len(key) != 32:
            raise ValueError("a ChaCha20 key has 32 bytes")
        self._words = tuple(
            _i32(int.from_bytes(key[4 * i : 4 * i + 4], "little")) for i in range(8)
        )

    def __repr__(self) -> str:
        return "ChaCha20(<key hidden>)"

    def states(self, nonce: int, start: int, count: int, device: torch.device | str) -> Tensor:
        """``(16, count)`` int32 input states of blocks ``start .. start + count - 1`` of
        ``nonce`` (the 64-bit counter in words 12-13: the carry out of word 12 is exact)."""
        if not 0 <= nonce < 2**64:
            raise ValueError(f"nonce {nonce} is outside [0, 2^64)")
        if not (0 <= start and count >= 0 and start + count <= 2**64):
            raise ValueError("a ChaCha20 block run must stay within the 2^64 counter range")
        state = torch.empty(16, count, dtype=torch.int32, device=device)
        for i, w in enumerate((*(_i32(s) for s in SIGMA), *self._words)):
            state[i] = w
        state[14], state[15] = _i32(nonce), _i32(nonce >> 32)
        # the counter: low word start_lo + j (< 2^33 in int64), its carry into the high word
        low = torch.arange(count, dtype=torch.int64, device=device).add_(start & 0xFFFFFFFF)
        carry = low >> 32
        low.bitwise_and_(0xFFFFFFFF)
        low.sub_((low >= 1 << 31).to(torch.int64) << 32)  # to the int32 with the same bits
        state[12] = low
        high = carry.add_(start >> 32)  # <= 2^32 - 1: the run stays below 2^64
        state[13] = high.sub_((high >= 1 << 31).to(torch.int64) << 32)
        return state

    def keystream(self, nonce: int, start: int, count: int, device: torch.device | str) -> Tensor:
        """``(16, count)`` int32 words: column ``j`` is block ``start + j`` of ``nonce``
        (row ``i`` its little-endian word ``i``)."""
        return block_function(self.states(nonce, start, count, device))
