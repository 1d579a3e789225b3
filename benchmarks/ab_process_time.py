"""A/B of the private step between two checkouts, in process CPU time on one thread.

``python benchmarks/ab_process_time.py OTHER_CHECKOUT [--rounds 4] [--steps 4]`` runs, per
round, one subprocess per checkout (alternating which goes first), each timing ``--steps``
engine steps and as many plain non-private steps, interleaved, on ``step_time.py``'s ``full``
setup (4-layer GPT-2, width 256, vocab 8000, B 16, T 128) with ``time.process_time`` and one
torch thread: on a machine shared with other jobs, CPU time moves far less than wall time.
The engine gets ``max_length`` = the setup's length where its checkout takes one (as ``dptrain
train`` passes ``data.max_length``).  Prints per-round medians and ratios.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def worker(root: str, steps: int) -> None:
    sys.path[:0] = [root, str(Path(root) / "benchmarks")]
    import torch

    torch.set_num_threads(1)
    import step_time as st

    import dptrain

    if not dptrain.__file__.startswith(root):
        raise SystemExit(f"imported {dptrain.__file__}, not {root}'s dptrain")
    setup, dev = st.SETUPS["full"], torch.device("cpu")
    private, _ = st.build_model(setup, dev, 0)
    plain_model, _ = st.build_model(setup, dev, 0)
    batch = st.make_batch(private.config.vocab_size, setup["batch"], setup["seq"], dev, 1)
    kw = {}
    if "max_length" in inspect.signature(dptrain.PrivacyEngine).parameters:
        kw["max_length"] = setup["seq"]
    engine = dptrain.PrivacyEngine(
        private,
        torch.optim.AdamW(st._trainable(private), lr=1e-4),
        policy=dptrain.StaticPolicy(clip=1.0, noise_multiplier=1.0),
        sample_rate=setup["batch"] / 1000,
        dataset_size=1000,
        loss_fn=st.per_sample_loss,
        noise=dptrain.GaussianNoise(),
        **kw,
    )
    plain = st.nonprivate(plain_model, batch)
    contenders = {"engine": lambda: engine.step(batch), "nonprivate": plain}
    times: dict[str, list[float]] = {k: [] for k in contenders}
    for f in contenders.values():
        f()  # warm-up
    for _ in range(steps):
        for name, f in contenders.items():
            t = time.process_time()
            f()
            times[name].append(time.process_time() - t)
    medians = {k: statistics.median(v) for k, v in times.items()}
    print(json.dumps({**medians, "max_length": bool(kw)}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("other", help="the checkout to compare this one with")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args.worker, args.steps)
        return
    roots = {"this": str(HERE.parent), "other": str(Path(args.other).resolve())}
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    res: dict[str, list[dict]] = {k: [] for k in roots}
    for r in range(args.rounds):
        for k in list(roots) if r % 2 == 0 else list(roots)[::-1]:
            cmd = [sys.executable, __file__, "-", "--worker", roots[k], "--steps", str(args.steps)]
            p = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
            lines = [line for line in p.stdout.splitlines() if line.startswith("{")]
            if p.returncode or not lines:
                raise SystemExit(p.stderr[-3000:])
            res[k].append(json.loads(lines[-1]))
            print(f"round {r} {k}: {res[k][-1]}", flush=True)
    for k, v in res.items():
        e = statistics.median(x["engine"] for x in v)
        n = statistics.median(x["nonprivate"] for x in v)
        ratio = statistics.median(x["engine"] / x["nonprivate"] for x in v)
        print(
            f"{k} ({roots[k]}): engine {e * 1e3:.0f} ms, non-private {n * 1e3:.0f} ms, "
            f"engine / non-private {ratio:.3f}"
        )
    per_round = [a["engine"] / b["engine"] for a, b in zip(res["this"], res["other"], strict=True)]
    print("this / other engine, per round:", [round(x, 3) for x in per_round])


if __name__ == "__main__":
    main()
