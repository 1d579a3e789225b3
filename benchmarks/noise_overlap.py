"""Would drawing a step's normals during its forward/backward pay?  Measured, not built.

    python benchmarks/noise_overlap.py [--rounds 6] [--batch 16] [--seq 128]

The standard normals of step ``t`` depend on the key and ``t`` only, so a sampler could draw
them on a background thread while the step's forward and backward run, and only scale them at
the release.  This times, on the ``full`` setup (4-layer GPT-2, 5.34 M trainable parameters),
interleaved rounds of (a) forward + backward, then the step's noise (``GaussianNoise.many``),
one after the other, and (b) the noise drawn on a background thread started with the forward
and joined after the backward.  (b) / (a) below 1 is what overlapping would save.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from step_time import SETUPS, build_model, make_batch, per_sample_loss  # noqa: E402

from dptrain.noise import GaussianNoise  # noqa: E402
from dptrain.secret import RunKey  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=128)
    args = ap.parse_args(argv)
    setup = SETUPS["full"]
    model, _ = build_model(setup, torch.device("cpu"), seed=0)
    batch = make_batch(model.config.vocab_size, args.batch, args.seq, torch.device("cpu"), 0)
    likes = [torch.zeros_like(p) for p in model.parameters() if p.requires_grad]
    stds = [1.0] * len(likes)
    noise = GaussianNoise(RunKey.from_insecure_seed(1))

    def backward() -> None:
        model.zero_grad(set_to_none=True)
        per_sample_loss(model, batch).mean().backward()

    def draw(step: int) -> None:
        noise.begin_step(step)
        noise.many(likes, stds)

    backward(), draw(0)  # warm-up
    t: dict[str, list[float]] = {"sequential": [], "overlapped": [], "backward": [], "noise": []}
    load = [os.getloadavg()[0]]
    for r in range(args.rounds):
        for name in ("sequential", "overlapped") if r % 2 == 0 else ("overlapped", "sequential"):
            t0 = time.perf_counter()
            if name == "sequential":
                backward()
                t1 = time.perf_counter()
                draw(r)
                t["backward"].append(t1 - t0)
                t["noise"].append(time.perf_counter() - t1)
            else:
                worker = threading.Thread(target=draw, args=(r,))
                worker.start()
                backward()
                worker.join()
            t[name].append(time.perf_counter() - t0)
    load.append(os.getloadavg()[0])
    med = {k: statistics.median(v) for k, v in t.items()}
    ratios = [o / s for o, s in zip(t["overlapped"], t["sequential"], strict=True)]
    print(
        f"load {load[0]:.2f} -> {load[1]:.2f}, {torch.get_num_threads()} threads: "
        f"forward+backward {1e3 * med['backward']:.0f} ms, noise {1e3 * med['noise']:.0f} ms, "
        f"sequential {1e3 * med['sequential']:.0f} ms, overlapped {1e3 * med['overlapped']:.0f} "
        f"ms; per-round overlapped / sequential: median {statistics.median(ratios):.3f} "
        f"(min {min(ratios):.3f}, max {max(ratios):.3f})"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
