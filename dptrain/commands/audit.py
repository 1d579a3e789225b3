"""``dptrain audit RUN_DIR``: membership inference, canary exposure and empirical epsilon."""

from __future__ import annotations

import argparse

from . import quiet_library_bars


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "audit",
        help="attack a finished run: membership inference, canaries, empirical epsilon",
        description="Attack a finished run and compare what the attacks achieve with the "
        "accountant's epsilon. Writes RUN_DIR/audit/report.html and summary.json. Options "
        "default to the recipe's audit section, then to a quick audit.",
    )
    p.add_argument("run_dir", metavar="RUN_DIR", help="the output directory of `dptrain train`")
    p.add_argument("--members", type=int, help="training records to score (default 128)")
    p.add_argument("--non-members", type=int, help="held-out records to score (default 128)")
    p.add_argument("--population", type=int, help="RMIA population records (default 64)")
    p.add_argument(
        "--shadows",
        type=int,
        help="shadow models trained by the run's recipe on random halves of the data (even; "
        "cached in RUN_DIR/audit/shadows; default 0: theta_0 is the reference model)",
    )
    p.add_argument("--shadow-steps", type=int, help="steps per shadow model (default: the run's)")
    p.add_argument("--confidence", type=float, help="confidence of the lower bounds (default 0.95)")
    p.add_argument("--exposure-samples", type=int, help="candidates per canary when extrapolating")
    p.add_argument(
        "--whitebox",
        action="store_true",
        help="also run the white-box canary audit of the run's privacy configuration",
    )
    p.add_argument("--whitebox-canaries", type=int, help="white-box canaries (default 1000)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def _not_a_train_run(path: object, recipe: object) -> Exception:
    """What to audit instead of a federated run (it has no records or ledger of its own)."""
    from dptrain.errors import InputError

    f = getattr(recipe, "federated", None)
    state = getattr(f, "state_dir", None) or "STATE_DIR"
    return InputError(
        f"{path} is a {recipe.command} run, not a `dptrain train` run: its "  # type: ignore[attr-defined]
        "server holds no training records and no sample-level ledger. Each client's ledger "
        f"is in its own state directory ({state}/client-K). Fix: read a client's epsilon "
        f"with `dptrain epsilon --run {state}/client-K --delta DELTA`; to audit the training "
        "mechanism, audit a `dptrain train` run of the same model and policy (e.g. with "
        "data.canaries, or --whitebox)"
    )


def run(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from attacks.audit import audit_run
    from dptrain.recipe import AuditSection, RecipeError, load_recipe
    from dptrain.rundir import RunDir

    if args.no_progress:
        quiet_library_bars()
    run_dir = RunDir(args.run_dir)
    if run_dir.exists() and run_dir.read_meta().get("privacy_unit", "record") != "record":
        return _by_person(args, run_dir)
    base = AuditSection()
    if run_dir.recipe.exists():
        recipe = load_recipe(run_dir.recipe)
        if recipe.command != "train":
            raise _not_a_train_run(run_dir.path, recipe)
        base = recipe.audit or base
    flags = {
        "members": args.members,
        "non_members": args.non_members,
        "population": args.population,
        "shadows": args.shadows,
        "shadow_steps": args.shadow_steps,
        "confidence": args.confidence,
        "exposure_samples": args.exposure_samples,
        "whitebox": True if args.whitebox else None,
        "whitebox_canaries": args.whitebox_canaries,
    }
    changes = {k: v for k, v in flags.items() if v is not None}
    try:
        options = AuditSection.model_validate(base.model_dump() | changes)
    except ValidationError as err:  # only the flags' values: any other error is a bug
        msg = "; ".join(
            f"--{'-'.join(str(x) for x in e['loc']).replace('_', '-')}: {e['msg']}"
            for e in err.errors()
        )
        raise RecipeError(f"invalid audit option: {msg or err}") from None
    audit_run(run_dir.path, options, progress=not args.no_progress)
    return 0


def _by_person(args: argparse.Namespace, run_dir) -> int:
    """A person-level run: membership inference by person (:mod:`attacks.people`); writes
    RUN_DIR/audit/people.json (statistics of private people: for the data owner)."""
    import json

    from attacks.people import audit_people
    from dptrain.errors import InputError
    from dptrain.rundir import atomic_write

    if args.shadows or args.whitebox or args.population is not None:
        raise InputError(
            "--shadows / --whitebox / --population: not available for a person-level run "
            "(its audit is membership inference by person). Fix: drop the flag"
        )
    s = audit_people(
        run_dir.path,
        people=args.members or 64,
        confidence=args.confidence or 0.95,
        progress=not args.no_progress,
    )
    out = run_dir.path / "audit"
    out.mkdir(exist_ok=True)
    atomic_write(out / "people.json", lambda f: json.dump(s, f, indent=2, default=float))
    c, b = s["claim"], s["clopper_pearson"]
    print(f"audit by {s['unit']}: {s['members']} members, {s['non_members']} held-out people")
    print(f"claimed            ({c['epsilon']:.4f}, {c['delta']:.3g})-DP per {s['unit']}")
    for name, a in s["attacks"].items():
        print(f"{name:<18} AUC {a['auc']:.3f}  TPR@1%FPR {a['tpr_at_1pct_fpr']:.3f}")
    print(f"empirical epsilon  >= {b['epsilon']:.4f} ({b['attack']}, {b['confidence']:.0%})")
    one_run = (s["canary_people"] or {}).get("one_run")
    if one_run is not None:
        print(
            f"one-run epsilon    >= {one_run['epsilon']:.4f} per {one_run['unit']} "
            f"({one_run['canaries']} canary people, {one_run['correct']}/{one_run['guesses']} "
            f"guesses right, {one_run['confidence']:.0%})"
        )
    print(f"written            {out / 'people.json'}")
    return 0
