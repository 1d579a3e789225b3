"""Per-step accounting cost of a long heterogeneous run, for every accountant.

    python benchmarks/accounting.py                    # 10^4-step ledgers, all accountants
    python benchmarks/accounting.py --steps 2000 --timed 50 --accountants rdp
    python benchmarks/accounting.py --steps 1000 --schedules decay --accountants pld prv
    timeout 1800 python benchmarks/accounting.py --steps 1000 --exact --accountants pld

A training step pays for accounting twice: the budget filter's ``allows(ledger, event)``
before the step (the engine's hot path) and ``ledger.record(event)`` after it; the epsilon
shown to the user is computed only where it is logged (``training.log_every``).  This
benchmark builds a ledger of ``--steps`` steps and then times ``--timed`` more steps of
``allows + record`` (and, separately, the epsilon of the ledger as a log line would), with
the filter's caches as a running engine has them (one filter for the whole run).

Schedules (the noise changes every step, so every step is a new ledger entry):

* ``adaptive``: sigma_t = 1 + 0.2 * u_t with u_t pseudo-random on 256 levels: every step a
  new ledger entry, as when the rl policy picks the noise from released data; guarded by the
  RDP filter in adaptive mode (the only accountant valid for it).  The levels keep building
  the ledger within minutes; a sigma never seen before costs one per-step RDP curve more,
  measured on its own (``new_mechanism_ms``);
* ``cycle``: sigma_t cycles over 8 values (a non-adaptive schedule that changes every step),
  for every accountant.  PRV and PLD decide it by a dominance certificate (the first query
  certifies a count of the least private step; then a counter, see
  :mod:`accountants.budget`); ``certificate`` in the JSON says what it certified;
* ``decay``: sigma_t = 2 * 2^(-t / steps), a public schedule decaying every step (from 2 to 1
  over the ledger), for PRV and PLD: every step a new distinct mechanism.  The filter's
  dominating step is on the public grid of :mod:`accountants.grid` (re-certified only when
  sigma crosses a grid point: ``certificates`` counts them over the timed steps) and the
  ledger is composed on that grid (``grid_level``; 64 distinct mechanisms at most).
  ``--exact`` instead composes the decay ledger both exactly and on the grid (run it with a
  timeout: the exact composition of thousands of mechanisms takes minutes).

Results go to ``benchmarks/results/accounting.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from accountants import Budget, BudgetFilter, Event, Ledger, get_accountant  # noqa: E402
from accountants.budget import ledger_epsilon  # noqa: E402

Q = 0.01
DELTA = 1e-5
BUDGET = 16.0


def schedule(kind: str, t: int, span: int) -> float:
    if kind == "adaptive":  # a new value every step (a fixed pseudo-random sequence)
        return 1.0 + 0.2 * (((t * 2654435761) % 2**32) >> 24) / 256
    if kind == "decay":  # from 2 to 1 over the ledger's span, a new value every step
        return 2.0 * 2.0 ** (-t / span)
    return 1.0 + 0.1 * (t % 8)


def decay_ledger(steps: int) -> Ledger:
    return Ledger([Event(Q, schedule("decay", t, steps)) for t in range(steps)])


def measure(accountant: str, kind: str, steps: int, timed: int) -> dict:
    adaptive = kind == "adaptive"
    acc = get_accountant(accountant)
    # a budget about 2.5x what the run spends: the filter's search probes near its boundary
    # (a budget of 1e6 would make PRV and PLD compose ~10^12 steps, tens of GB)
    filt = BudgetFilter(Budget(BUDGET, DELTA), acc, adaptive=adaptive)
    certify, certificates = filt._certify, []

    def counted(ledger, event):  # count the filter's certificates (each a count search)
        certificates.append(event)
        return certify(ledger, event)

    filt._certify = counted
    ledger = Ledger()
    t0 = time.perf_counter()
    for t in range(steps):
        ledger.record(Event(Q, schedule(kind, t, steps)))
    build = time.perf_counter() - t0
    # the first query of a fresh filter on a long ledger (a resumed run's first step)
    t0 = time.perf_counter()
    filt.allows(ledger, Event(Q, schedule(kind, steps, steps)))
    first = time.perf_counter() - t0
    certificates.clear()
    per_step = []
    for t in range(steps, steps + timed):
        event = Event(Q, schedule(kind, t, steps))
        t0 = time.perf_counter()
        if not filt.allows(ledger, event):
            raise AssertionError("the benchmark's budget is never binding")
        ledger.record(event)
        per_step.append(time.perf_counter() - t0)
    cert = getattr(filt, "_certificate", None)  # PRV/PLD: the dominance certificate in use
    certified = (
        None
        if cert is None
        else {
            "dominating": [cert.dominating.sample_rate, cert.dominating.noise_multiplier],
            "allowed_steps": cert.allowed,
            "used_steps": cert.used(),
            "level": cert.level,
        }
    )
    new_mechanism = None
    if accountant == "rdp":  # one sigma never seen: its per-step curve
        t0 = time.perf_counter()
        acc.step_rdp(Event(Q, 1.2345678 + steps * 1e-9), adaptive=adaptive)
        new_mechanism = 1e3 * (time.perf_counter() - t0)
    t0 = time.perf_counter()  # what the engine computes for a log line (dptrain.engine)
    eps = ledger_epsilon(acc, ledger, DELTA, adaptive)
    logged = time.perf_counter() - t0
    measure_eps = acc.adaptive_epsilon if adaptive else acc.epsilon
    t0 = time.perf_counter()
    assert measure_eps(ledger.events, DELTA) == eps
    scratch = time.perf_counter() - t0
    return {
        "accountant": accountant,
        "schedule": kind,
        "ledger_steps": steps,
        "budget_epsilon": BUDGET,
        "ledger_entries": len(ledger),
        "timed_steps": timed,
        "filter_and_record_median_ms": 1e3 * statistics.median(per_step),
        "filter_and_record_max_ms": 1e3 * max(per_step),
        "filter_and_record_mean_ms": 1e3 * statistics.fmean(per_step),
        "certificates": len(certificates) if filt.margin is not None else None,
        "grid_level": acc.grid_level(ledger.events) if hasattr(acc, "grid_level") else None,
        "first_query_ms": 1e3 * first,
        "epsilon_for_a_log_line_ms": 1e3 * logged,
        "epsilon_from_scratch_ms": 1e3 * scratch,
        "new_mechanism_ms": new_mechanism,
        "certificate": certified,
        "epsilon": eps,
        "build_s": build,
    }


def exact_vs_gridded(accountant: str, steps: int) -> dict:
    """Epsilon of the decay ledger composed on the grid (the default) and exactly."""
    ledger = decay_ledger(steps)
    gridded_acc = get_accountant(accountant)
    t0 = time.perf_counter()
    gridded = gridded_acc.epsilon(ledger.events, DELTA)
    gridded_s = time.perf_counter() - t0
    print(
        f"{accountant} decay {steps}: gridded epsilon {gridded:.5f} ({gridded_s:.1f} s)", flush=True
    )
    t0 = time.perf_counter()
    exact = get_accountant(accountant, max_exact_mechanisms=None).epsilon(ledger.events, DELTA)
    exact_s = time.perf_counter() - t0
    print(f"{accountant} decay {steps}: exact epsilon {exact:.5f} ({exact_s:.1f} s)", flush=True)
    return {
        "accountant": accountant,
        "schedule": "decay-exact",
        "ledger_steps": steps,
        "ledger_entries": len(ledger),
        "grid_level": gridded_acc.grid_level(ledger.events),
        "epsilon_gridded": gridded,
        "epsilon_gridded_s": gridded_s,
        "epsilon_exact": exact,
        "epsilon_exact_s": exact_s,
        "gridded_over_exact": gridded / exact - 1.0,
    }


def store(rows: list[dict], path: str) -> None:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    stored = json.loads(out.read_text()) if out.exists() else {}
    for row in rows:  # the latest figures per (accountant, schedule, ledger length)
        key = f"{row['accountant']} {row['schedule']} {row['ledger_steps']}"
        stored[key] = {"machine": platform.processor() or platform.machine(), **row}
    out.write_text(json.dumps(stored, indent=1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=10_000)
    ap.add_argument("--timed", type=int, default=20)
    ap.add_argument("--accountants", nargs="+", default=["rdp", "prv", "pld"])
    ap.add_argument(
        "--schedules", nargs="+", choices=["adaptive", "cycle", "decay"], default=None,
        help="default: adaptive and cycle for rdp, cycle for prv and pld",
    )  # fmt: skip
    ap.add_argument("--exact", action="store_true", help="exact vs gridded decay epsilon only")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "accounting.json"))
    args = ap.parse_args()
    if args.exact:
        for name in args.accountants:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                row = exact_vs_gridded(name, args.steps)
            print(f"  gridded / exact - 1 = {row['gridded_over_exact']:.3%}", flush=True)
            store([row], args.out)
        return
    rows = []
    for name in args.accountants:
        default = ("adaptive", "cycle") if name == "rdp" else ("cycle",)
        kinds = [k for k in args.schedules or default if k != "adaptive" or name == "rdp"]
        for kind in kinds:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                row = measure(name, kind, args.steps, args.timed)
            rows.append(row)
            print(
                f"{name:4s} {kind:8s} {row['ledger_steps']} steps ({row['ledger_entries']} "
                f"entries): filter+record median {row['filter_and_record_median_ms']:.3f} ms, "
                f"max {row['filter_and_record_max_ms']:.3f} ms; first query "
                f"{row['first_query_ms']:.1f} ms; epsilon for a log line "
                f"{row['epsilon_for_a_log_line_ms']:.1f} ms (from scratch "
                f"{row['epsilon_from_scratch_ms']:.1f} ms; eps {row['epsilon']:.3f}); mean "
                f"{row['filter_and_record_mean_ms']:.1f} ms, certificates "
                f"{row['certificates']}, grid level {row['grid_level']}",
                flush=True,
            )
            store([row], args.out)


if __name__ == "__main__":
    main()
