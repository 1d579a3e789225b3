"""Warm start of the rl policy's agent from an earlier run (``policy.rl.init_from``).

The agent is a function of that run's released outputs only, so reusing it costs nothing for
records private to this run alone; records private to both runs are covered by the
composition of both certified guarantees, which the run report states (:func:`warm_note`).
"""

from __future__ import annotations

from typing import Any

from accountants import Ledger
from accountants.rdp import RdpAccountant

from ...errors import RecipeError


def check_source(run_dir: str) -> None:
    """Refuse a warm-start source that is not a run directory."""
    from ...rundir import RunDir

    if not RunDir(run_dir).exists():
        raise RecipeError(
            f"policy.rl.init_from: {run_dir} is not a run directory (no run.json). Fix: point "
            "it at the output directory of an earlier rl run."
        )
    carved = carved_public_source(run_dir)
    if carved is not None:
        raise RecipeError(
            f"policy.rl.init_from: the agent of {carved} learnt from the loss on a public split "
            "that data.public_fraction carved out of its data file by its own secret key: those "
            "records were read without noise, and in this run they may be private training "
            "records, which the warm-started agent would then leak unaccounted. Fix: warm-start "
            "from a run whose public data is a separate file (data.public_path), or train the "
            "agent from scratch (drop policy.rl.init_from)."
        )


def carved_public_source(run_dir: str, depth: int = 0) -> str | None:
    """The run of the warm-start chain from ``run_dir`` (it, its own ``rl.init_from``, ...)
    whose recipe set ``data.public_fraction``, or None.  Such a run's agent is a function of
    un-noised records chosen by its key from its data file, which other runs of the same file
    hold as private records.  An unreadable recipe counts as one (it cannot be checked)."""
    import yaml

    from ...rundir import RunDir

    run = RunDir(run_dir)
    try:
        recipe = yaml.safe_load(run.recipe.read_text())
        data = recipe.get("data") or {}
        init = ((recipe.get("policy") or {}).get("rl") or {}).get("init_from")
    except (OSError, AttributeError, yaml.YAMLError):
        return str(run.path)
    if data.get("public_fraction") is not None:
        return str(run.path)
    if init is None:
        return None
    if depth >= 32:  # no run that long a chain is checked: refuse rather than guess
        return str(run.path)
    return carved_public_source(str(init), depth + 1)


def load_agent(agent: Any, run_dir: str) -> None:
    """Load the agent of the run in ``run_dir`` (networks, optimizers, replay buffer)."""
    from ...rundir import RunDir

    state = RunDir(run_dir).load_checkpoint()
    policy = (state or {}).get("engine", {}).get("policy", {})
    if not isinstance(policy, dict) or policy.get("agent") is None:
        raise RecipeError(
            f"policy.rl.init_from: {run_dir} has no checkpoint with an rl agent. Fix: point it at "
            "a run trained with policy rl that saved at least one checkpoint."
        )
    try:
        agent.load_state_dict(policy["agent"], rng=False)
    except ValueError as err:
        raise RecipeError(f"policy.rl.init_from: {run_dir}: {err}") from None


def source_info(run_dir: str) -> dict[str, Any]:
    """What the report must say about a warm start: the source run and its ledger."""
    from ...rundir import RunDir

    src = RunDir(run_dir)
    meta = src.read_meta()
    # A source that was itself warm-started has an agent that is a function of its own source's
    # released outputs too: records in every run of the chain are covered only by the
    # composition of all of them, which the source states as shared_with_warm_start (an upper
    # bound for records in fewer of the runs).  Its own epsilon alone would drop the earlier runs.
    claim = meta.get("shared_with_warm_start") or meta
    eps = claim.get("epsilon")
    delta = claim.get("delta_total", claim.get("delta"))
    if not isinstance(eps, int | float) or not isinstance(delta, int | float):
        raise RecipeError(
            f"policy.rl.init_from: {run_dir} states no certified (epsilon, delta) in run.json "
            "(it never reached the end of a session): a warm start composes with that "
            "guarantee. Fix: resume it until it finishes or pauses, or point at a finished run."
        )
    return {
        "run": str(src.path),
        "epsilon": float(eps),  # certified there (its filter's budget), composed over its chain
        "delta": float(delta),
        "ledger": Ledger.load(src.ledger).to_dict(),
    }


def warm_note(warm: dict[str, Any], ledger: Ledger | None, delta: float | None) -> str:
    """The report's note on a warm start (:func:`source_info`); with this run's ``ledger`` and
    ``delta``, also the filters' spend over both ledgers."""
    text = (
        f"the agent was warm-started from {warm['run']} ((epsilon {warm['epsilon']}, delta "
        f"{warm['delta']:.3g}) certified there): it is a function of that run's released "
        "outputs, so records private to both runs are covered only by the composition of "
        "both guarantees (the headline for those records)"
    )
    if ledger is not None and delta is not None:
        events = Ledger.from_dict(warm["ledger"]).events + ledger.events
        both = RdpAccountant().adaptive_epsilon(events, delta)
        text += (
            f"; the filters' spend over both ledgers is epsilon {both:.4f} at delta "
            f"{delta:.3g} (an odometer reading, not a guarantee)"
        )
    return text
