"""Where the time of an adaptive (rl) run goes, per step, as the run gets long.

    python benchmarks/rl_cost.py                         # both parts below (a few minutes)
    python benchmarks/rl_cost.py --part ledger --steps 10000
    python benchmarks/rl_cost.py --part train --train-steps 300

Two measurements, each split into exclusive times (a part's own time, its children's taken
out) of the pieces an rl step runs:

* ``train``: ``dptrain train`` on the tiny recipe (a random tiny GPT-2, seconds per hundred
  steps) with ``policy: rl``, ``--train-steps`` steps; the model's forward/backward is inside
  ``engine step (rest)``.
* ``ledger``: the same rl policy, budget filter and ledger for ``--steps`` steps without a
  model: per step ``plan -> event -> filter.allows -> ledger.record -> observe`` (the engine's
  order), with the public loss a fixed decreasing curve and no released update (the policy's
  statistics of the update are then empty).  This is the accounting and agent cost a long
  run pays on top of its model.

Pieces: ``sac predict`` / ``sac learn`` / ``sac add`` (the agent), ``pacer`` (the sigma that
fits the rest of the budget), ``new-sigma rdp`` (a per-step RDP curve not seen before, inside
the pacer or the filter), ``spent`` (the epsilon the agent observes), ``public loss``,
``budget filter`` (``allows`` before each step), ``engine epsilon`` (the logged epsilon),
``plan`` (the policy's plan, pacer excluded), ``engine step (rest)``.  Times per step are over
the whole run and over its last tenth (the cost at length).  Results go to
``benchmarks/results/rl_cost.json``.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import yaml  # noqa: E402

import accountants.rdp as rdp_mod  # noqa: E402
from accountants import Budget, BudgetFilter, Ledger  # noqa: E402
from dptrain.engine import PrivacyEngine  # noqa: E402
from dptrain.policies import RunContext, StepContext  # noqa: E402
from dptrain.policies.rl import RLPolicy, control  # noqa: E402
from dptrain.policies.rl.agent import SacAgent  # noqa: E402


class Profile:
    """Exclusive time per label: a wrapped call's time minus that of wrapped calls inside it."""

    def __init__(self) -> None:
        self.total: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self._stack: list[float] = []  # children's time of each open call

    def wrap(self, owner, attr: str, label: str) -> None:
        fn = getattr(owner, attr)

        @functools.wraps(fn)
        def timed(*args, **kwargs):
            self._stack.append(0.0)
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                dt = time.perf_counter() - t0
                children = self._stack.pop()
                self.total[label] += dt - children
                self.calls[label] += 1
                if self._stack:
                    self._stack[-1] += dt

        setattr(owner, attr, timed)

    def snapshot(self) -> dict[str, float]:
        return dict(self.total)

    def reset(self) -> None:
        self.total.clear()
        self.calls.clear()


PROF = Profile()


def instrument(prof: Profile) -> None:
    prof.wrap(SacAgent, "act", "sac predict")
    prof.wrap(SacAgent, "update", "sac learn")
    prof.wrap(SacAgent, "add", "sac add")
    prof.wrap(control.Pacer, "sigma", "pacer")
    prof.wrap(rdp_mod, "subsampled_gaussian_rdp", "new-sigma rdp")  # behind the lru cache
    prof.wrap(RLPolicy, "_spent", "spent")
    prof.wrap(RLPolicy, "_public_loss", "public loss")
    prof.wrap(RLPolicy, "plan", "plan")
    prof.wrap(BudgetFilter, "allows", "budget filter")
    prof.wrap(PrivacyEngine, "epsilon", "engine epsilon")
    prof.wrap(PrivacyEngine, "step", "engine step (rest)")


def split(marks: list[dict[str, float]], steps: int) -> dict:
    """ms per step over the run and over its last tenth, per label (``marks``: the profile
    before the run and after each tenth of it)."""
    end, tenth = marks[-1], marks[-2] if len(marks) > 2 else {}
    n_last = steps - (len(marks) - 2) * max(1, steps // 10) if len(marks) > 2 else steps
    labels = sorted(end, key=lambda k: -end[k])
    return {
        k: {
            "ms_per_step": 1e3 * end[k] / steps,
            "ms_per_step_last_tenth": 1e3 * (end[k] - tenth.get(k, 0.0)) / n_last,
            "calls": PROF.calls[k],
            "s_per_tenth": [
                round(b.get(k, 0.0) - a.get(k, 0.0), 4) for a, b in itertools.pairwise(marks)
            ],
        }
        for k in labels
    }


def ledger_loop(steps: int, rl: dict, q: float, eps: float, delta: float) -> dict:
    """The rl policy + adaptive filter + ledger for ``steps`` steps, no model (module doc)."""
    PROF.reset()
    policy = RLPolicy(clip=1.0, rl=rl)
    policy.calibrate(eps, delta, sample_rate=q, steps=steps, accountant="rdp")
    groups = [f"layer{i}" for i in range(8)]
    policy.bind(groups, sample_rate=q, expected_batch_size=q * 10_000)
    policy.attach(RunContext(None, steps, seed=0, public_batches=[{}]))
    curve = iter([3.0 * math.exp(-t / steps) for t in range(steps + 2)])
    policy._public_loss = lambda: next(curve)  # a public loss curve, no model
    PROF.wrap(policy, "_public_loss", "public loss")
    filt = BudgetFilter(Budget(eps, delta), "rdp", adaptive=True)
    ledger = Ledger()
    marks: list[dict[str, float]] = [{}]
    t0 = time.perf_counter()
    for t in range(steps):
        ctx = StepContext(step=t, budget_epsilon=eps, delta=delta, ledger=ledger, spent=None)
        plan = policy.plan(ctx)
        event = policy.event(plan)
        if not filt.allows(ledger, event):
            raise SystemExit(f"the filter refused step {t}: the pacer should not let that happen")
        ledger.record(event)
        policy.observe({"step": t + 1})
        if (t + 1) % max(1, steps // 10) == 0:
            marks.append(PROF.snapshot())
            print(f"  step {t + 1}: {time.perf_counter() - t0:.1f} s", flush=True)
    wall = time.perf_counter() - t0
    out = split(marks, steps)
    spent = filt.spent(ledger)
    t1 = time.perf_counter()  # what dptrain train adds at the end: the non-adaptive epsilon
    non_adaptive = rdp_mod.RdpAccountant().epsilon(ledger.events, delta)
    end_s = time.perf_counter() - t1
    return {
        "steps": steps,
        "rl": rl,
        "sample_rate": q,
        "epsilon": eps,
        "delta": delta,
        "ledger_entries": len(ledger),
        "distinct_sigmas": len({e.noise_multiplier for e in ledger.events}),
        "spent_adaptive": spent,
        "non_adaptive_epsilon": non_adaptive,
        "end_of_run_non_adaptive_epsilon_s": end_s,
        "wall_s": wall,
        "ms_per_step": 1e3 * wall / steps,
        "split": out,
    }


def train_run(steps: int, rl: dict) -> dict:
    """``dptrain train`` of the tiny recipe with policy rl, profiled (module doc)."""
    from dptrain.recipe import parse_recipe
    from dptrain.train import train

    PROF.reset()
    d = yaml.safe_load((ROOT / "recipes" / "tiny.yaml").read_text())
    out = Path(tempfile.mkdtemp(prefix="rl_cost_")) / "run"
    d["output_dir"] = str(out)
    d["data"].update(public_fraction=0.05, max_public_records=8)
    d["training"].update(
        steps=steps, batch_size=8, physical_batch_size=8, checkpoint_every=10**6, log_every=10
    )
    d["policy"] = {"name": "rl", "grouping": "per_layer", "rl": rl}
    marks: list[dict[str, float]] = [{}]
    orig_step = PrivacyEngine.step

    def step(self, *a, **k):
        r = orig_step(self, *a, **k)
        if self.steps_taken % max(1, steps // 10) == 0:
            marks.append(PROF.snapshot())
        return r

    PrivacyEngine.step = step
    t0 = time.perf_counter()
    result = train(parse_recipe(d), progress=False, cross_check=False)
    wall = time.perf_counter() - t0
    PrivacyEngine.step = orig_step
    ledger = json.loads((result.run_dir / "ledger.json").read_text())["events"]
    return {
        "steps": steps,
        "rl": rl,
        "ledger_entries": len(ledger),
        "distinct_sigmas": len({e["noise_multiplier"] for e in ledger}),
        "wall_s_including_setup": wall,
        "split": split(marks, steps),
    }


def show(title: str, res: dict) -> None:
    print(f"\n{title}")
    keys = (
        "steps",
        "ledger_entries",
        "distinct_sigmas",
        "wall_s",
        "wall_s_including_setup",
        "end_of_run_non_adaptive_epsilon_s",
    )
    print(
        "  "
        + ", ".join(
            f"{k}={res[k]:.4g}" if isinstance(res[k], float) else f"{k}={res[k]}"
            for k in keys
            if k in res
        )
    )
    print(f"  {'piece':<20} {'ms/step':>9} {'last 10%':>9} {'calls':>7}")
    for k, v in res["split"].items():
        print(
            f"  {k:<20} {v['ms_per_step']:9.3f} {v['ms_per_step_last_tenth']:9.3f} {v['calls']:7d}"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--part", choices=["ledger", "train", "both"], default="both")
    ap.add_argument("--steps", type=int, default=10_000, help="steps of the ledger loop")
    ap.add_argument("--train-steps", type=int, default=300)
    ap.add_argument("--every", type=int, default=5, help="rl.every")
    ap.add_argument("--gradient-steps", type=int, default=8, help="rl.gradient_steps")
    ap.add_argument("--learn-every", type=int, default=1, help="rl.learn_every")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "rl_cost.json"))
    args = ap.parse_args()
    uptime = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    results: dict = {
        "machine": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "uptime_before": uptime,
        "commit": subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT
        ).stdout.strip(),
    }
    print(uptime)
    instrument(PROF)
    rl = {"every": args.every, "gradient_steps": args.gradient_steps}
    if args.learn_every != 1:  # (a knob of this branch: left out at its default)
        rl["learn_every"] = args.learn_every
    if args.part in ("ledger", "both"):
        results["ledger"] = ledger_loop(args.steps, rl, q=0.01, eps=8.0, delta=1e-5)
        show(f"ledger loop: {args.steps} adaptive steps, no model", results["ledger"])
    if args.part in ("train", "both"):
        results["train"] = train_run(args.train_steps, rl)
        show(f"dptrain train (tiny, rl): {args.train_steps} steps", results["train"])
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwritten {path}")


if __name__ == "__main__":
    main()
