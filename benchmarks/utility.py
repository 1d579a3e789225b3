"""Utility at equal privacy: fine-tune the same model on the same data under each policy.

    python benchmarks/utility.py                       # small setup, all registered policies, 3 seeds
    python benchmarks/utility.py --setup smollm --seeds 2
    python benchmarks/utility.py --policies static --quick
    python benchmarks/utility.py --policies static,error_feedback --set privacy.accountant=rdp --jobs 6

For every (setup, policy, seed) a recipe is built from ``SETUPS[setup]`` plus
``POLICIES[policy]`` (then the ``--set section.key=value`` overrides, for every policy) and run
with :func:`dptrain.train.train` at the same (epsilon, delta),
evaluating validation perplexity every ``eval_every`` steps.  Results go to
``benchmarks/results/utility.json`` shaped ``{setup: {policy: {...}}}`` and a plot of
perplexity against epsilon spent to ``benchmarks/results/utility_<setup>.png``.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import multiprocessing as mp
import shutil
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "benchmarks" / "results"

SETUPS: dict[str, dict[str, Any]] = {
    # a small GPT-2-style model trained from scratch on the bundled corpus: minutes on 2 cores
    "small": {
        "model": {"name": "tiny-gpt2:n_layer=2,n_embd=128,vocab=2048"},
        "lora": None,
        "data": {
            "path": "bundled:clinic_notes",
            "max_length": 64,
            "validation_fraction": 0.1,
            "max_validation_records": 200,
        },
        "training": {
            "steps": 200,
            "batch_size": 128,
            "physical_batch_size": 64,
            "optimizer": "adamw",
            "lr": 0.003,
            "eval_every": 20,
            "checkpoint_every": 1000,
        },
        "privacy": {"epsilon": 8.0, "accountant": "prv"},
    },
    # SmolLM2-135M + LoRA: a benchmark, tens of minutes per run on 2 cores
    "smollm": {
        "model": {"name": "smollm2-135m"},
        "lora": {"r": 8, "alpha": 16, "target_modules": ["q_proj", "v_proj"]},
        "data": {
            "path": "bundled:clinic_notes",
            "max_length": 64,
            "validation_fraction": 0.1,
            "max_validation_records": 64,
        },
        "training": {
            "steps": 150,
            "batch_size": 32,
            "physical_batch_size": 16,
            "optimizer": "adamw",
            "lr": 0.003,
            "eval_every": 15,
            "checkpoint_every": 1000,
        },
        "privacy": {"epsilon": 8.0, "delta": 1.0e-5, "accountant": "prv"},
    },
}

# The policy section of each contender (the privacy section is shared). Other policies add
# themselves here once registered in dptrain.policies.
POLICIES: dict[str, dict[str, Any]] = {
    "static": {"name": "static", "clip": 1.0},
    # DiceSGD; its own RDP analysis needs privacy.accountant=rdp. error_clip (C2) costs like a
    # full-batch Gaussian of sensitivity 2*C2 per step: keep it near sample_rate * clip.
    "error_feedback": {"name": "error_feedback", "clip": 1.0, "error_clip": 0.02},
    # RL-controlled per-layer clips and noise (SAC); see OVERRIDES
    "rl": {"name": "rl", "clip": 1.0, "grouping": "per_layer", "rl": {"every": 5}},
}

# Sections a contender needs changed (before --set): rl chooses its noise from data, so only the
# adaptive RDP filter may guard its budget, and its reward reads a public split (2% of the
# training records, declared public and left out of its private training set).
OVERRIDES: dict[str, dict[str, dict[str, Any]]] = {
    "rl": {"privacy": {"accountant": "rdp"}, "data": {"public_fraction": 0.02}},
}


def recipe_for(
    setup: str, policy: str, seed: int, out: Path, quick: bool, sets: list[str] = ()
) -> dict[str, Any]:
    import yaml

    d = copy.deepcopy(SETUPS[setup])
    d["name"] = f"{setup}-{policy}-{seed}"
    d["seed"] = seed
    d["output_dir"] = str(out)
    d["policy"] = copy.deepcopy(POLICIES[policy])
    for section, values in OVERRIDES.get(policy, {}).items():
        d[section].update(values)
    for item in sets:  # SECTION.KEY=VALUE, or POLICY:SECTION.KEY=VALUE for one policy only
        dotted, value = item.split("=", 1)
        only, _, dotted = dotted.rpartition(":")
        if only and only != policy:
            continue
        section, key = dotted.split(".", 1)
        d.setdefault(section, {})[key] = yaml.safe_load(value)
    if quick:
        d["training"]["steps"] = max(4, d["training"]["steps"] // 10)
        d["training"]["eval_every"] = max(1, d["training"]["eval_every"] // 10)
    return d


def run_one(recipe_dict: dict[str, Any], threads: int = 0) -> dict[str, Any]:
    import torch

    from dptrain.recipe import parse_recipe
    from dptrain.rundir import RunDir
    from dptrain.train import train

    if threads:
        torch.set_num_threads(threads)
    out = Path(recipe_dict["output_dir"])
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    result = train(parse_recipe(recipe_dict), progress=False)
    meta = RunDir(out).read_meta()
    wall = time.perf_counter() - t0
    curve = [
        (m["step"], m["epsilon"], m["val_perplexity"])
        for m in RunDir(out).read_metrics()
        if "val_perplexity" in m
    ]
    return {
        "perplexity": result.perplexity_after,
        "perplexity_before": result.perplexity_before,
        "epsilon": result.epsilon,
        "delta": result.delta,
        "steps": result.steps,
        "wall_seconds": wall,
        "curve": curve,
        "accountant": result.accountant,
        "policy": meta["policy"],
    }


def run_dir(setup: str, policy: str, seed: int, tag: str = "") -> Path:
    return RESULTS / "runs" / f"{setup}-{policy}{tag}-{seed}"


def first_step_reaching(curve: list[tuple[int, float, float]], target: float) -> int | None:
    for step, _, ppl in curve:
        if ppl <= target:
            return step
    return None


def summarize(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    static_final = None
    if "static" in runs:
        static_final = statistics.mean(r["perplexity"] for r in runs["static"])
    for policy, rs in runs.items():
        ppl = [r["perplexity"] for r in rs]
        entry = {
            "perplexity_mean": statistics.mean(ppl),
            "perplexity_std": statistics.stdev(ppl) if len(ppl) > 1 else 0.0,
            "perplexity_runs": ppl,
            "epsilon": max(r["epsilon"] for r in rs),
            "delta": rs[0]["delta"],
            "seeds": len(rs),
            "steps": rs[0]["steps"],
            "wall_seconds_mean": statistics.mean(r["wall_seconds"] for r in rs),
            "accountant": rs[0].get("accountant"),
            "policy": rs[0].get("policy"),
        }
        if static_final is not None:
            reach = [first_step_reaching(r["curve"], static_final) for r in rs]
            entry["updates_to_static_final"] = [x for x in reach]
            entry["updates_to_static_final_mean"] = (
                statistics.mean(x for x in reach if x is not None)
                if any(x is not None for x in reach)
                else None
            )
        out[policy] = entry
    return out


def plot(setup: str, runs: dict[str, list[dict[str, Any]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for policy, rs in runs.items():
        for i, r in enumerate(rs):
            if not r["curve"]:
                continue
            _, eps, ppl = zip(*r["curve"], strict=True)
            ax.plot(
                eps,
                ppl,
                label=policy if i == 0 else None,
                color=f"C{list(runs).index(policy)}",
                alpha=0.8,
            )
    ax.set_xlabel("epsilon spent")
    ax.set_ylabel("validation perplexity")
    ax.set_yscale("log")
    ax.set_title(f"utility at equal privacy: {setup}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--setup", choices=[*SETUPS, "all"], default="small")
    ap.add_argument(
        "--policies",
        default=",".join(POLICIES),
        help="comma-separated, from: " + ", ".join(POLICIES),
    )
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override a recipe key for every run, e.g. privacy.accountant=rdp, or for one policy, "
        "e.g. error_feedback:policy.error_clip=0.01 (repeatable)",
    )
    ap.add_argument("--jobs", type=int, default=1, help="runs in parallel processes")
    ap.add_argument("--threads", type=int, default=0, help="torch threads per run (0: default)")
    ap.add_argument("--quick", action="store_true", help="a tenth of the steps (smoke run)")
    ap.add_argument("--tag", default="", help="suffix of run directories and plot (variants)")
    ap.add_argument("--out", default=str(RESULTS / "utility.json"))
    args = ap.parse_args(argv)
    setups = list(SETUPS) if args.setup == "all" else [args.setup]
    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    unknown = [p for p in policies if p not in POLICIES]
    if unknown:
        ap.error(f"unknown policies {unknown}; known: {list(POLICIES)}")
    out_path = Path(args.out)
    results: dict[str, Any] = json.loads(out_path.read_text()) if out_path.exists() else {}
    for setup in setups:
        jobs = [
            (
                policy,
                seed,
                recipe_for(
                    setup,
                    policy,
                    seed,
                    run_dir(setup, policy, seed, args.tag),
                    args.quick,
                    args.set,
                ),
            )
            for policy in policies
            for seed in range(args.seeds)
        ]
        runs: dict[str, list[dict[str, Any]]] = {}
        with ProcessPoolExecutor(args.jobs, mp_context=mp.get_context("spawn")) as pool:
            futures = [pool.submit(run_one, recipe, args.threads) for _, _, recipe in jobs]
            for (policy, seed, _), future in zip(jobs, futures, strict=True):
                r = future.result()
                print(
                    f"[{setup}] {policy} seed {seed}: perplexity {r['perplexity']:.3f}  "
                    f"epsilon {r['epsilon']:.3f}  {r['wall_seconds']:.0f}s",
                    flush=True,
                )
                runs.setdefault(policy, []).append(r)
        summary = summarize(runs)
        results[setup] = {**results.get(setup, {}), **summary}
        plot(setup, runs, RESULTS / f"utility_{setup}{args.tag}.png")
        for policy, e in summary.items():
            print(
                f"{setup:8s} {policy:15s} ppl {e['perplexity_mean']:.3f} ± {e['perplexity_std']:.3f}  eps {e['epsilon']:.3f}"
            )
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(
        json.dumps(
            results,
            indent=2,
            default=lambda x: None if isinstance(x, float) and not math.isfinite(x) else x,
        )
    )
    print(f"wrote {out_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
