"""``dptrain epsilon`` and ``dptrain calibrate``: privacy accounting from the command line.

    dptrain epsilon --sample-rate 0.01 --noise-multiplier 1.0 --steps 1000 --delta 1e-5
    dptrain epsilon --sample-rate 0.01 --phase 1.0:500 --phase 2.0:500 --delta 1e-5 --json
    dptrain epsilon --run runs/my-run                # ledger.json, delta from run.json
    dptrain epsilon --run runs/my-federated-run      # run.json client_guarantee (every client)
    dptrain epsilon --run runs/my-run --plot         # and (re)draw report/privacy.png (public)
                                                     # and private/training.png (dptrain.figures)
    dptrain calibrate --epsilon 8 --delta 1e-5 --sample-rate 0.01 --steps 1000 --accountant prv

Each handler returns an exit code: 0 on success, 2 on bad input (with a message on stderr that
names the flag and the fix; no traceback).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

from accountants import (
    POISSON_GAUSSIAN,
    EpsilonUnreachableError,
    Event,
    Ledger,
    LedgerError,
    UnsupportedEventError,
    calibrate_noise,
    get_accountant,
)
from accountants.grid import composition

from ..errors import USER_ERROR_EXIT
from ..noise import truncation_delta

ACCOUNTANTS = ("rdp", "prv", "pld")


class _InputError(Exception):
    """Bad command-line input; the message names the flag and the fix."""


# -- argument types (argparse reports "argument --flag: message" and exits with 2) -----------


def _number(text: str, flag_hint: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number; {flag_hint}") from None
    if math.isnan(value):
        raise argparse.ArgumentTypeError(f"NaN is not allowed; {flag_hint}")
    return value


def sample_rate(text: str) -> float:
    value = _number(text, "give the Poisson sampling rate q in (0, 1], e.g. 0.01")
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(
            f"{text} is outside (0, 1]; give the Poisson sampling rate q = expected batch size / "
            "dataset size, e.g. 0.01"
        )
    return value


def noise_multiplier(text: str) -> float:
    value = _number(text, "give sigma = noise std / clipping norm, e.g. 1.0")
    if value < 0:
        raise argparse.ArgumentTypeError(
            f"{text} is negative; give sigma >= 0 (noise std / clipping norm), e.g. 1.0"
        )
    return value


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer; give e.g. 1000") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not positive; give at least 1")
    return value


def delta_value(text: str) -> float:
    value = _number(text, "give delta in (0, 1), e.g. 1e-5 (below 1 / dataset size)")
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(
            f"{text} is outside (0, 1); give delta in (0, 1), e.g. 1e-5 (below 1 / dataset size)"
        )
    return value


def epsilon_value(text: str) -> float:
    value = _number(text, "give the target epsilon, e.g. 8")
    if not 0 < value < math.inf:
        raise argparse.ArgumentTypeError(f"{text} is not a positive finite epsilon; e.g. 8")
    return value


def tolerance(text: str) -> float:
    value = _number(text, "give a relative tolerance, e.g. 1e-3")
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"{text} is outside (0, 1); e.g. 1e-3")
    return value


def phase(text: str) -> tuple[float, int, float | None]:
    """``NOISE:STEPS`` or ``NOISE:STEPS:RATE``."""
    parts = text.split(":")
    usage = "expected NOISE:STEPS or NOISE:STEPS:RATE, e.g. --phase 1.0:500 or 1.0:500:0.01"
    if len(parts) not in (2, 3):
        raise argparse.ArgumentTypeError(f"{text!r}: {usage}")
    try:
        sigma = noise_multiplier(parts[0])
        steps = positive_int(parts[1])
        rate = sample_rate(parts[2]) if len(parts) == 3 else None
    except argparse.ArgumentTypeError as err:
        raise argparse.ArgumentTypeError(f"{text!r}: {err} ({usage})") from None
    return sigma, steps, rate


# -- registration ------------------------------------------------------------------------------


def register(subparsers: Any) -> None:
    """Add the ``epsilon`` and ``calibrate`` subcommands to an argparse subparsers object."""
    eps = subparsers.add_parser(
        "epsilon",
        help="epsilon spent by a training schedule or a run's ledger",
        description=(
            "Epsilon at --delta of Poisson-subsampled Gaussian steps: one phase "
            "(--noise-multiplier/--steps), several (--phase, repeatable), or a run's ledger "
            "(--run). Reported values are upper bounds."
        ),
    )
    eps.add_argument("--sample-rate", type=sample_rate, metavar="Q", help="Poisson sampling rate")
    eps.add_argument(
        "--noise-multiplier",
        type=noise_multiplier,
        metavar="SIGMA",
        help="noise std / clipping norm (inf: no privacy cost)",
    )
    eps.add_argument("--steps", type=positive_int, metavar="N", help="number of steps")
    eps.add_argument(
        "--phase",
        type=phase,
        action="append",
        metavar="NOISE:STEPS[:RATE]",
        help="a phase of STEPS steps at noise NOISE (and sampling rate RATE, default "
        "--sample-rate); repeat for a heterogeneous schedule",
    )
    eps.add_argument("--run", type=Path, metavar="RUN_DIR", help="read RUN_DIR/ledger.json")
    eps.add_argument(
        "--delta", type=delta_value, help="target delta (with --run: default from run.json)"
    )
    eps.add_argument(
        "--accountant",
        choices=ACCOUNTANTS,
        default=None,
        help="rdp (default; with --run: the run's accountant), prv or pld",
    )
    eps.add_argument(
        "--adaptive",
        action="store_true",
        help="report epsilon valid under fully adaptive composition (rdp only; the default "
        "for --run of a run whose policy chose its noise from data)",
    )
    eps.add_argument(
        "--plot",
        action="store_true",
        help="with --run: (re)draw RUN_DIR/report/privacy.png (public: epsilon per step from "
        "the ledger, at this --delta and --accountant) and, where RUN_DIR/private/metrics.jsonl "
        "exists, RUN_DIR/private/training.png (private: loss, validation, diagnostics); needs "
        "matplotlib (dptrain[plots])",
    )
    eps.add_argument("--json", action="store_true", help="print one JSON object")
    eps.set_defaults(func=run_epsilon)

    cal = subparsers.add_parser(
        "calibrate",
        help="smallest noise multiplier meeting a target (epsilon, delta)",
        description="Smallest noise multiplier whose epsilon at --delta is at most --epsilon "
        "after --steps steps at --sample-rate (rounded up to relative --tol).",
    )
    cal.add_argument("--epsilon", type=epsilon_value, required=True, help="target epsilon")
    cal.add_argument("--delta", type=delta_value, required=True)
    cal.add_argument("--sample-rate", type=sample_rate, required=True, metavar="Q")
    cal.add_argument("--steps", type=positive_int, required=True, metavar="N")
    cal.add_argument("--accountant", choices=ACCOUNTANTS, default="rdp")
    cal.add_argument("--tol", type=tolerance, default=1e-3, help="relative tolerance on sigma")
    cal.add_argument("--json", action="store_true", help="print one JSON object")
    cal.set_defaults(func=run_calibrate)


# -- handlers ----------------------------------------------------------------------------------


def _fail(command: str, message: str) -> int:
    print(f"dptrain {command}: error: {message}", file=sys.stderr)
    return USER_ERROR_EXIT


def _json_number(x: float) -> float | str:
    return x if math.isfinite(x) else "inf"


def _events_from_flags(args: argparse.Namespace) -> list[Event]:
    if args.phase:
        if args.noise_multiplier is not None or args.steps is not None:
            raise _InputError(
                "--phase cannot be combined with --noise-multiplier/--steps; give the whole "
                "schedule as --phase NOISE:STEPS entries"
            )
        events = []
        for sigma, steps, rate in args.phase:
            rate = rate if rate is not None else args.sample_rate
            if rate is None:
                raise _InputError(
                    "--phase without a RATE needs --sample-rate; add --sample-rate Q or write "
                    "the phase as NOISE:STEPS:RATE"
                )
            events.append(Event(rate, sigma, steps))
        return events
    missing = [
        flag
        for flag, value in (
            ("--sample-rate", args.sample_rate),
            ("--noise-multiplier", args.noise_multiplier),
            ("--steps", args.steps),
        )
        if value is None
    ]
    if missing:
        raise _InputError(
            f"missing {', '.join(missing)}; give --sample-rate, --noise-multiplier and --steps, "
            "or --phase NOISE:STEPS entries, or --run RUN_DIR"
        )
    return [Event(args.sample_rate, args.noise_multiplier, args.steps)]


def _read_meta(run: Path) -> dict[str, Any]:
    """``run.json`` of ``run`` ({} when it has none)."""
    meta_path = run / "run.json"
    if not meta_path.exists():
        return {}
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise _InputError(
            f"--run {run}: {meta_path} is not valid JSON ({err}); repair it or pass --delta"
        ) from None
    return meta if isinstance(meta, dict) else {}


def _check_run_args(args: argparse.Namespace) -> None:
    run: Path = args.run
    if args.phase or args.noise_multiplier is not None or args.steps is not None:
        raise _InputError(
            "--run reads the schedule from the run's ledger; drop --phase/--noise-multiplier/"
            "--steps"
        )
    if not run.is_dir():
        raise _InputError(
            f"--run {run}: no such run directory. Fix: pass the output directory of a "
            "`dptrain train` run"
        )


def _federated_guarantee(args: argparse.Namespace, meta: dict[str, Any]) -> dict[str, Any]:
    """The record-level guarantee a federated server run states for every client
    (``client_guarantee`` of its run.json: a function of the recipe, at the recipe's
    accountant and delta), or why there is none.  A federated run directory has no
    record-level ledger (each client keeps its own, in its state directory): the flags that
    would recompute one are refused."""
    run = args.run
    given = [
        flag
        for flag, value in (
            ("--delta", args.delta),
            ("--accountant", args.accountant),
            ("--adaptive", args.adaptive or None),
        )
        if value is not None
    ]
    if given:
        raise _InputError(
            f"--run {run} is a federated server run: its guarantee for every client is "
            "stated once, at the recipe's accountant and delta (run.json client_guarantee); "
            f"drop {', '.join(given)}. For one client's lifetime spend, read its own ledger: "
            "dptrain epsilon --run STATE_DIR/client-K --delta D"
        )
    g = meta.get("client_guarantee")
    if not isinstance(g, dict):
        raise _InputError(
            f"--run {run}: a federated run whose run.json has no client_guarantee (it has "
            "not started its first round, or an older dptrain wrote it): no bound to report. "
            "Fix: rerun it with this dptrain, or read each client's own ledger"
        )
    eps = g.get("epsilon")
    if not isinstance(eps, int | float) or isinstance(eps, bool):
        raise _InputError(
            f"--run {run}: this federated run states no record-level bound from its recipe "
            f"alone (basis {g.get('basis')!r}): {g.get('statement')}. Each client's own "
            "ledger holds its spend: dptrain epsilon --run STATE_DIR/client-K --delta D"
        )
    return g


def _print_federated(args: argparse.Namespace, meta: dict[str, Any], g: dict[str, Any]) -> None:
    """Print :func:`_federated_guarantee`'s bound (and, under client-level DP, the
    client-level guarantee run.json states when the run finished)."""
    eps, delta, term = float(g["epsilon"]), g.get("delta"), g.get("delta_noise_truncation")
    seed = meta.get("insecure_seed")
    client_level = None
    if meta.get("client_dp") is not None and meta.get("client_dp_epsilon") is not None:
        client_level = (float(meta["client_dp_epsilon"]), float(meta["client_dp_delta"]))
    if args.json:
        out: dict[str, Any] = {
            "run": str(args.run),
            "kind": "federated",
            "unit": "each record of each client (each person, for a client with its own unit)",
            "epsilon": _json_number(eps),
            "delta": delta,  # null: each client's 1/(10 N_k)
            "delta_noise_truncation": term,
            "delta_total": delta + term if delta is not None and term is not None else None,
            "noise_pairs": g.get("noise_pairs"),
            "accountant": g.get("accountant"),
            "basis": g.get("basis"),
            "statement": g.get("statement"),
            "insecure_seed": seed,
            "guarantee": seed is None and math.isfinite(eps),
        }
        if client_level is not None:
            out["client_dp_epsilon"], out["client_dp_delta"] = client_level
        print(json.dumps(out))
        return
    shown_delta = f"{delta:g}" if delta is not None else "1/(10 N_k) of each client"
    shown_term = f"{term:.2g}" if term is not None else "the noise sampler's truncation term"
    rows = [
        ("accountant", str(g.get("accountant"))),
        ("run", f"{args.run} (federated: every client, this server run)"),
        ("basis", str(g.get("basis"))),
        ("delta", f"{shown_delta} + {shown_term} (noise truncation)"),
        ("epsilon", f"{eps:.4f} (each record of each client)"),
    ]
    if client_level is not None:
        rows.append(
            ("client-level DP", f"epsilon {client_level[0]:.4f} at delta {client_level[1]:.3g}")
        )
    _print_table(rows)


def _read_run(
    args: argparse.Namespace,
) -> tuple[list[Event], float | None, str | None, bool, dict[str, Any]]:
    run: Path = args.run
    try:
        ledger = Ledger.load(run / "ledger.json")
    except LedgerError as err:
        raise _InputError(
            f"--run {run}: {err}. Fix: point --run at a run directory whose ledger.json was "
            "written by dptrain (a run that has not started has no ledger)"
        ) from None
    delta: float | None = None
    accountant = None
    adaptive = False  # a run whose noise was chosen from data reports the adaptive conversion
    meta = _read_meta(run)
    if meta:
        accountant = meta.get("accountant")
        adaptive = meta.get("adaptive") is True
        value = meta.get("delta")
        if isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value < 1:
            delta = float(value)
        elif value is not None and args.delta is None:
            raise _InputError(
                f"--run {run}: run.json has delta={value!r}, not a number in (0, 1); "
                "pass --delta explicitly"
            )
    if accountant not in ACCOUNTANTS:
        accountant = None
    return ledger.events, delta, accountant, adaptive, meta


def unit_claim(meta: dict[str, Any], epsilon: float, delta: float) -> dict[str, Any] | None:
    """The guarantee per privacy unit of a person-level run (``run.json``'s ``privacy_unit``)
    from the ledger's ``(epsilon, delta)``; None for a record-level run.  Strategy ``user``:
    the ledger is over people, so the same numbers; ``example``: the ledger is per record, and a
    person of at most ``k`` records gets group privacy ``(k eps, delta sum_(i<k) e^(i eps))``
    (:func:`dptrain.user_level.group_privacy`), ``k`` times the ledger's epsilon."""
    unit = meta.get("privacy_unit")
    if not isinstance(unit, dict):
        return None
    name, strategy, k = unit.get("unit", "person"), unit.get("strategy"), unit.get("group_size")
    if strategy == "user":
        return {"unit": name, "strategy": strategy, "epsilon": epsilon, "delta": delta}
    if strategy != "example" or not isinstance(k, int) or k < 1:
        raise _InputError(
            f"run.json's privacy_unit {unit!r} names no strategy and group size this version "
            "can account; read run.json's person_level instead"
        )
    if unit.get("max_records_per_person") != k:
        # an uncapped run of an older version: k was the data's largest count of records of
        # one person, a private statistic the run published (and calibrated to), so no
        # per-person claim follows from the ledger
        raise _InputError(
            f"run.json's privacy_unit has strategy example with group size {k} but "
            f"max_records_per_person {unit.get('max_records_per_person')!r}: the group size "
            "was the training data's largest number of records of one person, a private "
            "statistic, so the run has no per-person guarantee this version can state. Fix: "
            "train again with data.privacy_unit.max_records_per_person (a public cap), or "
            "strategy user"
        )
    if not math.isfinite(epsilon) or k * epsilon > 700:
        return {"unit": name, "strategy": strategy, "epsilon": math.inf, "delta": 1.0}
    from ..user_level import group_privacy  # imports torch: only for a person-level run

    group_eps, group_delta = group_privacy(epsilon, delta, k)
    return {
        "unit": name,
        "strategy": strategy,
        "group_size": k,
        "epsilon": group_eps,
        "delta": group_delta,
    }


def _describe(e: Event) -> str:
    kind = (
        ""
        if e.kind == POISSON_GAUSSIAN
        else f" ({e.kind} " + " ".join(f"{k}={v:g}" for k, v in e.params) + ")"
    )
    return f"q={e.sample_rate:g} sigma={e.noise_multiplier:g} steps={e.steps}{kind}"


def _print_table(rows: list[tuple[str, str]]) -> None:
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")


def run_epsilon(args: argparse.Namespace) -> int:
    """Handler of ``dptrain epsilon``."""
    try:
        run_accountant, meta, run_delta = None, {}, None
        if args.plot and args.run is None:
            raise _InputError(
                "--plot draws a run's figures; add --run RUN_DIR (a `dptrain train` output)"
            )
        if args.plot:
            from ..extras import require

            require("matplotlib", "plots", "dptrain epsilon --plot")  # before any work
        if args.run is not None:
            _check_run_args(args)
            meta = _read_meta(args.run)
            if meta.get("kind") == "federated":
                if args.plot:
                    raise _InputError(
                        f"--run {args.run} is a federated server run: it has no record-level "
                        "ledger to plot. Fix: drop --plot, or plot a client's own ledger "
                        "(dptrain epsilon --run STATE_DIR/client-K --delta D --plot)"
                    )
                _print_federated(args, meta, _federated_guarantee(args, meta))
                _warn_insecure(args.run, meta.get("insecure_seed"))
                return 0
            events, run_delta, run_accountant, run_adaptive, meta = _read_run(args)
            args.adaptive = args.adaptive or run_adaptive
            delta = args.delta if args.delta is not None else run_delta
            if delta is None:
                raise _InputError(
                    f"--run {args.run}: run.json has no delta; pass --delta (e.g. 1e-5)"
                )
        else:
            events = _events_from_flags(args)
            if args.delta is None:
                raise _InputError("missing --delta; give the target delta, e.g. --delta 1e-5")
            delta = args.delta
        name = args.accountant or run_accountant or "rdp"
        if args.adaptive and name != "rdp":
            raise _InputError(
                f"--adaptive needs --accountant rdp ({name} is not valid under adaptive "
                "composition)"
            )
    except _InputError as err:
        return _fail("epsilon", str(err))

    accountant = get_accountant(name)
    try:
        if args.adaptive:
            epsilon = accountant.adaptive_epsilon(events, delta)  # type: ignore[attr-defined]
        else:
            epsilon = accountant.epsilon(events, delta) if events else 0.0
    except UnsupportedEventError as err:
        return _fail("epsilon", f"--accountant {name}: {err}")
    steps = sum(e.steps for e in events)
    spent = epsilon
    certified = True
    if args.run is not None and args.adaptive:
        # a privacy filter certifies its budget (at the run's delta), not its spend so far
        budget = meta.get("epsilon_budget")
        if isinstance(budget, int | float) and delta == run_delta:
            epsilon = max(spent, float(budget))
        else:
            certified = False
    pairs = meta.get("noise_pairs", 0) if args.run is not None else 0
    pairs = pairs if isinstance(pairs, int) and pairs >= 0 else 0
    term = truncation_delta(epsilon, pairs)
    seed = meta.get("insecure_seed")
    figures = _plot(args, delta, name) if args.plot else {}
    try:  # a person-level run: the ledger's epsilon is per record for strategy example
        per_unit = unit_claim(meta, epsilon, delta + term) if args.run is not None else None
    except _InputError as err:
        return _fail("epsilon", str(err))
    # a warm-started rl run: records shared with the source are covered only by the
    # composition of both guarantees (run.json's claim, stated at the run's delta)
    shared = meta.get("shared_with_warm_start") if args.run is not None else None
    shared = shared if isinstance(shared, dict) else None
    if args.json:
        out = {
            "epsilon": _json_number(epsilon),
            "delta": delta,
            "delta_noise_truncation": term,
            "delta_total": delta + term,
            "accountant": name,
            "composition": composition(accountant, events),
            "adaptive": bool(args.adaptive),
            "steps": steps,
            "events": [e.to_dict() for e in events],
        }
        if args.run is not None:
            out["run"] = str(args.run)
            out["insecure_seed"] = seed
            out["guarantee"] = seed is None and certified and math.isfinite(epsilon)
            if args.adaptive:
                out["epsilon_spent_adaptive"] = _json_number(spent)
            if shared is not None:
                out["shared_with_warm_start"] = shared
            out["privacy_unit"] = "record" if per_unit is None else per_unit["unit"]
            if per_unit is not None:  # the run's headline is per person
                out["per_unit"] = {**per_unit, "epsilon": _json_number(per_unit["epsilon"])}
                out["epsilon_unit"] = "record" if per_unit["strategy"] == "example" else "person"
            if args.plot:
                out["figures"] = figures
        print(json.dumps(out))
    else:
        rows = [("accountant", name + (" (adaptive)" if args.adaptive else ""))]
        if args.run is not None:
            rows.append(("run", str(args.run)))
        rows += [(f"phase {i + 1}", _describe(e)) for i, e in enumerate(events)]
        rows += [("steps", str(steps))]
        if args.run is not None:
            rows.append(("delta", f"{delta:g} + {term:.2g} (noise truncation) = {delta + term:g}"))
        else:
            rows.append(("delta", f"{delta:g}"))
        label = "epsilon (filter budget)" if args.adaptive and certified else "epsilon"
        if per_unit is not None and per_unit["strategy"] == "example":
            label += " per record"
        rows.append((label, f"{epsilon:.4f}"))
        if shared is not None:
            rows.append(
                (
                    "shared records",
                    f"({shared.get('epsilon')}, {shared.get('delta')})-DP for records shared "
                    f"with {shared.get('run')} (the agent was warm-started from it: run.json)",
                )
            )
        if per_unit is not None:
            how = (
                f"group privacy over {per_unit['group_size']} records"
                if per_unit["strategy"] == "example"
                else "user-level sampling and clipping"
            )
            rows.append(
                (
                    f"per {per_unit['unit']}",
                    f"({per_unit['epsilon']:.4f}, {per_unit['delta']:.3g})-DP over all of their "
                    f"records ({how}): the run's guarantee",
                )
            )
        if getattr(accountant, "grid_level", None) is not None and events:
            rows.append(("composition", composition(accountant, events)))
        if args.adaptive and args.run is not None:
            rows.append(("spent so far", f"{spent:.4f} (an odometer reading, not a guarantee)"))
            if not certified:
                rows.append(("note", "the filter certifies its budget at the run's delta only"))
        rows += [(f"figure ({'PRIVATE' if k == 'private' else k})", f) for k, f in figures.items()]
        _print_table(rows)
    _warn_insecure(args.run, seed)
    return 0


def _plot(args: argparse.Namespace, delta: float, accountant: str) -> dict[str, str]:
    """Draw the run's figures (:func:`dptrain.figures.render_run`) at the reported ``delta``
    and ``accountant``: ``{"public": path}``, and ``"private"`` where one was drawn."""
    from ..figures import render_run

    public, training = render_run(
        args.run, delta=delta, accountant=accountant, adaptive=bool(args.adaptive)
    )
    paths = {"public": str(public.path)}
    if training is not None:
        paths["private"] = str(training.path)
    return paths


def _warn_insecure(run: Path | None, seed: Any) -> None:
    if seed is not None:
        print(
            f"warning: {run} used privacy.insecure_seed={seed}: NO privacy guarantee "
            "against anyone who knows that seed",
            file=sys.stderr,
        )


def run_calibrate(args: argparse.Namespace) -> int:
    """Handler of ``dptrain calibrate``."""
    try:
        sigma = calibrate_noise(
            args.epsilon, args.delta, args.sample_rate, args.steps, args.accountant, tol=args.tol
        )
    except EpsilonUnreachableError as err:  # anything else is a bug and shows as one
        return _fail("calibrate", str(err))
    achieved = get_accountant(args.accountant).epsilon(
        [Event(args.sample_rate, sigma, args.steps)], args.delta
    )
    out = {
        "noise_multiplier": sigma,
        "epsilon": achieved,
        "target_epsilon": args.epsilon,
        "delta": args.delta,
        "sample_rate": args.sample_rate,
        "steps": args.steps,
        "accountant": args.accountant,
        "tol": args.tol,
    }
    if args.json:
        print(json.dumps(out))
    else:
        _print_table(
            [
                ("noise multiplier", f"{sigma:.6g}"),
                ("epsilon", f"{achieved:.4f} (target {args.epsilon:g})"),
                ("delta", f"{args.delta:g}"),
                ("sample rate", f"{args.sample_rate:g}"),
                ("steps", str(args.steps)),
                ("accountant", args.accountant),
            ]
        )
    return 0


__all__ = ["register", "run_calibrate", "run_epsilon"]
