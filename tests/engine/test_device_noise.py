"""ChaCha20 in torch against the ``cryptography`` package, and the device noise generator on
the CPU: its contract, tails, chunking, backend dispatch and resume."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from scipy import stats

from dptrain.chacha import ChaCha20
from dptrain.device_noise import (
    AES,
    CHACHA,
    NoiseBackendError,
    leading_zeros_128,
    normals_from_keystream,
    piece_spans,
)
from dptrain.noise import RADIUS_MAX, GaussianNoise, normals_from_words
from dptrain.secret import RunKey

KEY = RunKey.from_insecure_seed(0)
CIPHER = KEY.chacha("noise/chacha")


def _binomial_ok(count: int, n: int, p: float, sds: float = 5.0) -> bool:
    return abs(count - n * p) <= sds * math.sqrt(n * p * (1 - p))


def _i32(x: int) -> int:
    return x - (1 << 32) if x >= 1 << 31 else x


def _reference(nonce: int, start: int, count: int) -> bytes:
    """Blocks ``start .. start + count - 1`` from OpenSSL's ChaCha20, its 16-byte IV being
    state words 12..15 (counter low, counter high, nonce low, nonce high), one block per IV:
    OpenSSL refuses to run its 32-bit counter word past 2^32, so the carry into word 13 is
    checked against blocks whose IV sets word 13 directly."""
    key = KEY.derive("noise/chacha")
    out = b""
    for b in range(start, start + count):
        iv = b.to_bytes(8, "little") + nonce.to_bytes(8, "little")
        out += Cipher(algorithms.ChaCha20(key, iv), mode=None).encryptor().update(bytes(64))
    return out


# -- the cipher ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("nonce", "start", "count"),
    [
        (0, 0, 3),
        (7, 2**32 - 3, 6),  # the counter's low word wraps: the carry goes into word 13
        (2**64 - 1, 2**40 + 5, 4),
        (123456789, 2**64 - 4, 4),  # the last blocks of the counter range
        (5, 1000, 257),
    ],
)
def test_chacha_keystream_is_openssl_chacha20_bit_for_bit(nonce, start, count):
    words = CIPHER.keystream(nonce, start, count, "cpu")
    assert words.shape == (16, count) and words.dtype == torch.int32
    ours = words.T.contiguous().numpy().astype("<i4").tobytes()
    assert ours == _reference(nonce, start, count)


def test_chacha_refuses_counters_outside_the_range_and_hides_its_key():
    with pytest.raises(ValueError, match="2\\^64 counter range"):
        CIPHER.keystream(0, 2**64 - 2, 3, "cpu")
    with pytest.raises(ValueError, match="nonce"):
        CIPHER.keystream(2**64, 0, 1, "cpu")
    assert (
        isinstance(CIPHER, ChaCha20)
        and "hidden" in repr(CIPHER)
        and KEY.derive("noise/chacha").hex() not in repr(CIPHER)
    )
    assert KEY.derive("noise/chacha") != KEY.derive("noise")  # its own PRF domain


# -- the sampler's integer parts and its contract ----------------------------------------------


def _split(x: int) -> list[int]:
    return [_i32((x >> s) & 0xFFFFFFFF) for s in (96, 64, 32, 0)]


def test_leading_zeros_of_128_bits_are_exact():
    rng = random.Random(1)
    values = [0, 1, 2, 3, 2**63, 2**64 - 1, 2**64, 2**127, 2**128 - 1]
    values += [2**k for k in range(128)] + [2**k - 1 for k in range(1, 129)]
    values += [2**k + 1 for k in range(1, 128)] + [rng.getrandbits(64) for _ in range(300)]
    values += [rng.getrandbits(128) >> rng.randrange(128) for _ in range(3000)]
    words = torch.tensor([_split(v) for v in values], dtype=torch.int32)
    got = leading_zeros_128(*words.T)
    assert got.tolist() == [128 - v.bit_length() for v in values]


def _as_u64(words: torch.Tensor) -> np.ndarray:
    """``(2 count, 4)`` uint64 words (w0..w3 of each pair, block-major) of ``(16, count)``."""
    u = words.T.contiguous().numpy().astype("<i4").view("<u4").astype(np.uint64)
    return (u[:, 0::2] | (u[:, 1::2] << np.uint64(32))).reshape(-1, 4)


def test_device_normals_are_the_noise_contract_on_the_same_bits():
    """On the same 256 bits per pair, the torch Box-Muller gives noise.py's values (its integer
    parts exactly; libm's last ulp aside), including the radius bound at U = 2^-129."""
    words = CIPHER.keystream(11, 0, 4096, "cpu")
    words[4:8, :64] = 0  # half 0's w2, w3 all zero in 64 blocks: e = 128, the largest radius
    words[5, 64:128] = 0  # w2's high half zero: e >= 32
    ours = normals_from_keystream(words).reshape(-1).numpy()
    theirs = normals_from_words(_as_u64(words))
    np.testing.assert_allclose(ours, theirs, rtol=1e-14, atol=1e-14)
    radius = np.hypot(ours[0::4][:64], ours[1::4][:64])
    assert radius.max() <= RADIUS_MAX and radius.min() > 13.3


def test_device_sampler_moments_ks_and_four_sigma_tail():
    noise = GaussianNoise(KEY, backend=CHACHA)
    noise.begin_step(3)
    z = noise(torch.empty(1_000_000, dtype=torch.float64), 1.0).numpy()
    n = z.size
    assert abs(z.mean()) < 5 / math.sqrt(n)
    assert z.var() == pytest.approx(1.0, abs=5 * math.sqrt(2 / n))
    assert (z**4).mean() == pytest.approx(3.0, abs=5 * math.sqrt(96 / n))
    assert stats.kstest(z[:200_000], "norm").pvalue > 1e-4
    assert _binomial_ok(int((np.abs(z) > 4).sum()), n, math.erfc(4 / math.sqrt(2)))
    assert np.abs(z).max() <= RADIUS_MAX


def test_device_sampler_tail_beyond_five_sigma_has_the_gaussian_rate():
    """P(|z| > 5) = 5.7e-7, checked on 2^20 pairs by conditioning on the radius exponent (as in
    test_randomness): zeroing the top 18 of the 128 exponent bits draws exactly from the law given
    U < 2^-18, an event holding every |z| > 5 (25 > 36 ln 2), so P(|z1| > 5 | .) = 2 Phi(-5) 2^18;
    given U < 2^-64 (w2 = 0), R^2 - 128 ln 2 is exponential with mean 2."""
    step = 1 << 13  # in CPU-sized pieces (see dptrain.device_noise.CPU_CHUNK)
    words = torch.cat([CIPHER.keystream(99, b, step, "cpu") for b in range(0, 1 << 19, step)], 1)
    for half in (0, 1):  # hi2 of each half: the top 32 of its 128 exponent bits
        words[8 * half + 5] = (words[8 * half + 5] >> 18) & ((1 << 14) - 1)
    z = normals_from_keystream(words).reshape(-1, 2)[:, 0].numpy()  # one per pair
    p = math.erfc(5 / math.sqrt(2)) * 2**18
    assert _binomial_ok(int((np.abs(z) > 5).sum()), z.size, p)
    for half in (0, 1):
        words[8 * half + 4 : 8 * half + 6] = 0
    r2 = (normals_from_keystream(words) ** 2).sum(-1).reshape(-1).numpy()
    excess = r2 - 128 * math.log(2)
    assert excess.min() > -1e-9
    for x in (1.0, 4.0, 12.0):
        assert _binomial_ok(int((excess > x).sum()), excess.size, math.exp(-x / 2))


# -- draws: chunking, slots, dispatch, resume -------------------------------------------------


def _draws(chunk: int | None, sizes: list[int], joint: bool) -> list[torch.Tensor]:
    noise = GaussianNoise(KEY, backend=CHACHA)
    noise.backends.normals.chunk = chunk
    noise.begin_step(7)
    likes = [torch.empty(n, dtype=torch.float64) for n in sizes]
    stds = [1.0 + i for i in range(len(sizes))]
    if joint:
        return noise.many(likes, stds)
    return [noise(like, std) for like, std in zip(likes, stds, strict=True)]


def test_device_values_do_not_depend_on_chunking_or_on_joint_draws():
    sizes = [5, 1, 8, 3, 1000, 7]  # odd sizes: later draws start mid-block
    first = _draws(None, sizes, joint=False)
    for chunk, joint in ((1, False), (3, True), (7, False), (64, True), (None, True)):
        for a, b in zip(first, _draws(chunk, sizes, joint), strict=True):
            assert torch.equal(a, b)
    # the stream itself: pair j is half j mod 2 of block j // 2, the draws its slices in order
    stream = normals_from_keystream(CIPHER.keystream(7, 0, 300, "cpu")).reshape(-1)
    at = 0
    for i, z in enumerate(first):
        assert torch.equal(z, stream[2 * at : 2 * at + z.numel()] * (1.0 + i))
        at += (z.numel() + 1) // 2


def test_piece_spans_cut_a_chunk_at_the_pieces_and_carry_the_first_open_one():
    out = torch.empty(0)
    pieces = [(0, 3, out, 1.0), (2, 4, out, 1.0), (4, 1, out, 1.0)]  # normals 0-2, 4-7, 8
    assert piece_spans(pieces, 2, 6) == (0, [(0, 2, 3), (1, 4, 6)])  # 3 is piece 0's padding
    assert piece_spans(pieces, 6, 10, 0) == (1, [(1, 6, 8), (2, 8, 9)])
    assert piece_spans(pieces, 9, 12, 1) == (3, [])


def test_draws_round_from_float64_to_the_dtype_and_zero_std_draws_nothing():
    a, b = GaussianNoise(KEY, backend=CHACHA), GaussianNoise(KEY, backend=CHACHA)
    like = torch.zeros(3, 5)
    half = a.many([like.to(torch.bfloat16), like, like], [2.0, 0.0, 1.0])
    full = b.many([like.double(), like], [2.0, 1.0])
    assert half[0].dtype == torch.bfloat16 and half[0].shape == like.shape
    assert torch.equal(half[0], full[0].to(torch.bfloat16)) and torch.equal(half[1], like * 0)
    assert torch.equal(half[2], full[1]) and a.pairs == b.pairs == 16
    assert a.state_dict() == b.state_dict()


def test_auto_uses_aes_off_cuda_and_a_step_keeps_its_backend():
    like = torch.empty(101)
    aes, auto, chacha = (GaussianNoise(KEY, backend=b) for b in (AES, "auto", CHACHA))
    for n in (aes, auto, chacha):
        n.begin_step(2)
    assert torch.equal(aes(like, 1.0), auto(like, 1.0))  # not CUDA: the AES stream
    assert not torch.equal(aes(like, 1.0), chacha(like, 1.0))
    assert auto.state_dict()["backends"] == [[2, 2, AES]]
    assert chacha.state_dict()["backends"] == [[2, 2, CHACHA]]
    with pytest.raises(NoiseBackendError, match="unknown noise backend"):
        GaussianNoise(KEY, backend="aes")


def test_resume_continues_and_never_draws_a_recorded_step_with_another_backend():
    like = torch.empty(33)
    run = GaussianNoise(KEY, backend=CHACHA)
    saved = None
    for t in range(6):
        run.begin_step(t)
        run(like, 1.0)
        if t == 3:
            saved = run.state_dict()
    assert saved["backends"] == [[0, 3, CHACHA]]
    assert KEY.derive("noise/chacha").hex() not in str(saved)
    after = GaussianNoise(KEY)  # auto, on the CPU: later steps with AES
    after.load_state_dict(saved)
    after.begin_step(4)
    assert torch.equal(after(like, 1.0), _aes(4))
    assert after.state_dict()["backends"] == [[0, 3, CHACHA], [4, 4, AES]]
    again = GaussianNoise(KEY)  # a step the record holds is redrawn by its backend: same values
    again.load_state_dict(saved)
    again.begin_step(2)
    redo = GaussianNoise(KEY, backend=CHACHA)
    redo.begin_step(2)
    assert torch.equal(again(like, 1.0), redo(like, 1.0))
    forced = GaussianNoise(KEY, backend=AES)
    forced.load_state_dict(saved)
    forced.begin_step(3)
    with pytest.raises(NoiseBackendError, match="backend='chacha-device' or 'auto'"):
        forced(like, 1.0)
    old = {k: v for k, v in saved.items() if k != "backends"}  # written before backends existed
    legacy = GaussianNoise(KEY, backend=CHACHA)
    legacy.load_state_dict(old)
    assert legacy.backends.drawn == [[0, 3, AES]]


def _aes(step: int) -> torch.Tensor:
    noise = GaussianNoise(KEY, backend=AES)
    noise.begin_step(step)
    return noise(torch.empty(33), 1.0)


def test_standard_follows_the_steps_backend():
    a, b = GaussianNoise(KEY, backend=CHACHA), GaussianNoise(KEY)
    b.load_state_dict({**b.state_dict(), "backends": [[0, 0, CHACHA]]})
    assert np.array_equal(a.standard(9), b.standard(9))
    assert a.state_dict() == b.state_dict()


# -- on a GPU --------------------------------------------------------------------------------


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_draws_use_the_device_generator_with_the_cpu_values():
    a, b = GaussianNoise(KEY), GaussianNoise(KEY, backend=CHACHA)
    a.begin_step(5), b.begin_step(5)
    like = torch.zeros(4_000_003, device="cuda", dtype=torch.float64)
    za, zb = a(like, 1.0), b(like.cpu(), 1.0)
    assert za.device.type == "cuda" and a.state_dict()["backends"] == [[5, 5, CHACHA]]
    torch.testing.assert_close(za.cpu(), zb, rtol=1e-14, atol=1e-14)  # libm's last ulp at most
    n = za.numel()
    assert _binomial_ok(int((za.abs() > 4).sum()), n, math.erfc(4 / math.sqrt(2)))


def test_compiled_kernels_that_differ_or_fail_leave_the_eager_values(monkeypatch):
    """The compile guard: kernels are checked against eager before use, else eager draws."""
    import dptrain.device_noise as dn

    expected = _draws(4, [9], joint=False)[0]
    for broken in (lambda fn, **kw: lambda x: fn(x).add(1), lambda fn, **kw: 1 / 0):
        monkeypatch.setattr(dn, "_COMPILED", {})
        monkeypatch.setattr(dn, "_COMPILE_ERRORS", {})
        monkeypatch.setattr(dn.torch, "compile", broken)
        noise = GaussianNoise(KEY, backend=CHACHA)
        noise.backends.normals.chunk, noise.backends.normals.compile = 4, True
        noise.begin_step(7)
        assert torch.equal(noise(torch.empty(9, dtype=torch.float64), 1.0), expected)
        assert noise.backends.normals.compile_error in (
            "compiled values differ from eager",
            "ZeroDivisionError: division by zero",
        )


def test_prepare_builds_nothing_off_cuda_and_draws_nothing():
    """``prepare`` readies the device generator only where it would draw (CUDA, or forced):
    on the CPU with ``auto`` it builds no kernels, records no step and leaves the stream."""
    from dptrain.noise import GaussianNoise
    from dptrain.secret import RunKey

    key = RunKey.generate()
    a, b = GaussianNoise(key), GaussianNoise(key)
    b.prepare("cpu")
    assert b.backends.drawn == [] and b.backends._normals is None
    like = torch.zeros(5, dtype=torch.float64)
    assert torch.equal(a(like, 1.0), b(like, 1.0))
