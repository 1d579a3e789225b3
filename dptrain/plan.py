"""The run plan: every privacy value of a run, resolved once from the recipe and the data size.

One path down from the recipe to the engine's release (nothing is read back up)::

    recipe.training  (batch_size | sample_rate, steps | epochs)  + N (public)
    recipe.privacy   (epsilon, delta, accountant)
        -> plan_privacy:  q = B / N,  delta (default 1 / (10 N), announced once),  T steps
    recipe.policy    (name, clip, noise_multiplier, options; validated with the registry,
                      accountant rule included, when the recipe was parsed)
        -> policy_from_recipe -> policy with policy.noise_multiplier =
               the recipe's value                                   (noise_source "recipe")
             | run.json's calibrated_noise_multiplier, on resume    ("restored")
             | policy.calibrate(epsilon, delta, sample_rate=q, steps=T, accountant)
                                                                    ("calibrated")
             | a sigma calibrate() found for the same plan (an audit shadow model: its run's,
               CalibratedNoise)                                      ("reused")
    RunPlan(q, delta, T, policy, accountant, budget = (epsilon, delta))
        -> check_run: public data present if the policy needs it; the budget not spent and
           at least one step of the planned event fitting it -- before the model loads
        -> PrivacyEngine(policy=plan.policy, sample_rate=q, accountant=plan.accountant,
                         budget=plan.budget)            (dptrain.train.build; federated client)
        -> each step: policy.plan(context) gives C_g and s_g (static: s_g = sigma C, sigma =
           policy.noise_multiplier); the budget filter admits policy.event(plan); the
           release is policy.release(sums, plan, noise) = (sum_b clip(g_b) + N(0, s_g^2 I)) / qN

Who takes this path: :func:`dptrain.train.prepare` (on resume with ``restored_noise`` from
``run.json``; the checkpoint restores policy state, never the noise: the rl policy refuses a
checkpoint paced around another ``sigma_ref``), the federated client
(:func:`dptrain.federated.client.plan_client`, calibrated for ``rounds x steps``; its engine's
budget is the client's own), and audit shadow models (each a fresh :func:`dptrain.train.train`
run, which reuses its run's calibrated sigma when its plan is the run's: :class:`CalibratedNoise`).  The white-box audit reads ``(q, sigma)`` back from the ledger on purpose: it tests the
released mechanism the claim was computed from.

The resolved values are written once, to ``run.json`` (:meth:`RunPlan.meta`); ``recipe.yaml``
keeps what the user wrote.  :func:`guarantee_numbers` turns the plan and the ledger's spend
into the reported guarantee.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from accountants import Budget, BudgetFilter, Event, Ledger

from .errors import RecipeError
from .noise import truncation_delta
from .policies import Policy, policy_from_recipe
from .policies.registry import PolicyTraits
from .recipe import check_against_data

if TYPE_CHECKING:
    from .recipe import Recipe

NoiseSource = Literal["recipe", "calibrated", "restored", "reused"]


@dataclass(frozen=True)
class CalibratedNoise:
    """A sigma that ``policy.calibrate`` found for one plan: the target epsilon, delta, sample
    rate, steps, accountant and the recipe's policy section (its dump).  Calibration is a
    deterministic function of these public values, so a plan equal in all of them may take
    the sigma instead of calibrating again (:func:`plan_privacy`; the audit's shadow models
    reuse their run's); a plan that differs in any calibrates as usual."""

    sigma: float
    epsilon: float
    delta: float
    sample_rate: float
    steps: int
    accountant: str
    policy: dict[str, Any]

    @classmethod
    def of_run(cls, meta: dict[str, Any], recipe: Recipe) -> CalibratedNoise | None:
        """The calibration a record-level run made, from its ``run.json`` (``meta``) and its
        recipe; None if it made none (the recipe gave sigma, or the run is person-level)."""
        sigma = meta.get("calibrated_noise_multiplier")
        if sigma is None or recipe.policy.noise_multiplier is not None:
            return None
        if recipe.data.privacy_unit is not None:  # plan_unit: a person-level calibration
            return None
        return cls(
            float(sigma),
            float(meta["epsilon_budget"]),
            float(meta["delta"]),
            float(meta["sample_rate"]),
            int(meta["planned_steps"]),
            str(meta["accountant"]),
            recipe.policy.model_dump(mode="json"),
        )

    def matches(
        self, recipe: Recipe, *, delta: float, sample_rate: float, steps: int, accountant: str
    ) -> bool:
        """Whether a plan of ``recipe`` with these resolved values calibrates to this sigma."""
        return (
            self.epsilon == recipe.privacy.epsilon
            and self.delta == delta
            and self.sample_rate == sample_rate
            and self.steps == steps
            and self.accountant == accountant
            and self.policy == recipe.policy.model_dump(mode="json")
        )


@dataclass
class RunPlan:
    """A run's resolved privacy parameters (see the module docstring)."""

    recipe: Recipe
    dataset_size: int  # N: public, it sets q and the default delta
    sample_rate: float
    delta: float
    delta_defaulted: bool  # privacy.delta was not set: 1 / (10 N)
    steps: int
    policy: Policy  # its noise_multiplier resolved
    noise_source: NoiseSource
    accountant: str  # the accountant the guarantee rests on
    budget: Budget

    @property
    def noise_multiplier(self) -> float | None:
        return self.policy.noise_multiplier

    @property
    def adaptive(self) -> bool:
        return self.policy.adaptive

    @property
    def calibrated_noise_multiplier(self) -> float | None:
        """The noise the run resolved itself (calibrated, or restored on resume); None when the
        recipe gave it.  Kept in ``run.json`` so a resumed run keeps it whatever its length."""
        return None if self.noise_source == "recipe" else self.policy.noise_multiplier

    def meta(self) -> dict[str, Any]:
        """The plan's ``run.json`` fields."""
        return {
            "sample_rate": self.sample_rate,
            "delta": self.delta,
            "epsilon_budget": self.recipe.privacy.epsilon,
            "accountant": self.accountant,
            "adaptive": self.adaptive,
            "planned_steps": self.steps,
            "policy": self.policy.describe(),
            "calibrated_noise_multiplier": self.calibrated_noise_multiplier,
            "grouping": self.recipe.policy.grouping,
        }


def plan_privacy(
    recipe: Recipe,
    dataset_size: int,
    *,
    repeats: int = 1,
    restored_noise: float | None = None,
    unit: str = "records",
    calibrated: CalibratedNoise | None = None,
) -> RunPlan:
    """Resolve ``q``, delta, steps and the policy's noise for ``dataset_size`` training records.
    ``repeats``: the run's steps are taken this many times (a federated client's rounds of
    ``steps`` local steps), and the noise is calibrated for all of them; ``restored_noise``:
    the noise a resumed run was calibrated with (used when the recipe gives none); ``unit``:
    what ``dataset_size`` counts (records, or people for user-level DP,
    :mod:`dptrain.user_level`); ``calibrated``: a sigma calibrated for a plan, taken instead of
    calibrating when this plan equals it (:meth:`CalibratedNoise.matches`)."""
    q, delta, steps = check_against_data(recipe, dataset_size, unit)
    policy = policy_from_recipe(recipe.policy)
    accountant = recipe.privacy.accountant
    source: NoiseSource = "recipe"
    if policy.noise_multiplier is None and restored_noise is not None:
        policy.noise_multiplier, source = float(restored_noise), "restored"
    elif (
        policy.noise_multiplier is None
        and calibrated is not None
        and unit == "records"
        and calibrated.matches(
            recipe, delta=delta, sample_rate=q, steps=steps * repeats, accountant=accountant
        )
    ):
        policy.noise_multiplier, source = calibrated.sigma, "reused"
    elif policy.noise_multiplier is None:
        policy.calibrate(
            recipe.privacy.epsilon,
            delta,
            sample_rate=q,
            steps=steps * repeats,
            accountant=accountant,
        )
        source = "calibrated"
    return RunPlan(
        recipe,
        dataset_size,
        q,
        delta,
        recipe.privacy.delta is None,
        steps,
        policy,
        source,
        accountant,
        Budget(recipe.privacy.epsilon, delta),
    )


def steps_that_fit(
    policy: Policy, sample_rate: float, fil: BudgetFilter, ledger: Ledger, wanted: int
) -> tuple[Event, int] | None:
    """``(event, n)``: the policy's per-step event at ``sample_rate`` and the most further
    steps of it, up to ``wanted``, whose composition with ``ledger`` stays within ``fil``'s
    budget; None for policies that plan adaptively (the engine's own filter stops them step by
    step).  The fit check of a run (:func:`check_run`) and of a federated client's round; the
    search stops at ``wanted`` (a loose budget's full count can be too large to compose)."""
    event = policy.planned_event(sample_rate)
    if event is None:
        return None
    return event, fil.max_steps(ledger, event, cap=wanted)


PUBLIC_DATA_FIX = {
    "train": "set data.public_fraction (e.g. 0.02: that share of the records is declared public "
    "and left out of private training) or data.public_path (a file of public records).",
    # a server must not declare a share of a data holder's records public
    "federated": "set data.public_path (a file of public records, read by every client); a "
    "federated recipe cannot declare a share of a client's records public.",
}


def policy_setup_refusal(
    policy: PolicyTraits, *, public_records: int | None, world_size: int = 1, kind: str = "train"
) -> str | None:
    """Why ``policy`` cannot be set up for a run (None if it can): it evaluates the model on
    public data and the run has none, or it is adaptive and the run spans several processes.
    Checked before the model loads by ``dptrain train`` (:func:`check_run`), the federated
    server at start and each federated client before its first step (``kind``: whose fix)."""
    if policy.needs_public_data and public_records is None:
        return (
            f"policy.name: policy '{policy.name}' evaluates the model on public data. Fix: "
            + PUBLIC_DATA_FIX[kind]
        )
    if world_size > 1 and policy.adaptive:
        return (
            f"policy '{policy.name}' plans from each step's released outputs on one "
            "process; under --nproc the ranks would clip at different thresholds. Fix: run it "
            "with --nproc 1, or use policy static or error_feedback across processes."
        )
    return None


def check_policy_setup(
    policy: PolicyTraits, *, public_records: int | None, world_size: int = 1, kind: str = "train"
) -> None:
    """Raise :class:`RecipeError` with :func:`policy_setup_refusal`'s reason, if any."""
    reason = policy_setup_refusal(
        policy, public_records=public_records, world_size=world_size, kind=kind
    )
    if reason is not None:
        raise RecipeError(reason)


def check_run(
    plan: RunPlan, *, public_records: int | None, ledger: Ledger, world_size: int = 1
) -> int | None:
    """Refuse a run that cannot start, before the model loads; return how many more steps of
    the planned event fit the budget, up to the planned ``plan.steps`` (None for adaptive
    policies, stopped by the engine; 0 when the ledger holds them all: no step is left)."""
    policy = plan.policy
    check_policy_setup(policy, public_records=public_records, world_size=world_size)
    if ledger.total_steps >= plan.steps:  # no step left: the resume only writes the final model
        return 0
    fil = BudgetFilter(plan.budget, plan.accountant)
    wanted = plan.steps - ledger.total_steps
    fit = steps_that_fit(policy, plan.sample_rate, fil, ledger, wanted)
    if fit is None:
        return None
    event, fits = fit
    if fits == 0 and not ledger.events:
        one = fil.spent(Ledger([event.with_steps(1)]))
        raise RecipeError(
            f"privacy.epsilon: not even one step fits the budget ({plan.budget.epsilon:g}, "
            f"{plan.delta:.3g}): one step of q={plan.sample_rate:.4g}, "
            f"sigma={event.noise_multiplier:.4g} costs epsilon {one:.4g}. Nothing was spent. "
            "Fix: raise policy.noise_multiplier (or omit it, to calibrate the noise from the "
            "budget), lower the sample rate (training.batch_size), or raise privacy.epsilon."
        )
    if fits == 0:
        raise budget_spent(
            plan,
            fil,
            ledger,
            f"one more step of q={plan.sample_rate:.4g}, sigma={event.noise_multiplier:.4g} "
            "would exceed it",
        )
    return fits


def budget_spent(plan: RunPlan, fil: BudgetFilter, ledger: Ledger, why: str) -> RecipeError:
    """The refusal of a run whose budget is spent: ``fil``'s epsilon of ``ledger`` and ``why``
    no further step fits (the planned event's cost, or the adaptive filter's refusal)."""
    return RecipeError(
        f"privacy.epsilon: the budget ({plan.budget.epsilon}, {plan.delta:.3g}) is already "
        f"spent (epsilon {fil.spent(ledger):.4f} after {ledger.total_steps} steps; {why}). Fix: "
        "start a new run with fresh data or accept a larger epsilon in a new run."
    )


def check_not_stopped(plan: RunPlan, ledger: Ledger, stopped_at: int | None) -> None:
    """Refuse the resume of an adaptive run that an earlier session of the same plan stopped at
    the budget, when ``ledger`` (the one on disk) ends where it stopped (``stopped_at``: the
    steps of ``run.json``'s ``stopped_by_budget`` session with the same planned steps, else
    None).  The policy's next step is then the one the filter refused: its plan is a function of
    the checkpointed policy state, the ledger and the planned steps, and the filter's verdict of
    the ledger and that step; so it is refused again, here before the checkpoint and the model
    load (:func:`check_run` cannot price an adaptive step in advance)."""
    if not plan.adaptive or stopped_at is None or ledger.total_steps != stopped_at:
        return
    fil = BudgetFilter(plan.budget, plan.accountant, adaptive=True)
    raise budget_spent(
        plan,
        fil,
        ledger,
        f"the adaptive privacy filter refused step {stopped_at + 1}, the next step of this plan",
    )


def guarantee_numbers(plan: RunPlan, spent: float, noise_pairs: int) -> dict[str, Any]:
    """The run's reported guarantee (run.json keys): ``epsilon`` at ``delta_total`` = the
    accountant's delta + the noise sampler's truncation term (:func:`truncation_delta`).

    Adaptive policies: the certified epsilon is the privacy filter's budget, not the spend so
    far (``epsilon_spent_adaptive``, an odometer reading).  ``policy.warm_start``
    (``rl.init_from``): records shared with the warm-start run are covered by the composition of both certified
    guarantees.  ``file_level``: what holds for a record added to the data file
    (:func:`file_level`)."""
    recipe = plan.recipe
    eps = float(recipe.privacy.epsilon) if plan.adaptive else float(spent)
    term = truncation_delta(eps, noise_pairs)
    out: dict[str, Any] = {
        "epsilon": eps,
        "delta_noise_truncation": term,
        "delta_total": plan.delta + term,
        "noise_pairs": noise_pairs,
    }
    if plan.adaptive:
        out["epsilon_spent_adaptive"] = float(spent)
    warm_start = plan.policy.warm_start
    if warm_start is not None:
        out["shared_with_warm_start"] = {
            "run": warm_start["run"],
            "epsilon": eps + float(warm_start["epsilon"]),
            "delta": out["delta_total"] + float(warm_start["delta"]),
        }
    out["file_level"] = file_level(recipe, eps, out["delta_total"])
    return out


def file_level(recipe: Recipe, eps: float, delta: float) -> dict[str, Any]:
    """The guarantee for a record ``z`` added to ``data.path`` (the file), from the
    record-level ``(eps, delta)`` of the training split, for the published files (run.json,
    the ledger, the final model; counts such as N public, as for the record-level guarantee).

    Secret keyed coins put ``z`` in one split (:mod:`dptrain.data.splits`):

    - validation, with probability ``v = floor(validation_fraction 2^64) / 2^64`` (0 with
      ``data.validation_path``): the validation records are used without noise, but only for
      the perplexities in ``private/``, so the published files are distributed as without
      ``z``.  Publishing the validation perplexity voids this: ``z`` is then unprotected.
    - the public split (``data.public_fraction`` ``p``), with probability ``b = (1 - v) p``:
      declared public, used without noise (e.g. by the rl policy's public loss), unprotected.
    - training otherwise: the record-level guarantee.

    So ``M(F + z) = (1 - b) M_1 + b M_2`` with ``M_1`` ``(eps, delta)``-close to ``M(F)`` and
    ``M_2`` arbitrary, hence ``(eps, delta + b)``-DP in both directions.  ``data.max_records``
    keeps a count: ``z`` may push one kept record ``y`` out, so the private training sets are
    at distance 2 (group privacy: ``(2 eps, (1 + e^eps) delta)``) and ``y`` was public with
    probability ``p``: ``+ b + p``."""
    from .secret import threshold

    d = recipe.data
    v = 0.0 if d.validation_path else threshold(d.validation_fraction) / 2**64
    p = threshold(d.public_fraction) / 2**64 if d.public_fraction is not None else 0.0
    b = (1 - v) * p
    reasons = []
    if v > 0:
        reasons.append(
            f"a record of the file is held out for validation with probability {v:.3g}: the "
            "published files do not depend on it, as long as private/ (its validation metrics) stays "
            "private"
        )
    if d.max_records is None:
        level_eps, level_delta = eps, delta + b
    else:
        level_eps = 2 * eps
        group = (1 + math.exp(min(eps, 700.0))) * delta if math.isfinite(eps) else 1.0
        level_delta = group + b + p
        reasons.append(
            "data.max_records keeps a count, so an added record can swap another one out "
            "(group privacy over 2 records)"
        )
    if p > 0:
        reasons.append(
            f"a record is declared public with probability {b:.3g} and then unprotected "
            + (
                "(added to delta)"
                if d.max_records is None
                else f"(so may the swapped record: {p:.3g}; added to delta)"
            )
        )
    if not reasons:
        reasons.append("the training split is the whole file")
    return {
        "epsilon": level_eps,
        "delta": min(1.0, level_delta) if math.isfinite(eps) else 1.0,
        "validation_probability": v,
        "public_probability": b,
        "why": "; ".join(reasons),
    }
