"""Membership inference by PERSON against a run with ``data.privacy_unit`` (user-level DP).

The claim of such a run is for adding or removing one person with all of their records, so
the attacker here guesses, for a whole person, whether they were in the training data:

1. The claim: the run's ledger epsilon at its delta by its accountant (per person for the
   ``user`` strategy; for ``example``, group privacy over the run's ``group_size`` records).
2. The people: up to ``people`` training people (canaries excluded) and up to ``people`` held
   out ones -- the validation split holds out whole people (:func:`dptrain.data.splits.
   split_people`), so none of their records was trained on -- chosen at random (seeded).
3. Scores: every record of theirs through the final model and ``theta_0``; a person's score
   is a MEAN over their ``n_u`` records with a scored token (a record whose responses
   ``max_length`` cut off has no loss; a person with no such record is left out, counted in
   ``unscored``): ``loss`` = ``-mean_r mean_nll_final(r)``, ``drop`` =
   ``mean_r (sum_nll_theta0(r) - sum_nll_final(r))`` (how much more likely training made
   them).  Mean, not sum (:func:`person_scores`): training on the domain lowers the loss of
   non-members' records too, so a sum's location grows with ``n_u`` for members and
   non-members alike and one threshold over people of different sizes ranks record counts as
   much as membership; a mean's location does not depend on ``n_u`` (only its spread does).
   The likelihood ratio would be better still, but it needs each count's null distribution,
   i.e. reference people this audit does not have (no shadow runs).
4. ROC, AUC, TPR at FPR 1%, and the split-half Clopper-Pearson epsilon lower bound per person
   (Bonferroni over the two attacks).
5. Canary people (``data.canaries``): canary ``i`` is the person ``canary-<i>`` with its
   repetitions as records, and under a person unit EVERY canary person is included by a coin
   of the run key (probability 1/2, :func:`dptrain.data.canaries.make_canaries`); their loss
   drop per repetition count, and the one-run bound (Steinke, Nasr, Jagielski 2023) over the
   canary people, a rigorous lower bound on the per-person epsilon at the stated confidence
   (runs from before canary people had coins: over the single-record ones).  A canary
   person's score is the loss drop of its sentence (its records are that sentence repeated;
   the template, learned from every included canary, is common to all of them).

The report holds statistics of private people: it is for the data owner.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from dptrain.data.canaries import read_manifest
from dptrain.data.people import is_canary_person, read_people, recipe_person_ids
from dptrain.data.splits import split_data
from dptrain.errors import InputError
from dptrain.recipe import load_recipe
from dptrain.rundir import CheckpointError, RunDir
from dptrain.secret import run_key
from dptrain.tasks import task_for
from dptrain.user_level import group_privacy

from .audit import _split_half_bound, _starting_point, claimed_privacy, load_final_model
from .bounds import one_run_epsilon_best
from .metrics import roc_of
from .scores import score_texts

__all__ = ["audit_people", "person_scores"]


def audit_people(
    run_dir: str | Path,
    *,
    people: int = 64,
    batch_size: int = 16,
    confidence: float = 0.95,
    progress: bool = False,
) -> dict[str, Any]:
    """Audit the finished person-level run in ``run_dir`` by person; returns the summary
    (see the module docstring).  Refuses record-level runs (use ``dptrain audit``)."""
    run = RunDir(run_dir)
    meta = run.read_meta() if run.exists() else {}
    if meta.get("status") != "finished" or not run.final.exists():
        raise CheckpointError(f"{run.path}: no finished run with a final model to audit")
    unit = meta.get("privacy_unit", "record")
    if unit == "record":
        raise InputError(
            f"{run.path} protects records, not people. Fix: audit it with `dptrain audit`"
        )
    recipe = load_recipe(run.recipe)
    claim = claimed_privacy(run, meta, recipe)
    eps, delta = group_privacy(claim["epsilon"], claim["delta_total"], int(unit["group_size"]))
    key = run_key(run.path, recipe.privacy.insecure_seed, create=False)
    train, val, _ = split_data(recipe, key)  # `unused` may hold members' cut records: left out
    d = recipe.data
    persons = recipe_person_ids(recipe, unit["field"])  # as training read them (task records)
    rng = np.random.default_rng([recipe.seed, 0xA0D2])
    t_people, v_people = read_people(train, persons), read_people(val, persons)
    planted = d.canaries is not None  # then no real person has a canary's id (person_ids)
    mine = [p for p, u in enumerate(t_people.ids) if not (planted and is_canary_person(u))]
    members = rng.permutation(mine)[:people]
    outside = rng.permutation(len(v_people))[:people]
    if len(members) < 4 or len(outside) < 4:
        raise InputError(
            f"{run.path}: the audit by person needs at least 4 training and 4 held-out "
            f"people, found {len(members)} and {len(outside)}. Fix: raise "
            "data.validation_fraction (it holds out whole people)"
        )
    groups = [t_people.members[p] for p in members] + [v_people.members[p] for p in outside]
    texts = [train.texts[i] for g in groups[: len(members)] for i in g]
    texts += [val.texts[i] for g in groups[len(members) :] for i in g]
    ids = [train.ids[i] for g in groups[: len(members)] for i in g]
    ids += [val.ids[i] for g in groups[len(members) :] for i in g]
    owner = np.repeat(np.arange(len(groups)), [len(g) for g in groups])
    target, tokenizer = load_final_model(run, recipe)
    base = _starting_point(recipe)

    task = task_for(recipe)  # records encoded as training encoded them

    def score(model: Any, batch: list[str], rids: list[str]) -> Any:
        return score_texts(
            model, tokenizer, batch, max_length=d.max_length, batch_size=batch_size,
            progress=progress, task=task, ids=rids,
        )  # fmt: skip

    t, b = score(target, texts, ids), score(base, texts, ids)
    n = len(groups)
    # a record with no scored token (responses cut off by max_length) has no loss (NaN): a
    # person's score sums over their scored records; a person with none is left out
    scored = t.tokens > 0
    held = np.bincount(owner[scored], minlength=n) > 0
    attacks = {
        "loss": {"scores": -person_scores(owner, t.mean_nll, scored, n)[held]},
        "drop": {"scores": person_scores(owner, b.sum_nll - t.sum_nll, scored, n)[held]},
    }
    is_member = np.r_[np.ones(len(members), bool), np.zeros(len(outside), bool)]
    unscored = {
        "records": int((~scored).sum()),
        "members": int((~held & is_member).sum()),
        "non_members": int((~held & ~is_member).sum()),
    }
    is_member = is_member[held]
    if is_member.sum() < 2 or (~is_member).sum() < 2:
        raise InputError(
            f"{run.path}: after leaving out the people with no scored token within "
            f"data.max_length={d.max_length}, {int(is_member.sum())} training and "
            f"{int((~is_member).sum())} held-out people are left (at least 2 each). Fix: "
            "train with a larger data.max_length, so that every response keeps a token"
        )
    for a in attacks.values():
        r = roc_of(a["scores"], is_member)
        a["auc"], a["tpr_at_1pct_fpr"] = float(r.auc), float(r.tpr_at(0.01))
        a["balanced_accuracy"] = r.balanced_accuracy
    bound = _split_half_bound(attacks, is_member, delta, confidence, rng)
    summary: dict[str, Any] = {
        "unit": unit["unit"],
        "claim": {"epsilon": eps, "delta": delta, "strategy": unit["strategy"]},
        "members": int(is_member.sum()),
        "non_members": int((~is_member).sum()),
        "records": int(scored.sum()),
        "unscored": unscored,  # left out: no scored token within data.max_length
        "attacks": {k: {m: v for m, v in a.items() if m != "scores"} for k, a in attacks.items()},
        "clopper_pearson": bound,
        "canary_people": _canary_people(
            run.path,
            target,
            base,
            score,
            delta,
            confidence,
            unit["unit"],
            unit.get("max_records_per_person") if unit["strategy"] == "example" else None,
        ),
    }
    bounds = {"clopper_pearson": bound["epsilon"] if bound else 0.0}
    one_run = (summary["canary_people"] or {}).get("one_run")
    if one_run is not None:
        bounds["one_run"] = one_run["epsilon"]
    lower = max(bounds.values())
    summary["epsilon_lower_bounds"] = bounds  # each per person, beside the claim's epsilon
    summary["empirical_epsilon_lower_bound"] = lower
    summary["consistent"] = bool(lower <= eps or not math.isfinite(eps))
    return summary


def person_scores(owner: np.ndarray, values: np.ndarray, scored: np.ndarray, n: int) -> np.ndarray:
    """Per person ``u < n``: the mean of ``values[r]`` over their scored records ``r``
    (``owner[r] == u`` and ``scored[r]``); NaN for a person with none.  The mean keeps one
    threshold meaningful across people with different record counts (module docstring, 3)."""
    owner, scored = np.asarray(owner), np.asarray(scored, bool)
    count = np.bincount(owner[scored], minlength=n)
    total = np.bincount(owner[scored], np.asarray(values, float)[scored], minlength=n)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def _canary_people(
    run_dir: Path,
    target: Any,
    base: Any,
    score: Any,
    delta: float,
    confidence: float,
    unit: str,
    cap: int | None = None,
) -> dict[str, Any] | None:
    """Canary people: the loss drop of each (its repetitions are identical records, so one
    text scores them all) by repetition count, and the one-run bound over the canary people
    with an inclusion coin (every one; the single ones in a manifest without ``person_level``).
    ``cap``: strategy ``example``'s records kept per person, which caps a canary person like
    any other, so the counts are the copies trained on, ``min(repetitions, cap)``."""
    manifest = read_manifest(run_dir)
    if manifest is None:
        return None
    cs = manifest.canaries
    texts = [c.text(manifest.template) for c in cs]
    ids = [c.record_ids()[0] for c in cs]
    drop = score(base, texts, ids).sum_nll - score(target, texts, ids).sum_nll
    if np.isnan(drop).any():  # no scored token: refused when planted (check_canaries_fit)
        raise InputError(
            f"{run_dir}: a canary has no scored token within data.max_length, so the canaries "
            "cannot be audited. Fix: train again with a data.max_length that holds every "
            "canary sentence"
        )
    reps = np.array([c.repetitions for c in cs])
    trained = reps if cap is None else np.minimum(reps, cap)
    included = np.array([c.included for c in cs])
    out: dict[str, Any] = {
        "drop_by_repetitions": {
            str(k): float(drop[(trained == k) & included].mean())
            for k in sorted(set(trained.tolist()))
            if ((trained == k) & included).any()
        },
        "drop_not_inserted": float(drop[~included].mean()) if (~included).any() else None,
        **({"repetitions_capped_at": cap} if cap is not None else {}),
    }
    coined = np.ones(len(cs), bool) if manifest.person_level else reps == 1
    if coined.sum() >= 2:
        bound = one_run_epsilon_best(drop[coined], included[coined], delta, confidence)
        out["one_run"] = bound | {
            "unit": unit,
            "confidence": confidence,
            "over": f"every canary {unit}, each included by a coin of the run key"
            if manifest.person_level
            else "the single-record canaries (the only ones with a coin in this run)",
        }
    return out
