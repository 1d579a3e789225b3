"""Audit benchmarks (results: benchmarks/README.md, section "Audits").

    python benchmarks/audit.py gaussian [--trials 2000]      # one-run bound vs exact epsilon
    python benchmarks/audit.py quickstart [--run runs/quickstart-audit]

``gaussian``: the one-run lower bound (Steinke, Nasr, Jagielski 2023) on a simulated Gaussian
mechanism of known epsilon.  Each of ``m`` canaries is included with probability 1/2 and the
auditor sees ``y_i = mu * [included] + N(0, 1)`` (mu-GDP per canary, exact epsilon from the
GDP curve); the bound is the one ``dptrain audit`` computes (best of the fixed guess plans,
Bonferroni-corrected, 95% confidence).  Reports how often the bound exceeds the truth (must be
at most 5%) and the factor between the truth and the median bound.

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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="what", required=True)
    g = sub.add_parser("gaussian")
    g.add_argument("--trials", type=int, default=2000)
    q = sub.add_parser("quickstart")
    q.add_argument("--run", type=Path, default=ROOT / "runs" / "quickstart-audit")
    args = ap.parse_args()
    out = ROOT / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    if args.what == "gaussian":
        result = gaussian(args.trials)
        (out / "audit_gaussian.json").write_text(json.dumps(result, indent=2))
    else:
        result = quickstart(args.run)
        print(f"audit wall time {result['wall_seconds']:.0f} s: {result['seconds']}")
        slim = {k: v for k, v in result.items() if k != "summary"}
        (out / "audit_quickstart.json").write_text(json.dumps(slim, indent=2))


if __name__ == "__main__":
    main()
