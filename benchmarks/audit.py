"""Audit benchmarks (results: benchmarks/README.md, section "Audits").

    python benchmarks/audit.py gaussian [--trials 2000]      # one-run bound vs exact epsilon
    python benchmarks/audit.py quickstart [--run runs/quickstart-audit]
    python benchmarks/audit.py planted [--seeds 5] [--setups full,subsampled,epoch] [--epsilons 2,4,8]
    python benchmarks/audit.py planted-table     # the README table from the results
    python benchmarks/audit.py noise-sim [--steps 4,16,32,64] [--canaries 8000] [--trials 40]

``gaussian``: the one-run lower bound (Steinke, Nasr, Jagielski 2023) on a simulated Gaussian
mechanism of known epsilon.  Each of ``m`` canaries is included with probability 1/2 and the
auditor sees ``y_i = mu * [included] + N(0, 1)`` (mu-GDP per canary, exact epsilon from the
GDP curve); the bound is the one ``dptrain audit`` computes (best of the fixed guess plans,
Bonferroni-corrected, 95% confidence).  Reports how often the bound exceeds the truth (must be
at most 5%) and the factor between the truth and the median bound.

``planted``: the white-box audit (:mod:`attacks.whitebox`) of correct runs and of runs broken
behind the ledger's back (:mod:`attacks.planted`: noise at 1/2 and 1/4, one group unclipped,
shuffled fixed-size batches), at claimed epsilon 2, 4, 8 (RDP, delta 1e-5), in three setups
(:data:`SETUPS`): ``full`` (q = 1, 2 steps), ``subsampled`` (q = 0.5, 64 steps) and ``epoch``
(q = 0.5, 2 steps, 16,000 canaries).  Records how often each is flagged (by the bound, by the
sampling check), the bounds, their ceilings, the sampling statistic and what a perfect
attacker on the exact claimed mechanism certifies with the same canaries; one JSON per setup
and epsilon, ``benchmarks/results/audit_planted_<setup>_eps<e>.json``.

``noise-sim``: how many steps the ``subsampled`` setup needs to catch noise at 1/2 of the
ledger's: the exact mechanism with half the claimed noise (q = 0.5, the audit's score at the
claimed mu), simulated without an engine; the share of runs whose ledger-curve test rejects
the claim, per steps and claimed epsilon.

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


SETUPS: dict[str, dict] = {
    # q = 1: the claim is a Gaussian mechanism; shuffling is then the full batch, no bug
    "full": {"q": 1.0, "steps": 2, "canaries": 8000, "width": 128,
             "bugs": ("none", "noise/2", "noise/4", "unclipped")},
    # q = 1/2 over 64 steps: enough composition for noise/2 to stand out of the ledger's curve
    "subsampled": {"q": 0.5, "steps": 64, "canaries": 8000, "width": 128,
                   "bugs": ("none", "noise/2", "noise/4", "unclipped", "shuffle")},
    # one epoch of q = 1/2: where the sampling check is strongest (its shift ~ mu^2 q^2)
    "epoch": {"q": 0.5, "steps": 2, "canaries": 16000, "width": 256,
              "bugs": ("none", "shuffle")},
    # the subsampled setup with twice the canaries: half noise at epsilon 8 (4/5 with 8000)
    "subsampled-16k": {"q": 0.5, "steps": 64, "canaries": 16000, "width": 256,
                       "bugs": ("none", "noise/2")},
    # canary-only (no records): the noise check reads the coordinates no canary touches
    "noise": {"q": 0.5, "steps": 64, "canaries": 256, "width": 128, "records": 0,
              "bugs": ("none", "noise*0.9", "truncated", "replayed", "per-tensor")},
}  # fmt: skip


def planted_cell(setup: str, eps: float, seeds: int, canaries: int | None = None) -> dict:
    """All bugs of one (setup, claimed epsilon): per-run results and per-bug summaries."""
    from attacks.planted import perfect_reference, run_one

    cfg = SETUPS[setup]
    q, steps, m, width = cfg["q"], cfg["steps"], canaries or cfg["canaries"], cfg["width"]
    t0 = time.perf_counter()
    ref = perfect_reference(epsilon=eps, q=q, steps=steps, canaries=m)
    runs, cells = [], []
    for bug in cfg["bugs"]:
        rows = []
        for seed in range(seeds):
            r = run_one(
                bug, epsilon=eps, q=q, steps=steps, canaries=m, seed=seed, width=width,
                records=cfg.get("records"),
            )  # fmt: skip
            rows.append(r)
            runs.append({"setup": setup} | {k: v for k, v in r.items() if k != "clip"})
        b = [r["bounds"] for r in rows]
        samp = [r["sampling"] for r in rows]
        cell = {
            "setup": setup,
            "sample_rate": q,
            "steps": steps,
            "canaries": m,
            "width": width,
            "epsilon": eps,
            "bug": bug,
            "claimed_epsilon": rows[0]["claimed_epsilon"],
            "noise_multiplier": rows[0]["noise_multiplier"],
            "flagged": sum(r["privacy_bug_suspected"] for r in rows),
            "flagged_by_bound": sum(r["bound_rejects_claim"] for r in rows),
            "flagged_by_sampling": sum(x["flagged"] for x in samp),
            "flagged_by_noise": sum(r["noise"]["flagged"] for r in rows),
            "seeds": seeds,
            **{
                f"{k}_mean": float(np.mean([x[k]["epsilon"] for x in b]))
                for k in ("ledger", "fdp", "one_run")
            },
            "ledger_min": float(min(x["ledger"]["epsilon"] for x in b)),
            "ceiling": rows[0]["ceiling"],
            "perfect": ref,
        }
        if samp[0]["applicable"]:
            cell["sampling"] = {
                "z_mean": float(np.mean([x["z"] for x in samp])),
                "z_max": float(max(x["z"] for x in samp)),
                "z_min": float(min(x["z"] for x in samp)),
                "p_min": float(min(x["p_value"] for x in samp)),
                "control_z_min": float(min(x["control_z"] for x in samp)),
                "control_z_max": float(max(x["control_z"] for x in samp)),
                "shuffler_shift": samp[0]["shuffler_shift"],
                "power_vs_shuffler": samp[0]["power_vs_shuffler"],
            }
        if bug == "none":
            cell["ratio_to_perfect"] = {
                k: cell[f"{k}_mean"] / ref[k] if ref[k] > 0 else None
                for k in ("ledger", "fdp", "one_run")
            }
        cells.append(cell)
        sz = cell.get("sampling", {})
        print(
            f"{setup:10s} eps {eps:g} {bug:9s} flagged {cell['flagged']}/{seeds} (bound "
            f"{cell['flagged_by_bound']}, sampling {cell['flagged_by_sampling']}, noise "
            f"{cell['flagged_by_noise']})  ledger "
            f"{cell['ledger_mean']:5.2f} fdp {cell['fdp_mean']:5.2f} steinke "
            f"{cell['one_run_mean']:5.2f}  perfect ledger {ref['ledger']:5.2f}  ceiling fdp "
            f"{cell['ceiling']['fdp']:5.2f}  sampling z "
            + (f"{sz['z_min']:.2f}..{sz['z_max']:.2f}" if sz else "n/a")
            + f" ({time.perf_counter() - t0:.0f} s)",
            flush=True,
        )
    return {"setup": setup, "epsilon": eps, "seeds": seeds, "canaries": m,
            "seconds": time.perf_counter() - t0, "cells": cells, "runs": runs}  # fmt: skip


def planted_files() -> list[Path]:
    return sorted((ROOT / "benchmarks" / "results").glob("audit_planted_*.json"))


def planted_table() -> str:
    """The markdown table of benchmarks/README.md from every ``audit_planted_*.json``."""
    order = {s: i for i, s in enumerate(SETUPS)}
    cells = [c for f in planted_files() for c in json.loads(f.read_text())["cells"]]
    cells.sort(
        key=lambda c: (order[c["setup"]], c["epsilon"], SETUPS[c["setup"]]["bugs"].index(c["bug"]))
    )
    lines = [
        "| setup | claimed eps | bug | flagged (bound / sampling / noise) | eps >= ledger curve | "
        "eps >= f-DP Gaussian | eps >= Steinke | ceiling (ledger / f-DP / Steinke) | "
        "sampling Z (min..max) | perfect attacker (ratio) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for c in cells:
        ce, p = c["ceiling"], c["perfect"]
        sz = c.get("sampling")
        perfect = ""
        if c["bug"] == "none":
            r = c["ratio_to_perfect"]
            perfect = (f"{p['ledger']:.2f} / {p['fdp']:.2f} ({r['ledger']:.0%} / {r['fdp']:.0%})"
                       if r["ledger"] and r["fdp"] else f"{p['ledger']:.2f} / {p['fdp']:.2f}")  # fmt: skip
        lines.append(
            f"| {c['setup']} | {c['epsilon']:g} | {c['bug']} | **{c['flagged']}/{c['seeds']}** "
            f"({c['flagged_by_bound']} / {c['flagged_by_sampling']} / "
            f"{c.get('flagged_by_noise', 'n/a')}) | {c['ledger_mean']:.2f} "
            f"(min {c['ledger_min']:.2f}) | {c['fdp_mean']:.2f} | {c['one_run_mean']:.2f} | "
            f"{ce['ledger']:.1f} / {ce['fdp']:.1f} / {ce['one_run']:.1f} | "
            + (f"{sz['z_min']:.1f}..{sz['z_max']:.1f}" if sz else "n/a (q = 1)")
            + f" | {perfect} |"
        )
    return "\n".join(lines)


def planted(seeds: int, setups: list[str], epsilons: list[float], canaries: int | None) -> None:
    import torch

    torch.set_num_threads(1)
    out = ROOT / "benchmarks" / "results"
    for setup in setups:
        for eps in epsilons:
            result = planted_cell(setup, eps, seeds, canaries)
            name = f"audit_planted_{setup}_eps{eps:g}.json"
            (out / name).write_text(json.dumps(result, indent=2, default=float))
            print(f"{setup} eps {eps:g}: {result['seconds']:.0f} s -> {name}", flush=True)


def noise_sim(steps_list: list[int], canaries: int, trials: int, factor: float = 0.5) -> dict:
    """Share of simulated runs of the exact mechanism with ``factor`` times the claimed noise
    (q = 0.5) in which the ledger-curve test rejects the claim (95%, delta 1e-5, RDP)."""
    from accountants import Event, get_accountant
    from attacks.planted import noise_for
    from attacks.whitebox import LedgerFamily, log_likelihood_ratio

    q, delta, rows = 0.5, 1e-5, []
    for steps in steps_list:
        for eps in (2.0, 4.0, 8.0):
            sigma = noise_for(eps, delta, q, steps, "rdp")
            family = LedgerFamily([Event(q, sigma, steps)], get_accountant("rdp"), delta)
            rng = np.random.default_rng([steps, int(eps)])
            member = rng.random((trials, canaries)) < 0.5
            score = np.zeros((trials, canaries))
            for _ in range(steps):
                inside = member & (rng.random((trials, canaries)) < q)
                z = inside / sigma + factor * rng.standard_normal((trials, canaries))
                score += log_likelihood_ratio(z, q, 1 / sigma)
            share = float(family.rejects(score, member, 0, 0.95).mean())
            rows.append({"steps": steps, "epsilon": eps, "noise_multiplier": sigma,
                         "rejected_share": share})  # fmt: skip
            print(f"steps {steps:3d} eps {eps:g} sigma {sigma:.3f}: claim rejected in "
                  f"{share:.0%} of {trials} runs", flush=True)  # fmt: skip
    return {"canaries": canaries, "trials": trials, "noise_factor": factor, "rows": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="what", required=True)
    g = sub.add_parser("gaussian")
    g.add_argument("--trials", type=int, default=2000)
    q = sub.add_parser("quickstart")
    q.add_argument("--run", type=Path, default=ROOT / "runs" / "quickstart-audit")
    p = sub.add_parser("planted")
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--setups", default=",".join(SETUPS), help=f"of {', '.join(SETUPS)}")
    p.add_argument("--epsilons", default="2,4,8")
    p.add_argument("--canaries", type=int, default=None, help="override the setups' counts")
    sub.add_parser("planted-table")
    n = sub.add_parser("noise-sim")
    n.add_argument("--steps", default="4,16,32,64")
    n.add_argument("--canaries", type=int, default=8000)
    n.add_argument("--trials", type=int, default=40)
    args = ap.parse_args()
    out = ROOT / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    if args.what == "planted":
        setups = args.setups.split(",")
        if unknown := set(setups) - set(SETUPS):
            ap.error(f"unknown setups {sorted(unknown)}: choose of {', '.join(SETUPS)}")
        planted(args.seeds, setups, [float(e) for e in args.epsilons.split(",")], args.canaries)
    elif args.what == "planted-table":
        print(planted_table())
    elif args.what == "noise-sim":
        steps = [int(s) for s in args.steps.split(",")]
        result = noise_sim(steps, args.canaries, args.trials)
        (out / "audit_noise_sim.json").write_text(json.dumps(result, indent=2))
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
