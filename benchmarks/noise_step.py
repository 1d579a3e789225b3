"""The noise of one private step: per-parameter draws, one joint draw, and stream v1's sampler.

    python benchmarks/noise_step.py [--rounds 6] [--model tiny-gpt2:n_layer=4,n_embd=256,...]
    python benchmarks/noise_step.py --parts [--rounds 5]      # the parts of v1 and v2

On the trainable tensors of a model (default: the ``full`` setup of ``step_time.py``, 52
tensors, 5.34 M normals), interleaved rounds (the order rotates) of (a) ``noise(like, std)``
per tensor, as a policy without :meth:`dptrain.GaussianNoise.many` draws, (b)
``noise.many(likes, stds)``, which the static policy uses, and (c) ``v1``: ``many`` with stream
v1's arithmetic (numpy ufuncs on chunks drawn by the thread pool, as dptrain computed it
before stream v2; the same law, other last bits).  (a) and (b) run at the same step of the
same key, so their values are checked equal every round, and (c) is checked within 1e-6
relative of them.  Prints the median times and their ratios, and the load average.

``--parts`` times the stages of one step's draw (the same 2.67 M pairs, one thread unless
``--threads``) for each stream: AES-CTR into a fresh buffer and into a reused one; v1's
leading zeros, log1p and sqrt, cos and sin, scaling and the copy into float32; v2's
integer stage (``U``'s bits), log and sqrt, cos / sin with the product rounded into the
float32 output.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dptrain import noise as N
from dptrain.device_noise import piece_spans
from dptrain.models import load_model_and_tokenizer
from dptrain.noise import GaussianNoise
from dptrain.secret import RunKey

# -- stream v1 (the baseline): numpy Box-Muller, as dptrain computed it before v2 ----------


def _v1_exponent(hi: np.ndarray, lo: np.ndarray) -> np.ndarray:
    lead = (53 - np.frexp((hi >> np.uint64(11)).astype(np.float64))[1]).astype(np.float64)
    for i in np.flatnonzero(hi < np.uint64(1 << 11)):
        h = int(hi[i])
        lead[i] = 64 - h.bit_length() if h else 128 - int(lo[i]).bit_length()
    return lead


def _v1_radius(w: np.ndarray) -> np.ndarray:
    radius = _v1_exponent(w[:, 2], w[:, 3])
    frac = (w[:, 1] >> np.uint64(12)).astype(np.float64)
    frac += 1.0
    frac *= 2.0**-52
    np.log1p(frac, out=frac)
    radius += 1
    radius *= math.log(2.0)
    radius -= frac
    radius *= 2.0
    return np.sqrt(radius, out=radius)


def _v1_normals(words: np.ndarray) -> np.ndarray:
    w = words.reshape(-1, 4)
    radius = _v1_radius(w)
    theta = (w[:, 0] >> np.uint64(11)).astype(np.float64)
    theta *= 2.0**-53
    theta *= 2.0 * math.pi
    frac = np.empty_like(theta)
    out = np.empty((w.shape[0], 2), dtype=np.float64)
    np.cos(theta, out=frac)
    np.multiply(radius, frac, out=out[:, 0])
    np.sin(theta, out=frac)
    np.multiply(radius, frac, out=out[:, 1])
    return out.reshape(-1)


class V1Noise(GaussianNoise):
    """:class:`GaussianNoise` with stream v1's ``_fill`` (chunks of up to 2^20 pairs split
    over the threads, numpy on the pool, ``z * std`` copied into the output)."""

    def _fill(self, pairs, pieces):  # type: ignore[override]
        threads = torch.get_num_threads()
        size = max(1 << 14, min(1 << 20, -(-pairs // (2 * threads))))
        jobs = [(d, min(size, pairs - d)) for d in range(0, pairs, size)]
        first, step = self.block, self.step
        self.block += 2 * pairs
        self.pairs += pairs

        def draw(job):
            d, m = job
            return d, _v1_normals(self._prf.run(step, first + 2 * d, 2 * m))

        chunks = (
            self._executor(threads).map(draw, jobs)
            if min(len(jobs), threads) > 1
            else map(draw, jobs)
        )
        k = 0
        for d, z in chunks:
            lo, hi = 2 * d, 2 * d + z.size
            k, spans = piece_spans(pieces, lo, hi, k)
            for j, a, b in spans:
                start, _, out, std = pieces[j]
                part = np.multiply(z[a - lo : b - lo], std)
                out[a - 2 * start : b - 2 * start] = torch.from_numpy(part)


# -- the benchmark --------------------------------------------------------------------------


def parts(pairs: int, rounds: int) -> None:
    """Median time of each stage over ``rounds`` interleaved rounds, on chunks of 2^17 pairs."""
    prf = RunKey.from_insecure_seed(1).prf("noise")
    chunk = N._CHUNK
    jobs = [(d, min(chunk, pairs - d)) for d in range(0, pairs, chunk)]
    scratch = N._Scratch(chunk)
    out32 = torch.empty(2 * pairs, dtype=torch.float32)
    t: dict[str, list[float]] = {}

    def add(name: str, secs: float) -> None:
        t.setdefault(name, []).append(secs)

    for r in range(rounds):
        totals: dict[str, float] = {}
        for stream in ("v1", "v2") if r % 2 == 0 else ("v2", "v1"):
            for d, m in jobs:
                parts_v: list[tuple[str, float]] = []
                if stream == "v1":
                    t0 = time.perf_counter()
                    w = prf.run(r, 2 * d, 2 * m).reshape(m, 4)
                    t1 = time.perf_counter()
                    e = _v1_exponent(w[:, 2], w[:, 3])
                    t2 = time.perf_counter()
                    radius = _v1_radius(w)  # includes the exponent again: subtract below
                    t3 = time.perf_counter()
                    theta = (w[:, 0] >> np.uint64(11)).astype(np.float64)
                    theta *= 2.0**-53
                    theta *= 2.0 * math.pi
                    c, s = np.cos(theta), np.sin(theta)
                    t4 = time.perf_counter()
                    z = np.empty((m, 2))
                    np.multiply(radius, c, out=z[:, 0])
                    np.multiply(radius, s, out=z[:, 1])
                    z *= 1.5
                    out32[2 * d : 2 * d + 2 * m] = torch.from_numpy(z.reshape(-1))
                    t5 = time.perf_counter()
                    del e
                    parts_v = [
                        ("aes (fresh buffer)", t1 - t0),
                        ("leading zeros", t2 - t1),
                        ("log1p + sqrt (+ sum)", (t3 - t2) - (t2 - t1)),
                        ("angle + cos + sin", t4 - t3),
                        ("R cos, R sin, scale, copy to float32", t5 - t4),
                    ]
                else:
                    t0 = time.perf_counter()
                    w = prf.run(r, 2 * d, 2 * m, out=scratch.words).reshape(m, 4)
                    t1 = time.perf_counter()
                    radius, angle = scratch.radius[:m], scratch.angle[:m]
                    trig, ints = scratch.trig[:m], scratch.ints[:m]
                    wt = torch.from_numpy(w.view(np.int64))
                    torch.bitwise_right_shift(wt[:, 2], 11, out=ints)
                    ints.bitwise_and_(N._M53)
                    int(ints.min())  # the check for the rare words (v = 0)
                    radius.copy_(ints)
                    bits = radius.view(torch.int64)
                    bits.bitwise_and_(N._EXPONENT)
                    torch.bitwise_right_shift(wt[:, 1], 12, out=ints)
                    ints.bitwise_and_(N._M52)
                    ints.add_(N._U_OFFSET)
                    bits.add_(ints)
                    t2 = time.perf_counter()
                    radius.log_().mul_(-2.0).sqrt_()
                    t3 = time.perf_counter()
                    torch.bitwise_right_shift(wt[:, 0], 11, out=ints)
                    ints.bitwise_and_(N._M53)
                    angle.copy_(ints)
                    angle.mul_(N._ANGLE)
                    t4 = time.perf_counter()
                    radius.mul_(1.5)
                    o = out32[2 * d : 2 * d + 2 * m]
                    torch.cos(angle, out=trig)
                    torch.mul(radius, trig, out=o[0::2])
                    torch.sin(angle, out=trig)
                    torch.mul(radius, trig, out=o[1::2])
                    t5 = time.perf_counter()
                    parts_v = [
                        ("aes (reused buffer)", t1 - t0),
                        ("U's bits (integer stage)", t2 - t1),
                        ("log + sqrt", t3 - t2),
                        ("angle", t4 - t3),
                        ("scale, cos, sin, products into float32", t5 - t4),
                    ]
                for name, secs in parts_v:
                    totals[f"{stream}: {name}"] = totals.get(f"{stream}: {name}", 0.0) + secs
        for name, secs in totals.items():
            add(name, secs)
    print(f"{pairs} pairs, chunks of {chunk}, {torch.get_num_threads()} torch threads")
    for stream in ("v1", "v2"):
        total = 0.0
        for name, v in t.items():
            if name.startswith(stream):
                med = statistics.median(v)
                total += med
                print(f"  {name:55s} {1e3 * med:7.1f} ms")
        print(f"  {stream} total {1e3 * total:.1f} ms")
    print(f"load {os.getloadavg()[0]:.2f}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--model", default="tiny-gpt2:n_layer=4,n_embd=256,n_head=4,vocab=8000")
    ap.add_argument("--parts", action="store_true", help="time the stages of v1 and v2")
    ap.add_argument("--threads", type=int, default=None, help="torch threads")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, _ = load_model_and_tokenizer(args.model)
    likes = [torch.zeros_like(p) for p in model.parameters() if p.requires_grad]
    stds = [1.0] * len(likes)
    n = sum(t.numel() for t in likes)
    if args.parts:
        if not args.threads:
            torch.set_num_threads(1)
        parts(sum((t.numel() + 1) // 2 for t in likes), args.rounds)
        return 0
    print(f"{len(likes)} tensors, {n} normals, {torch.get_num_threads()} threads")
    key = RunKey.from_insecure_seed(1)
    samplers = {"per-parameter": GaussianNoise(key), "many": GaussianNoise(key), "v1": V1Noise(key)}
    names = list(samplers)
    times: dict[str, list[float]] = {k: [] for k in names}
    load = [os.getloadavg()[0]]
    for r in range(args.rounds):
        order = names[r % 3 :] + names[: r % 3]
        if r % 2:
            order = order[::-1]
        got = {}
        for name in order:
            s = samplers[name]
            s.begin_step(r)
            t0 = time.perf_counter()
            if name == "per-parameter":
                got[name] = [s(x, 1.0) for x in likes]
            else:
                got[name] = s.many(likes, stds)
            times[name].append(time.perf_counter() - t0)
        pairs = zip(got["per-parameter"], got["many"], strict=True)
        if not all(torch.equal(x, y) for x, y in pairs):
            raise AssertionError("many() drew other values than the per-parameter calls")
        pairs = zip(got["v1"], got["many"], strict=True)
        if not all(torch.allclose(x, y, rtol=1e-6, atol=1e-30) for x, y in pairs):
            raise AssertionError("streams v1 and v2 differ by more than rounding")
    load.append(os.getloadavg()[0])
    med = {k: statistics.median(v) for k, v in times.items()}
    print(
        f"load {load[0]:.2f} -> {load[1]:.2f}: per-parameter {1e3 * med['per-parameter']:.0f} ms, "
        f"many {1e3 * med['many']:.0f} ms, v1 many {1e3 * med['v1']:.0f} ms; "
        f"many / v1 {med['many'] / med['v1']:.2f}, "
        f"many / per-parameter {med['many'] / med['per-parameter']:.2f}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
