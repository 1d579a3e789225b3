"""Audit benchmarks (results: benchmarks/README.md, section "Audits").

    python benchmarks/audit.py gaussian [--trials 2000]      # one-run bound vs exact epsilon
    python benchmarks/audit.py quickstart [--run runs/quickstart-audit]
    python benchmarks/audit.py planted [--seeds 5] [--canaries 8000]   # white-box audit self-test

``gaussian``: the one-run lower bound (Steinke, Nasr, Jagielski 2023) on a simulated Gaussian
mechanism of known epsilon.  Each of ``m`` canaries is included with probability 1/2 and the
auditor sees ``y_i = mu * [included] + N(0, 1)`` (mu-GDP per canary, exact epsilon from the
GDP curve); the bound is the one ``dptrain audit`` computes (best of the fixed guess plans,
Bonferroni-corrected, 95% confidence).  Reports how often the bound exceeds the truth (must be
at most 5%) and the factor between the truth and the median bound.

``planted``: the white-box audit (:mod:`attacks.whitebox`) of correct runs and of runs broken
behind the ledger's back (:mod:`attacks.planted`: noise at 1/2 and 1/4, one group unclipped,
shuffled fixed-size batches), at claimed epsilon 2, 4, 8 (RDP, delta 1e-5), in two setups:
``full`` (q = 1, 2 steps) and ``subsampled`` (q = 0.5, 4 steps).  Records how often each is
flagged, the bounds, their ceilings and what a perfect attacker on the exact claimed mechanism
certifies with the same canaries.

``quickstart``: trains ``recipes/quickstart.yaml`` with the default canaries (unless the run
exists) and times ``dptrain audit`` on it.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from attacks.bounds import gaussian_epsilon, one_run_audit  # noqa: E402


def gaussian(trials: int, delta: float = 1e-5, confidence: float = 0.95) -> list[dict]:
    rng = np.random.default_rng(0)
    rows = []
    for m in (100, 1000, 10000):
        for mu in (0.5, 1.0, 2.0, 4.0):
            n = trials if m < 10000 else max(trials // 10, 100)
            true = gaussian_epsilon(mu, delta)
            bounds = []
            for start in range(0, n, 200):  # chunks bound the memory of (trials, m) arrays
                k = min(200, n - start)
                included = rng.random((k, m)) < 0.5
                y = mu * included + rng.standard_normal((k, m))
                bounds.append(one_run_audit(y, included, delta, confidence)["epsilon"])
            eps = np.concatenate(bounds)
            med = float(np.median(eps))
            row = {
                "canaries": m,
                "mu": mu,
                "true_epsilon": true,
                "trials": n,
                "exceeds_true": float(np.mean(eps > true)),
                "median_bound": med,
                "max_bound": float(eps.max()),
                "factor": true / med if med > 0 else float("inf"),
            }
            rows.append(row)
            print(
                f"m={m:5d} mu={mu:3.1f} true eps {true:6.2f}  median bound {med:5.2f}  "
                f"max {row['max_bound']:5.2f}  factor {row['factor']:5.2f}  "
                f"exceeds {row['exceeds_true']:.3f}",
                flush=True,
            )
    return rows


def quickstart(run: Path) -> dict:
    py = sys.executable
    env = {"PYTHONPATH": str(ROOT)}
    import os

    env = {**os.environ, **env}
    if not (run / "final").exists():
        cmd = [py, "-m", "dptrain.cli", "train", str(ROOT / "recipes" / "quickstart.yaml")]
        cmd += ["--output", str(run), "--set", "data.canaries={}", "--no-progress"]
        subprocess.run(cmd, check=True, env=env)
    t0 = time.perf_counter()
    cmd = [py, "-m", "dptrain.cli", "audit", str(run), "--no-progress"]
    subprocess.run(cmd, check=True, env=env)
    wall = time.perf_counter() - t0
    summary = json.loads((run / "audit" / "summary.json").read_text())
    return {"wall_seconds": wall, "seconds": summary["seconds"], "summary": summary}


SETUPS = {"full": (1.0, 2), "subsampled": (0.5, 4)}


def planted(seeds: int, canaries: int, epsilons=(2.0, 4.0, 8.0)) -> dict:
    import torch

    from attacks.planted import BUGS, perfect_reference, run_one

    torch.set_num_threads(1)
    runs, cells = [], []
    t0 = time.perf_counter()
    for setup, (q, steps) in SETUPS.items():
        for eps in epsilons:
            ref = perfect_reference(epsilon=eps, q=q, steps=steps, canaries=canaries)
            for bug in BUGS:
                if bug == "shuffle" and q == 1:
                    continue  # one batch per epoch: shuffling is the full batch, no bug
                rows = []
                for seed in range(seeds):
                    r = run_one(bug, epsilon=eps, q=q, steps=steps, canaries=canaries, seed=seed)
                    rows.append(r)
                    runs.append({"setup": setup} | {k: v for k, v in r.items() if k != "clip"})
                b = [r["bounds"] for r in rows]
                cell = {
                    "setup": setup,
                    "sample_rate": q,
                    "steps": steps,
                    "epsilon": eps,
                    "bug": bug,
                    "claimed_epsilon": rows[0]["claimed_epsilon"],
                    "noise_multiplier": rows[0]["noise_multiplier"],
                    "flagged": sum(r["privacy_bug_suspected"] for r in rows),
                    "seeds": seeds,
                    **{
                        f"{k}_mean": float(np.mean([x[k]["epsilon"] for x in b]))
                        for k in ("ledger", "fdp", "one_run")
                    },
                    "ledger_min": float(min(x["ledger"]["epsilon"] for x in b)),
                    "ceiling": rows[0]["ceiling"],
                    "perfect": ref,
                }
                if bug == "none":
                    cell["ratio_to_perfect"] = {
                        k: cell[f"{k}_mean"] / ref[k] if ref[k] > 0 else None
                        for k in ("ledger", "fdp", "one_run")
                    }
                cells.append(cell)
                print(
                    f"{setup:10s} eps {eps:g} {bug:9s} flagged {cell['flagged']}/{seeds}  "
                    f"ledger {cell['ledger_mean']:5.2f} fdp {cell['fdp_mean']:5.2f} "
                    f"steinke {cell['one_run_mean']:5.2f}  perfect ledger {ref['ledger']:5.2f} "
                    f"fdp {ref['fdp']:5.2f}  ceiling fdp {cell['ceiling']['fdp']:5.2f} "
                    f"({time.perf_counter() - t0:.0f} s)",
                    flush=True,
                )
    return {"canaries": canaries, "seeds": seeds, "seconds": time.perf_counter() - t0,
            "cells": cells, "runs": runs}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="what", required=True)
    g = sub.add_parser("gaussian")
    g.add_argument("--trials", type=int, default=2000)
    q = sub.add_parser("quickstart")
    q.add_argument("--run", type=Path, default=ROOT / "runs" / "quickstart-audit")
    p = sub.add_parser("planted")
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--canaries", type=int, default=8000)
    args = ap.parse_args()
    out = ROOT / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    if args.what == "planted":
        result = planted(args.seeds, args.canaries)
        (out / "audit_planted.json").write_text(json.dumps(result, indent=2, default=float))
        print(f"total {result['seconds']:.0f} s")
    elif args.what == "gaussian":
        result = gaussian(args.trials)
        (out / "audit_gaussian.json").write_text(json.dumps(result, indent=2))
    else:
        result = quickstart(args.run)
        print(f"audit wall time {result['wall_seconds']:.0f} s: {result['seconds']}")
        slim = {k: v for k, v in result.items() if k != "summary"}
        (out / "audit_quickstart.json").write_text(json.dumps(slim, indent=2))


if __name__ == "__main__":
    main()
