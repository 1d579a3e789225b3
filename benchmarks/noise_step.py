"""The noise of one private step: per-parameter draws against one joint draw.

    python benchmarks/noise_step.py [--rounds 6] [--model tiny-gpt2:n_layer=4,n_embd=256,...]

On the trainable tensors of a model (default: the ``full`` setup of ``step_time.py``, 52
tensors, 5.34 M normals), interleaved rounds of (a) ``noise(like, std)`` per tensor, as a
policy without :meth:`dptrain.GaussianNoise.many` draws, and (b) ``noise.many(likes, stds)``,
which the static policy uses; both at the same step of the same key, so the values are checked
equal every round.  Prints the median times and their ratio.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dptrain.models import load_model_and_tokenizer
from dptrain.noise import GaussianNoise
from dptrain.secret import RunKey


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--model", default="tiny-gpt2:n_layer=4,n_embd=256,n_head=4,vocab=8000")
    args = ap.parse_args(argv)
    model, _ = load_model_and_tokenizer(args.model)
    likes = [torch.zeros_like(p) for p in model.parameters() if p.requires_grad]
    stds = [1.0] * len(likes)
    n = sum(t.numel() for t in likes)
    print(f"{len(likes)} tensors, {n} normals, {torch.get_num_threads()} threads")
    a, b = GaussianNoise(RunKey.from_insecure_seed(1)), GaussianNoise(RunKey.from_insecure_seed(1))
    times: dict[str, list[float]] = {"per-parameter": [], "many": []}
    for r in range(args.rounds):
        order = ["per-parameter", "many"] if r % 2 == 0 else ["many", "per-parameter"]
        for name in order:
            t0 = time.perf_counter()
            if name == "many":
                b.begin_step(r)
                zb = b.many(likes, stds)
            else:
                a.begin_step(r)
                za = [a(like, s) for like, s in zip(likes, stds, strict=True)]
            times[name].append(time.perf_counter() - t0)
        if not all(torch.equal(x, y) for x, y in zip(za, zb, strict=True)):
            raise AssertionError("many() drew other values than the per-parameter calls")
    med = {k: statistics.median(v) for k, v in times.items()}
    print(
        f"load {os.getloadavg()[0]:.1f}: per-parameter {1e3 * med['per-parameter']:.0f} ms, "
        f"many {1e3 * med['many']:.0f} ms, ratio {med['many'] / med['per-parameter']:.2f} "
        "(same values)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
