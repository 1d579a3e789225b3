"""The run key, the keyed PRF, full-tailed noise and Poisson coins that do not shift."""

from __future__ import annotations

import math
import os
import stat
from fractions import Fraction

import numpy as np
import pytest
import torch

import dptrain.secret as secret
from dptrain.noise import (
    ETA_PER_PAIR,
    RADIUS_MAX,
    GaussianNoise,
    normals_from_words,
    truncation_delta,
)
from dptrain.sampling import PoissonSampler
from dptrain.secret import RunKey, RunKeyError, below, record_keys, run_key, threshold

KEY = RunKey.from_insecure_seed(0)


def _binomial_ok(count: int, n: int, p: float, sds: float = 5.0) -> bool:
    return abs(count - n * p) <= sds * math.sqrt(n * p * (1 - p))


# -- the key ---------------------------------------------------------------------------------


def test_key_file_is_0600_from_creation_written_once_and_read_back(tmp_path):
    old = os.umask(0o000)  # the mode must not depend on the umask
    try:
        key = run_key(tmp_path, None, create=True)
    finally:
        os.umask(old)
    path = tmp_path / secret.KEY_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert key.secure and RunKey.read(path).key_id == key.key_id
    assert run_key(tmp_path, None, create=True).key_id == key.key_id  # read, not replaced
    with pytest.raises(RunKeyError, match="written once"):
        RunKey.generate().write(path)
    assert [p.name for p in tmp_path.iterdir()] == [secret.KEY_FILE]  # no temporary left
    raw = path.read_bytes().split(b"\n")[1].decode()
    assert raw not in repr(key) and raw not in key.describe()


def test_key_file_errors_name_the_fix(tmp_path):
    with pytest.raises(RunKeyError, match="restore the file"):
        RunKey.read(tmp_path / "secret.key")
    path = RunKey.generate().write(tmp_path / "secret.key")
    path.chmod(0o644)
    with pytest.raises(RunKeyError, match="chmod 600"):
        RunKey.read(path)
    path.chmod(0o600)
    path.write_bytes(b"not a key")
    with pytest.raises(RunKeyError, match="not a dptrain run key"):
        RunKey.read(path)


def test_a_used_key_is_marked_in_its_file_and_refuses_a_restart(tmp_path):
    old = os.umask(0o000)
    try:
        key = run_key(tmp_path, None, create=True)
    finally:
        os.umask(old)
    path = tmp_path / secret.KEY_FILE
    assert not key.used and not RunKey.read(path).used
    key.refuse_restart(path, "nothing is left")  # an unused key may start a run
    key.mark_used(path)
    again = RunKey.read(path)
    assert key.used and again.used and again.key_id == key.key_id
    assert again.derive("noise") == key.derive("noise")  # the same key, only marked
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == [secret.KEY_FILE]  # no temporary left
    with pytest.raises(RunKeyError, match=r"already drawn coins and noise.*new run in a fresh"):
        again.refuse_restart(path, "its ledger is gone")
    copy = again.write(tmp_path / "other" / secret.KEY_FILE)  # written unmarked
    assert not RunKey.read(copy).used
    with pytest.raises(RunKeyError, match="another run key"):
        RunKey.generate().mark_used(path)
    seeded = RunKey.from_insecure_seed(1)
    seeded.mark_used(tmp_path / "none")  # no file for an insecure seed: nothing to mark
    assert not seeded.used and not (tmp_path / "none").exists()


def test_fresh_keys_differ_insecure_seeds_repeat_and_say_so():
    assert RunKey.generate().key_id != RunKey.generate().key_id
    a, b = RunKey.from_insecure_seed(3), RunKey.from_insecure_seed(3)
    assert a.key_id == b.key_id != RunKey.from_insecure_seed(4).key_id
    assert not a.secure and "NO privacy" in a.describe()
    assert a.derive("coins") != a.derive("noise")  # independent sub-keys per purpose
    assert a.child("client-0").key_id != a.child("client-1").key_id != a.key_id


def test_prf_counter_run_equals_single_blocks_and_aes():
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    prf = KEY.prf("test")
    lo = np.array([5, 6, 7, 2**64 - 1], dtype=np.uint64)
    assert np.array_equal(prf.at(9, lo[:3]), prf.run(9, 5, 3))
    enc = Cipher(algorithms.AES(KEY.derive("test")), modes.ECB()).encryptor()
    block = enc.update((9).to_bytes(8, "big") + (2**64 - 1).to_bytes(8, "big"))
    assert np.array_equal(prf.at(9, lo)[3], np.frombuffer(block, "<u8"))
    with pytest.raises(ValueError, match="2\\^64"):
        prf.run(0, 2**64 - 1, 2)  # would carry into the high word


def test_thresholds_are_exact_and_never_above_p():
    assert threshold(0.5) == 2**63 and threshold(1.0) == 2**64 and threshold(0.0) == 0
    for p in (1e-9, 0.1, 1 / 3, 0.999):
        t = threshold(p)
        assert Fraction(t, 2**64) <= Fraction(p) < Fraction(t + 1, 2**64)
    words = np.array([0, 2**63 - 1, 2**63, 2**64 - 1], dtype=np.uint64)
    assert below(words, 0.5).tolist() == [True, True, False, False]
    assert below(words, 1.0).all()


def test_colliding_record_ids_are_an_error_naming_them(monkeypatch):
    monkeypatch.setattr(secret, "id64", lambda rid: 7 if rid in ("b", "d") else ord(rid))
    with pytest.raises(ValueError, match="'b' and 'd'"):
        record_keys(["a", "b", "c", "d"])


# -- noise -----------------------------------------------------------------------------------


def test_noise_is_a_function_of_key_and_step_and_resumes_exactly():
    like = torch.zeros(3001)
    a = GaussianNoise(KEY)
    draws = []
    for t in range(4):
        a.begin_step(t)
        draws.append((a(like, 1.0), a(like[:10], 2.0)))
    b = GaussianNoise(RunKey.from_insecure_seed(0))
    b.begin_step(2)
    assert torch.equal(b(like, 1.0), draws[2][0])  # step 2 alone, no replay of 0 and 1
    c = GaussianNoise(RunKey.from_insecure_seed(0))
    state = dict(a.state_dict(), step=1, block=0)
    c.load_state_dict(state)
    assert torch.equal(c(like, 1.0), draws[1][0]) and torch.equal(c(like[:10], 2.0), draws[1][1])
    assert a.pairs == 4 * (1501 + 5)
    assert not torch.equal(draws[0][0], draws[1][0])
    other = GaussianNoise(RunKey.generate())
    other.begin_step(0)
    assert not torch.equal(other(like, 1.0), draws[0][0])  # another key: other noise
    with pytest.raises(ValueError, match="another run key"):
        other.load_state_dict(a.state_dict())
    for k in (KEY.derive("noise"), bytes.fromhex(KEY._key.hex())):
        assert k.hex() not in str(a.state_dict()) and k not in repr(a.state_dict()).encode()


def test_noise_does_not_depend_on_the_thread_count_or_the_chunk_cut(monkeypatch):
    """Threads 1 and 2, chunks of 2^17 (three here), 4097 and 65537 pairs: the same bits, and
    the float64 values are the Box-Muller map of the stream's words at the step's counter."""
    import dptrain.noise as noise_module

    n = 2 * noise_module._CHUNK * 2 + 1001  # three default chunks, odd
    like = torch.zeros(n)
    stds = [1.5, 1.0]
    likes = [torch.zeros(5, 7), torch.zeros(n, dtype=torch.float64), torch.zeros(3)]
    before = torch.get_num_threads()
    draws = []
    try:
        for chunk in (noise_module._CHUNK, 4097, 65537):
            monkeypatch.setattr(noise_module, "_CHUNK", chunk)
            for threads in (1, 2):
                torch.set_num_threads(threads)
                noise = GaussianNoise(KEY)
                noise.begin_step(3)
                draws.append((noise(like, 1.5), noise.many(likes, [*stds, 0.5])))
    finally:
        torch.set_num_threads(before)
    first, rest = draws[0], draws[1:]
    for single, joint in rest:
        assert torch.equal(single, first[0])
        assert all(torch.equal(a, b) for a, b in zip(joint, first[1], strict=True))
    pairs = (n + 1) // 2
    z = normals_from_words(KEY.prf("noise").run(3, 0, 2 * pairs))[:n]  # blocks 0 .. n
    assert torch.allclose(first[0].double(), torch.from_numpy(z) * 1.5, rtol=1e-7, atol=0)
    # many(): 18 pairs for the 5 x 7 tensor, then the float64 one (std 1: R cos, R sin exactly)
    zm = normals_from_words(KEY.prf("noise").run(3, 2 * pairs, 2 * (18 + pairs)))
    assert torch.equal(first[1][1], torch.from_numpy(zm[36 : 36 + n]))
    single = GaussianNoise(KEY)
    single.begin_step(3)
    assert np.array_equal(single.standard(n), z)


def test_many_draws_the_values_of_successive_calls_on_any_thread_count():
    likes = [
        torch.zeros(3),  # odd: its last pair's second normal is dropped
        torch.zeros(256, 3),
        torch.zeros(1),
        torch.zeros(0),
        torch.zeros(7),  # std 0 below: zeros, no draw
        torch.zeros(40_001, dtype=torch.float64),
        torch.zeros(9, dtype=torch.bfloat16),
        torch.zeros(70_001, 5),  # several chunks of the joint run
    ]
    stds = [1.0, 2.5, 0.5, 1.0, 0.0, 3.0, 1.5, 1e-3]
    before = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            one, joint = GaussianNoise(KEY), GaussianNoise(RunKey.from_insecure_seed(0))
            for t in (0, 7):
                one.begin_step(t)
                joint.begin_step(t)
                ref = [one(like, std) for like, std in zip(likes, stds, strict=True)]
                got = joint.many(likes, stds)
                for r, g in zip(ref, got, strict=True):
                    assert r.dtype == g.dtype and r.shape == g.shape and torch.equal(r, g)
                assert not torch.equal(got[0], got[2].expand(3))  # distinct draws
                assert torch.equal(got[4], torch.zeros(7))
                assert joint.state_dict() == one.state_dict()  # the stream continues alike
                assert torch.equal(one(likes[1], 1.0), joint(likes[1], 1.0))
    finally:
        torch.set_num_threads(before)
    with pytest.raises(ValueError, match="one std per tensor"):
        GaussianNoise(KEY).many(likes, stds[:-1])


def test_one_noise_pool_per_process_shared_by_samplers_and_idle_without_spinning(monkeypatch):
    """Every sampler (and its copies) draws on the process's pool of torch.get_num_threads()
    workers, so samplers drawing at once (the clients of an in-process federated simulation)
    never put noise on more threads than torch has; values are those of a serial draw, and
    the idle pool does not spin."""
    import copy
    import os
    import threading
    import time

    import dptrain.noise as noise_module

    made = []
    real = noise_module.ThreadPoolExecutor

    def counting(*args, **kwargs):
        made.append(real(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(noise_module, "ThreadPoolExecutor", counting)
    monkeypatch.setattr(noise_module, "_POOLS", {})
    like = torch.zeros(2 * noise_module._CHUNK + 3)  # two chunks: drawn on the pool
    before = torch.get_num_threads()
    draws: dict[int, list[torch.Tensor]] = {}

    def client(k: int) -> None:  # its own sampler, drawing while the others do
        noise = GaussianNoise(RunKey.from_insecure_seed(k))
        noise = copy.deepcopy(noise) if k == 2 else noise  # a copy shares the pool too
        out = draws.setdefault(k, [])
        for t in range(2):
            noise.begin_step(t)
            out.append(noise(like, 1.0))

    try:
        torch.set_num_threads(2)
        threads = [threading.Thread(target=client, args=(k,)) for k in range(3)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        assert len(made) == 1 and made[0]._max_workers == 2  # one pool for all, not per sampler
        assert 0 < len(made[0]._threads) <= 2  # its worker threads, for three samplers
        stat = f"/proc/{os.getpid()}/stat"
        if os.path.exists(stat):  # idle CPU of the process while the pool waits: no spinning

            def cpu() -> float:
                f = open(stat).read().rsplit(")", 1)[1].split()
                return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")

            c0 = cpu()
            time.sleep(1.0)
            assert cpu() - c0 < 0.2
        torch.set_num_threads(1)
        for k, seq in draws.items():  # values identical to a serial draw of each sampler
            single = GaussianNoise(RunKey.from_insecure_seed(k))
            for t, d in enumerate(seq):
                single.begin_step(t)
                assert torch.equal(torch.from_numpy(single.standard(like.numel())).float(), d)
        assert len(draws) == 3 and len(made) == 1
    finally:
        torch.set_num_threads(before)


def test_noise_moments_and_moderate_tail():
    """2e7 draws: mean, variance, kurtosis and P(|z| > 4) within binomial tolerance."""
    noise = GaussianNoise(KEY)
    noise.begin_step(0)
    z = noise.standard(20_000_000)
    n = z.size
    assert abs(z.mean()) < 5 / math.sqrt(n)
    assert z.var() == pytest.approx(1.0, abs=5 * math.sqrt(2 / n))
    assert (z**4).mean() == pytest.approx(3.0, abs=5 * math.sqrt(96 / n))
    p4 = math.erfc(4 / math.sqrt(2))
    assert _binomial_ok(int((np.abs(z) > 4).sum()), n, p4)


def test_tail_beyond_six_sigma_has_the_gaussian_rate():
    """P(|z| > 6) = 2 Phi(-6) = 1.97e-9, estimated by conditioning on the radius exponent.

    The uniform ``U`` of Box-Muller has exponent ``e`` = leading zeros of words 2-3.  Shifting
    word 2 right by 25 makes the top 25 of those 128 bits zero, i.e. draws exactly from the
    sampler's conditional law given ``U < 2^-25`` (an event of probability 2^-25 that contains
    every ``|z| > 6``: ``R^2 = -2 ln U``, ``6^2 > 50 ln 2``).  So P(|z1| > 6 | U < 2^-25) must be
    2 Phi(-6) 2^25 = 0.0662.  Float32 Box-Muller (torch.randn on CPU: ``U >= 2^-24``, so
    ``|z| <= 5.77``) has no such draws at all, and a sampler with any cut below ~10 sigma
    would show a deficit here.
    """
    words = KEY.prf("noise").run(123, 0, 2 * 1_000_000).reshape(-1, 4).copy()
    words[:, 2] >>= np.uint64(25)
    z = normals_from_words(words).reshape(-1, 2)[:, 0]  # one per pair: independent
    p = math.erfc(6 / math.sqrt(2)) * 2**25
    assert _binomial_ok(int((np.abs(z) > 6).sum()), z.size, p)
    # deeper: given U < 2^-64 (word 2 = 0), R^2 - 128 ln 2 is exponential with mean 2
    words[:, 2] = 0
    r2 = (normals_from_words(words).reshape(-1, 2) ** 2).sum(1)
    excess = r2 - 128 * math.log(2)
    assert excess.min() > -1e-9
    for x in (1.0, 4.0, 12.0):
        assert _binomial_ok(int((excess > x).sum()), excess.size, math.exp(-x / 2))


def test_radius_reaches_the_bound_and_truncation_delta_is_exact():
    extreme = np.zeros((1, 4), dtype=np.uint64)  # U = 2^-129 (1 + 2^-52): the smallest
    z = normals_from_words(extreme)
    assert z[0] == pytest.approx(RADIUS_MAX, rel=1e-12) and RADIUS_MAX > 13.3
    assert ETA_PER_PAIR == 2.0**-129
    assert truncation_delta(2.0, 10**9) == pytest.approx((1 + math.e**2) * 10**9 * 2.0**-129)
    assert truncation_delta(2.0, 0) == 0.0 and truncation_delta(math.inf, 1) == math.inf
    noise = GaussianNoise(KEY)
    noise.begin_step(0)
    noise(torch.zeros(7), 1.0)
    assert noise.pairs == 4 and noise.truncation_delta(1.0) == truncation_delta(1.0, 4)


def test_box_muller_matches_the_formulas_for_every_radius_exponent():
    """Words with ``e`` = 0..128 leading zeros (both sides of the 2^11 fast-path cut) and the
    edge mantissas ``f = 0`` and ``f = 2^52 - 1`` (``U = 2^-e``), against the formulas of the
    module docstring in Python's math: the radius within a few ulp, the angle's cos and sin."""
    rows, expected = [], []
    pattern = int("5" * 32, 16)  # 0101... below the leading one
    for e in range(129):
        top = 1 << (127 - e) if e < 128 else 0
        x = top | (pattern & (top - 1)) if top else 0  # 128 bits with e leading zeros
        for f in (0, 12345, (1 << 52) - 1):
            a = (f * 7919 + e) % (1 << 53)
            rows.append([a << 11, f << 12, x >> 64, x & (2**64 - 1)])
            r = math.sqrt(2 * ((e + 1) * math.log(2) - math.log1p((f + 1) * 2.0**-52)))
            expected.append((r, 2 * math.pi * a * 2.0**-53))
    z = normals_from_words(np.array(rows, dtype=np.uint64)).reshape(-1, 2)
    for (r, theta), (z1, z2) in zip(expected, z, strict=True):
        assert math.hypot(z1, z2) == pytest.approx(r, rel=1e-15, abs=1e-15)
        assert z1 == pytest.approx(r * math.cos(theta), rel=1e-14, abs=1e-14)
        assert z2 == pytest.approx(r * math.sin(theta), rel=1e-14, abs=1e-14)


def test_radius_exponent_is_geometric():
    """The stream's pairs give back ``e = floor(R^2 / (2 ln 2))`` (``-log2 U`` in ``[e, e+1)``),
    which must be geometric: ``P(e = k) = 2^-(k+1)``, per bin and for the tail ``e >= 18``."""
    noise = GaussianNoise(KEY)
    noise.begin_step(11)
    z = noise.standard(2 * 2**21).reshape(-1, 2)
    e = np.floor((z**2).sum(1) / (2 * math.log(2))).astype(np.int64)
    n = e.size
    counts = np.bincount(e, minlength=19)
    for k in range(18):
        assert _binomial_ok(int(counts[k]), n, 2.0 ** -(k + 1)), k
    assert _binomial_ok(int(counts[18:].sum()), n, 2.0**-18)
    assert e.max() < 40  # 2^21 pairs: P(e >= 40) = 2^-19


def test_checkpoints_of_the_v1_stream_are_refused():
    noise = GaussianNoise(KEY)
    state = noise.state_dict()
    assert state["stream"] == "aes256-ctr-box-muller-v2"
    with pytest.raises(ValueError, match="another generator"):
        noise.load_state_dict(dict(state, stream="aes256-ctr-box-muller-v1"))


def test_prf_run_into_a_reused_buffer():
    prf = KEY.prf("test")
    buf = np.empty(2 * 100 + 2, dtype=np.uint64)
    got = prf.run(4, 17, 100, out=buf)
    assert np.array_equal(got, prf.run(4, 17, 100)) and np.shares_memory(got, buf)
    assert np.array_equal(prf.run(4, 17, 10, out=buf), prf.at(4, np.arange(17, 27)))
    with pytest.raises(ValueError, match="2 count \\+ 2 words"):
        prf.run(4, 17, 101, out=buf)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_noise_is_the_cpu_stream_with_the_same_tail():
    a, b = GaussianNoise(KEY, backend="aes-cpu"), GaussianNoise(KEY)  # auto on CUDA: ChaCha
    a.begin_step(5), b.begin_step(5)
    like = torch.zeros(4_000_000, device="cuda")
    za = a(like, 1.0)
    assert za.device.type == "cuda" and torch.equal(za.cpu(), b(like.cpu(), 1.0))
    n = za.numel()
    assert _binomial_ok(int((za.abs() > 4).sum()), n, math.erfc(4 / math.sqrt(2)))


# -- coins -----------------------------------------------------------------------------------


def test_neighbouring_datasets_batches_differ_by_exactly_the_added_record():
    ids = [f"rec-{i}" for i in range(3000)]
    bigger = [*ids[:1234], "added", *ids[1234:]]  # inserted in the middle of the file
    a, b = PoissonSampler(ids, 0.05, KEY), PoissonSampler(bigger, 0.05, KEY)
    seen_added = 0
    for t in range(200):
        sa = {ids[i] for i in a.sample(t).tolist()}
        sb = {bigger[i] for i in b.sample(t).tolist()}
        assert sb - sa <= {"added"} and sa == sb - {"added"}
        seen_added += "added" in sb
    assert 0 < seen_added < 30  # the added record has its own coins (~10 of 200 steps)


def test_coin_rate_is_q_and_records_and_steps_are_independent():
    ids = [f"r{i}" for i in range(20000)]
    s = PoissonSampler(ids, 0.1, KEY)
    masks = np.stack([s.mask(t) for t in range(20)])
    assert _binomial_ok(int(masks.sum()), masks.size, 0.1)
    both = masks[:, 0::2] & masks[:, 1::2]  # neighbouring records are independent
    assert _binomial_ok(int(both.sum()), both.size, 0.01)
    assert not np.array_equal(masks[0], masks[1])  # steps are independent


def test_dropout_masks_come_from_the_run_key_not_the_public_seed():
    """The model's own random draws (dropout) in a step follow from (key, step) only: the
    public seed (torch's global generator) changes nothing, and the step leaves that generator
    as it found it, so neither depends on the private batch's shape."""
    from dptrain.engine import PrivacyEngine
    from dptrain.losses import mse_loss
    from dptrain.policies import StaticPolicy

    def step(public_seed: int, key: RunKey, at: int = 0) -> tuple[list[torch.Tensor], torch.Tensor]:
        torch.manual_seed(0)
        model = torch.nn.Sequential(
            torch.nn.Linear(6, 16), torch.nn.Dropout(0.5), torch.nn.Linear(16, 2)
        )
        opt = torch.optim.SGD(model.parameters(), lr=1.0)
        engine = PrivacyEngine(
            model,
            opt,
            policy=StaticPolicy(clip=100.0, noise_multiplier=1e-6),
            sample_rate=0.5,
            dataset_size=8,
            loss_fn=mse_loss,
            noise=GaussianNoise(key),
        )
        engine.steps_taken = at
        x = torch.arange(24.0).reshape(4, 6) / 10
        y = torch.ones(4, 2)
        torch.manual_seed(public_seed)
        before = torch.get_rng_state()
        engine.step((x, y))
        after = torch.get_rng_state()
        assert torch.equal(before, after)  # the public stream did not move
        return [p.detach().clone() for p in model.parameters()], after

    a, _ = step(1, KEY)
    b, _ = step(2, KEY)
    assert all(torch.equal(u, v) for u, v in zip(a, b, strict=True))
    other, _ = step(1, RunKey.from_insecure_seed(1))  # another key: other masks
    assert not all(torch.equal(u, v) for u, v in zip(a, other, strict=True))
    later, _ = step(1, KEY, at=1)  # another step: other masks
    assert not all(torch.equal(u, v) for u, v in zip(a, later, strict=True))


def test_keyed_steps_and_seeded_builds_in_threads_do_not_move_each_others_streams():
    """Torch's generators are one per process: a keyed step in one thread (an in-process
    federated client) and a model built from the public seed in another must each see their
    own stream, whatever the thread timing (:mod:`dptrain.rng` holds one lock for both)."""
    import threading

    from dptrain import rng
    from dptrain.engine import PrivacyEngine
    from dptrain.losses import mse_loss
    from dptrain.policies import StaticPolicy

    def draws() -> torch.Tensor:
        with rng.seeded(7):
            a = torch.randn(128)
            torch.nn.functional.dropout(torch.ones(1 << 16), 0.5)  # a long draw: threads switch
            return torch.cat([a, torch.randn(128)])

    expected = draws()
    model = torch.nn.Sequential(
        torch.nn.Linear(6, 64), torch.nn.Dropout(0.5), torch.nn.Linear(64, 2)
    )
    engine = PrivacyEngine(
        model,
        torch.optim.SGD(model.parameters(), lr=0.0),
        policy=StaticPolicy(clip=1.0, noise_multiplier=1.0),
        sample_rate=0.5,
        dataset_size=64,
        loss_fn=mse_loss,
        noise=GaussianNoise(KEY),
    )
    x, y = torch.randn(32, 6), torch.ones(32, 2)
    stop, bad = threading.Event(), []

    def steps() -> None:
        while not stop.is_set():
            engine.step((x, y))

    def builds() -> None:
        try:
            bad.extend(i for i in range(200) if not torch.equal(draws(), expected))
        finally:
            stop.set()

    threads = [threading.Thread(target=steps), threading.Thread(target=builds)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not bad and engine.steps_taken > 0


def test_numpy_and_python_draws_of_a_step_come_from_the_run_key():
    """A model drawing its masks from NumPy's or Python's global generator (wav2vec2's
    SpecAugment draws from NumPy) gets them from (key, step) in a private step, whatever the
    user's own seeds, which the step leaves as it found them."""
    import random

    from dptrain.engine import PrivacyEngine
    from dptrain.losses import mse_loss
    from dptrain.policies import StaticPolicy

    class HostMasked(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.lin = torch.nn.Linear(6, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            keep = np.random.rand(*x.shape) < 0.5  # a mask laid out by the batch's shape
            scale = random.random() + 0.5
            return self.lin(x * torch.as_tensor(keep, dtype=x.dtype) * scale)

    def step(user_seed: int, key: RunKey) -> list[torch.Tensor]:
        model = HostMasked()
        engine = PrivacyEngine(
            model,
            torch.optim.SGD(model.parameters(), lr=1.0),
            policy=StaticPolicy(clip=100.0, noise_multiplier=1e-6),
            sample_rate=0.5,
            dataset_size=8,
            loss_fn=mse_loss,
            noise=GaussianNoise(key),
        )
        np.random.seed(user_seed)
        random.seed(user_seed)
        before = (np.random.get_state()[1].copy(), random.getstate())
        engine.step((torch.arange(24.0).reshape(4, 6) / 10, torch.ones(4, 2)))
        assert np.array_equal(np.random.get_state()[1], before[0])  # left as it was
        assert random.getstate() == before[1]
        return [p.detach().clone() for p in model.parameters()]

    a, b = step(1, KEY), step(2, KEY)
    assert all(torch.equal(u, v) for u, v in zip(a, b, strict=True))  # the user's seed: no say
    other = step(1, RunKey.from_insecure_seed(1))
    assert not all(torch.equal(u, v) for u, v in zip(a, other, strict=True))
