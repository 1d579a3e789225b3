"""Cost of the keyed randomness: the Poisson sampler at N = 10^6 records and the full-tailed
noise sampler, against float32 ``torch.randn`` for scale.

    python benchmarks/randomness.py [--records 1000000] [--steps 50] [--normals 50000000]

Writes ``benchmarks/results/randomness.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch

from dptrain.noise import GaussianNoise
from dptrain.sampling import PoissonSampler
from dptrain.secret import RunKey


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--records", type=int, default=1_000_000)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--normals", type=int, default=50_000_000)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--out", default="benchmarks/results/randomness.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)  # the noise sampler draws on as many threads
    key = RunKey.generate()
    ids = [f"record-{i}" for i in range(args.records)]
    out: dict = {
        "machine": platform.processor() or platform.machine(),
        "threads": args.threads,
        "load_average_1min": os.getloadavg()[0],
        "records": args.records,
    }

    t0 = time.perf_counter()
    sampler = PoissonSampler(ids, 1e-3, key)
    out["sampler_setup_s"] = time.perf_counter() - t0  # SHA-256 of every id, collision check
    for q in (1e-3, 1e-2):
        sampler.sample_rate = q
        sizes, t0 = [], time.perf_counter()
        for t in range(args.steps):
            sizes.append(len(sampler.sample(t)))
        per_step = (time.perf_counter() - t0) / args.steps
        out[f"sampler_step_s_q{q:g}"] = per_step
        out[f"mean_batch_q{q:g}"] = float(np.mean(sizes))
        print(f"sampler N={args.records:,} q={q:g}: {per_step * 1e3:.1f} ms per step "
              f"(mean batch {np.mean(sizes):.0f})")  # fmt: skip
    print(f"sampler setup (ids -> 64-bit keys): {out['sampler_setup_s']:.2f} s")

    noise = GaussianNoise(key)
    noise.begin_step(0)
    like = torch.zeros(args.normals)
    secs = best_of(lambda: noise(like, 1.0), 3)
    randn = best_of(lambda: torch.randn(args.normals), 3)
    out["noise_normals_per_s"] = args.normals / secs
    out["torch_randn_float32_normals_per_s"] = args.normals / randn
    print(f"full-tailed noise: {args.normals / secs / 1e6:.1f} M normals/s "
          f"(torch.randn float32: {args.normals / randn / 1e6:.1f} M/s; {args.threads} threads)")  # fmt: skip
    for name, params in (("LoRA r=8 q,v of SmolLM2-135M", 460_800), ("SmolLM2-135M", 134_515_008)):
        out[f"noise_s_per_step {name}"] = params / out["noise_normals_per_s"]
        print(f"  noise per step, {name} ({params:,} parameters): "
              f"{params / out['noise_normals_per_s']:.3f} s")  # fmt: skip
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
