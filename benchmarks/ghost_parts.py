"""The clipping's parts on one recorded chunk of the ``full`` setup, interleaved.

    python benchmarks/ghost_parts.py [--rounds 7]

Builds the 4-layer GPT-2 of ``benchmarks/step_time.py`` (batch 16, sequence 128), records one
chunk (forward and backward through the capture), and times, per round and in alternating
order: the ghost norms with their cancellation bound in one pass
(:func:`~dptrain.grad_sample.outer.norm_sq_and_bound`) against ``norm_sq`` plus a separate
``bound`` pass; the book-keeping weighted sums; the whole ``clip_and_sum``; and the LM head's
Gram ``bmm`` of (B, T, V) against its weight-gradient ``mm`` (multiply-adds per second).
Medians over rounds and the per-round ratio are printed; nothing is written.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import step_time as S  # noqa: E402

import dptrain  # noqa: E402
from dptrain import clipping as C  # noqa: E402
from dptrain.grad_sample import outer as O  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args(argv)
    setup, cpu = S.SETUPS["full"], torch.device("cpu")
    model, _ = S.build_model(setup, cpu, 0)
    vocab = model.get_input_embeddings().weight.shape[0]
    batch = S.make_batch(vocab, setup["batch"], setup["seq"], cpu, 0)
    engine = dptrain.PrivacyEngine(
        model,
        torch.optim.AdamW(model.parameters(), lr=S.LR),
        policy=dptrain.StaticPolicy(clip=S.CLIP, noise_multiplier=S.NOISE),
        sample_rate=setup["batch"] / S.DATASET,
        dataset_size=S.DATASET,
        loss_fn=S.per_sample_loss,
    )
    engine.step(batch)  # probes the model
    recorded, _ = engine.capture.run(S.per_sample_loss, batch)
    group_of, clip = engine.group_of, dict.fromkeys(engine.groups, S.CLIP)
    parts = defaultdict(list)
    for use in recorded.uses:
        for role, p in use.params.items():
            parts[p].append((C._factors(use) or {}).get(role))
    ghost = [fs for fs in parts.values() if all(f is not None for f in fs) and O.prefer_ghost(fs)]
    head = max((f for fs in ghost for f in fs), key=lambda f: f.left.numel())
    left, right = head.left, head.right
    b, t, v = left.shape
    coef = torch.rand(b, dtype=torch.float64)
    pairs = {
        "norms + bound, one pass": lambda: [O.norm_sq_and_bound(fs) for fs in ghost],
        "norm_sq, then bound": lambda: [
            (O.norm_sq(fs), sum(O.bound(f) for f in fs)) for fs in ghost
        ],
        "weighted sums": lambda: [C.sum_over(fs, coef) for fs in ghost],
        "clip_and_sum": lambda: C.clip_and_sum(recorded, group_of, clip),
        "LM head Gram bmm": lambda: torch.bmm(left, left.transpose(1, 2)),
        "LM head weight-grad mm": lambda: (
            left.reshape(-1, v).T @ right.reshape(-1, right.shape[-1])
        ),
    }
    macs = {
        "LM head Gram bmm": b * t * t * v,
        "LM head weight-grad mm": b * t * v * right.shape[-1],
    }
    seconds = defaultdict(list)
    names = list(pairs)
    load = os.getloadavg()[0]
    for r in range(args.rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            t0 = time.perf_counter()
            pairs[name]()
            seconds[name].append(time.perf_counter() - t0)
    print(f"{len(ghost)} ghosted parameters; load {load:.1f} -> {os.getloadavg()[0]:.1f}")
    for name, s in seconds.items():
        med = statistics.median(s)
        rate = f"  {macs[name] / med / 1e9:.1f} GMAC/s" if name in macs else ""
        print(f"  {name:26s} {1e3 * med:9.1f} ms{rate}")
    one, two = seconds["norms + bound, one pass"], seconds["norm_sq, then bound"]
    ratio = statistics.median(x / y for x, y in zip(one, two, strict=True))
    print(f"  one pass / two passes, median per round: {ratio:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
