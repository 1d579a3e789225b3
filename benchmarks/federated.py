"""FedSVD vs FFA-LoRA vs plain DP-LoRA at equal per-client privacy.

    python benchmarks/federated.py                 # recipes/federated.yaml, 3 seeds
    python benchmarks/federated.py --seeds 2 --set federated.rounds=6
    python benchmarks/federated.py --quick         # the tiny recipe, 1 seed (a smoke run)

Every (strategy, seed) runs the same federated recipe (same clients, non-IID split, rounds,
local steps, optimizer) as an in-process Flower simulation; only ``federated.strategy`` and
``seed`` change.  Each client's noise is calibrated for its total local steps over all rounds
at the recipe's per-client (epsilon, delta), so every strategy spends the same budget.  The
seed moves the split and the adapters' initialization; every run's clients are new (fresh
state directories and keys), so their batches and noise are fresh draws.

Writes ``benchmarks/results/federated.json`` shaped ``{strategy: {perplexity_mean,
perplexity_std, perplexity, epsilon, delta, curve_mean, minus_fedsvd, ...}}`` (``epsilon``:
each client's final epsilon, the largest over seeds; ``minus_fedsvd``: per-seed perplexity
difference to FedSVD on the same split) and ``benchmarks/results/federated.png`` (global
validation perplexity per round, mean and range over seeds).
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "benchmarks" / "results"
STRATEGIES = ("fedsvd", "ffa_lora", "dp_lora")


def run_one(recipe_path: Path, overrides: list[str], out: Path) -> dict[str, Any]:
    from dptrain.federated import simulate
    from dptrain.recipe import load_recipe

    shutil.rmtree(out, ignore_errors=True)
    clients = out.with_name(out.name + "-clients")  # every run is a new experiment: new clients
    shutil.rmtree(clients, ignore_errors=True)
    t0 = time.perf_counter()
    simulate(load_recipe(recipe_path, [*overrides, f"federated.state_dir={clients}"]), out)
    return {**read_run(out), "wall_seconds": time.perf_counter() - t0}


def read_run(out: Path) -> dict[str, Any]:
    """A finished run's figures, from its run directory."""
    from dptrain.rundir import RunDir

    run = RunDir(out)
    meta, stats, rounds = run.read_meta(), run.read_stats(), run.read_metrics()
    return {
        "perplexity": stats["perplexity_after"],
        "curve": [stats["perplexity_before"]] + [m["val_perplexity"] for m in rounds],
        # the clients' reported spends are private (private/stats.json; older runs: run.json)
        "epsilon": stats.get("client_epsilon", meta.get("client_epsilon")),
        "delta": stats.get("client_delta", meta.get("client_delta")),
        "wall_seconds": stats["train_seconds"],  # private: it follows the batch sizes
    }


def summarize(runs: list[dict[str, Any]], seeds: list[int], command: str) -> dict[str, Any]:
    ppl = [r["perplexity"] for r in runs]
    clients = sorted({k for r in runs for k in r["epsilon"]}, key=int)
    curves = list(zip(*(r["curve"] for r in runs), strict=True))
    return {
        "perplexity_mean": statistics.mean(ppl),
        "perplexity_std": statistics.stdev(ppl) if len(ppl) > 1 else 0.0,
        "perplexity": ppl,
        "seeds": seeds,
        "epsilon": {k: max(r["epsilon"][k] for r in runs) for k in clients},
        "epsilon_by_seed": [r["epsilon"] for r in runs],
        "delta": runs[0]["delta"],
        "curve_mean": [statistics.mean(c) for c in curves],
        "curve_min": [min(c) for c in curves],
        "curve_max": [max(c) for c in curves],
        "wall_seconds_mean": statistics.mean(r["wall_seconds"] for r in runs),
        "command": command,
        "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}, python {platform.python_version()}",
    }


def add_paired(results: dict[str, Any], reference: str = "fedsvd") -> None:
    """Per-seed differences to ``reference`` (same seed = same split, same client data)."""
    if reference not in results:
        return
    ref = results[reference]["perplexity"]
    for strategy, r in results.items():
        if strategy != reference:
            diff = [a - b for a, b in zip(r["perplexity"], ref, strict=True)]
            r[f"minus_{reference}"] = diff
            r[f"minus_{reference}_mean"] = statistics.mean(diff)


def plot(results: dict[str, Any], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for i, (strategy, r) in enumerate(results.items()):
        x = list(range(len(r["curve_mean"])))
        ax.plot(x, r["curve_mean"], marker="o", color=f"C{i}", label=strategy)
        ax.fill_between(x, r["curve_min"], r["curve_max"], color=f"C{i}", alpha=0.15)
    ax.set_xticks(x)
    ax.set_xlabel("round")
    ax.set_ylabel("global validation perplexity")
    ax.set_title(title, fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--recipe", default=str(ROOT / "recipes" / "federated.yaml"))
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--strategies", default=",".join(STRATEGIES))
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--quick", action="store_true", help="tiny recipe, one seed")
    ap.add_argument("--out", default=str(RESULTS / "federated.json"))
    ap.add_argument(
        "--from-runs", action="store_true", help="summarize existing run directories, no training"
    )
    args = ap.parse_args()
    recipe = Path(ROOT / "recipes" / "federated_tiny.yaml" if args.quick else args.recipe)
    seeds = list(range(1 if args.quick else args.seeds))
    logging.getLogger("absl").setLevel(logging.ERROR)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    command = "python " + " ".join(sys.argv)
    workdir = ROOT / "runs" / "benchmarks" / "federated"
    results: dict[str, Any] = {}
    for strategy in args.strategies.split(","):
        runs = []
        for seed in seeds:
            print(f"== {strategy} seed {seed}", flush=True)
            overrides = [*args.set, f"federated.strategy={strategy}", f"seed={seed}"]
            out = workdir / f"{strategy}-seed{seed}"
            r = read_run(out) if args.from_runs else run_one(recipe, overrides, out)
            print(
                f"   final perplexity {r['perplexity']:.3f} ({r['wall_seconds']:.0f} s)", flush=True
            )
            runs.append(r)
        results[strategy] = summarize(runs, seeds, command)
    add_paired(results)
    print()
    for strategy, r in results.items():
        eps = ", ".join(f"{k}: {v:.3f}" for k, v in r["epsilon"].items())
        paired = r.get("minus_fedsvd_mean")
        vs = f", vs fedsvd on the same seed {paired:+.3f}" if paired is not None else ""
        print(
            f"{strategy:9s} perplexity {r['perplexity_mean']:.3f} ± {r['perplexity_std']:.3f}"
            f"  epsilon per client {eps}{vs}"
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    title = ", ".join([recipe.name, *args.set, f"{len(seeds)} seeds (mean and range)"])
    plot(results, out.with_suffix(".png"), title)
    print(f"wrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
