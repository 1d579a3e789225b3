"""``dptrain audit RUN_DIR``: what can an attacker actually do against a finished run?

Steps (each timed; the report says which dominated):

1. The claim: epsilon recomputed from ``ledger.json`` by the run's accountant at the run's delta.
2. The records: up to ``members`` training records (canaries excluded) and ``non_members``
   records the run never trained on (its validation split and the records cut by
   ``max_records`` / ``max_validation_records``), chosen at random (seeded), plus up to
   ``population`` other non-members for RMIA.  A record the run's encoding leaves without a
   scored token (its responses cut off by ``max_length``) has no loss to score: it is left
   out of the attacks and counted (``records.unscored`` in the summary), never scored 0.
3. Scores: every record through the final model and through the run's starting point
   ``theta_0`` (and through each shadow model if ``shadows > 0``); see :mod:`attacks.scores`.
   Records are encoded by the run's task as training encoded them (an instruction or chat
   record through its template with the loss on its responses; a classifier's label loss),
   and both models are built by the task (a classifier with its head).
4. Membership inference (:mod:`attacks.mia`): ROC, AUC, TPR at FPR 0.1% and 1%.
5. Canaries (if the recipe inserted them): exposure per repetition count
   (:mod:`attacks.exposure`) and the one-run epsilon lower bound (:mod:`attacks.bounds`) from
   the canaries with one repetition, each included with probability 1/2.  A canary's score is
   how much more likely the final model finds it than ``theta_0`` does (``sum_nll`` drop).
6. The Clopper-Pearson bound from each attack's TPR/FPR: the threshold is chosen on one random
   half of the records and evaluated on the other; Bonferroni over attacks.
7. With ``whitebox`` (``audit.whitebox: true``): the white-box canary audit of the run's
   privacy configuration through the real engine (:mod:`attacks.whitebox`), also written to
   ``audit/whitebox.json`` / ``whitebox.html``.
8. ``audit/summary.json``, ``audit/report.html`` and a table on the terminal.

The report and summary hold statistics of private records and the canaries' verdicts: they are
for the data owner, like ``private/metrics.jsonl``; do not publish them with the model.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from accountants import Ledger, get_accountant
from dptrain.data import TextDataset
from dptrain.data.canaries import Manifest, read_manifest
from dptrain.errors import InputError
from dptrain.recipe import AuditSection, Recipe, load_recipe
from dptrain.rundir import CheckpointError, RunDir
from dptrain.secret import run_key
from dptrain.tasks import task_for

from .bounds import epsilon_from_rates, one_run_epsilon_best
from .exposure import exposure_exact, exposure_extrapolated, random_exposure
from .metrics import roc, roc_of
from .mia import ATTACK_LABELS, ATTACKS, TOKEN_ATTACKS, Observations
from .scores import TextStats, encode_texts, score_texts, scored_tokens, trained_texts, zlib_bits
from .shadows import shadow_models

__all__ = ["audit_run", "claimed_privacy", "false_alarm", "load_final_model"]

FPRS = (0.001, 0.01)


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class _Timer:
    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def __call__(self, name: str, fn: Callable[[], Any]) -> Any:
        t0 = time.perf_counter()
        try:
            return fn()
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0


# -- the run -----------------------------------------------------------------------------------


def claimed_privacy(run: RunDir, meta: dict[str, Any], recipe: Recipe) -> dict[str, Any]:
    """The (epsilon, delta) the run claims, recomputed from its ledger by its accountant; for a
    policy that chose its noise from data, the privacy filter's budget (what it certifies),
    with the filter's spend so far as ``spent``."""
    from dptrain.policies import policy_spec

    ledger = Ledger.load(run.ledger)
    delta = float(meta["delta"])
    name = meta.get("guarantee_accountant") or recipe.privacy.accountant
    accountant = get_accountant(name)
    adaptive = policy_spec(recipe.policy.name).adaptive
    events = ledger.events
    if not events:
        eps = 0.0
    elif adaptive:
        eps = accountant.adaptive_epsilon(events, delta)  # type: ignore[attr-defined]
    else:
        eps = accountant.epsilon(events, delta)
    spent = float(eps)
    if adaptive:
        eps = max(spent, float(meta.get("epsilon_budget", recipe.privacy.epsilon)))
    return {
        "epsilon": float(eps),
        "spent": spent,
        "delta": delta,
        "delta_total": float(meta.get("delta_total", delta)),
        "insecure_seed": meta.get("insecure_seed"),
        "accountant": name,
        "adaptive": adaptive,
        "steps": ledger.total_steps,
        "run_json_epsilon": meta.get("epsilon"),
        "noise_multipliers": sorted({e.noise_multiplier for e in events}),
    }


def load_final_model(run: RunDir, recipe: Recipe) -> tuple[torch.nn.Module, Any]:
    """The released model of ``run`` (its ``final/`` adapter or model; a classification run's
    with its head) on the recipe's ``training.device``, and its tokenizer."""
    from dptrain.hardware import resolve_device
    from dptrain.models import load_model_and_tokenizer

    dtype = getattr(torch, recipe.model.dtype)
    device = resolve_device(recipe.training.device)
    if recipe.task.kind == "classification":
        from dptrain.tasks.classification import load_classifier

        model, tok = load_classifier(recipe, run.final)
        return model.to(device), tok
    if recipe.lora is not None:
        from peft import PeftModel

        base, tok = load_model_and_tokenizer(recipe.model.name, dtype=dtype)
        return PeftModel.from_pretrained(base, run.final).to(device), tok
    model, tok = load_model_and_tokenizer(str(run.final), dtype=dtype)
    return model.to(device), tok


def _starting_point(recipe: Recipe) -> torch.nn.Module:
    """theta_0: the model the run started from (pretrained or seeded initialization; a
    classification run's seeded head), built by the run's task as ``dptrain train`` does."""
    from dptrain.hardware import resolve_device

    model, _ = task_for(recipe).build_model(recipe)
    return model.to(resolve_device(recipe.training.device))


# -- the audit ---------------------------------------------------------------------------------


def require_plots() -> None:
    """The report's plots need matplotlib (the ``plots`` extra): checked before any work."""
    from dptrain.extras import require

    require("matplotlib", "plots", "the audit report (its ROC curves and histograms)")


def audit_run(
    run_dir: str | Path,
    options: AuditSection | None = None,
    *,
    progress: bool = True,
    out=None,
) -> dict[str, Any]:
    """Audit the finished run in ``run_dir``; writes ``audit/summary.json`` and
    ``audit/report.html`` and prints a short table to ``out`` (default stdout).  Returns the
    summary.  The stages follow the module docstring."""
    t_start = time.perf_counter()
    run, meta, recipe = _finished_run(run_dir)
    opts = options or recipe.audit or AuditSection()
    timer = _Timer()
    claim = timer("accounting", lambda: claimed_privacy(run, meta, recipe))
    _log(
        f"auditing {run.path}: accountant epsilon {claim['epsilon']:.4g} at delta {claim['delta']:.3g}"
    )
    rng = np.random.default_rng([recipe.seed, 0xA0D1])  # record choice, canaries, halves
    rec = _choose_records(run, recipe, opts, rng, timer)
    target, tokenizer = timer("loading models", lambda: load_final_model(run, recipe))
    rec, unscored = _drop_unscored(rec, recipe, tokenizer, run.path)
    score = _scorer(tokenizer, recipe, opts, progress)
    t_stats, b_stats, canaries = _score_final_and_start(
        target, recipe, rec, score, opts, claim, rng, timer
    )
    refs, refs_in, reference = _reference_scores(
        run, meta, rec, b_stats, score, opts, progress, timer
    )
    trained = trained_texts(
        task_for(recipe), tokenizer, rec.texts, rec.ids, recipe.data.max_length
    )  # what the loss is on (responses), for zlib; None for a classifier
    attacks, skipped = _attacks(rec, t_stats, refs, refs_in, opts, trained)
    cp = timer(
        "bounds",
        lambda: _split_half_bound(
            attacks, rec.is_member, claim["delta_total"], opts.confidence, rng
        ),
    )
    whitebox = None
    if opts.whitebox and claim["epsilon"] < math.inf:
        from .whitebox import audit_configuration

        whitebox = timer("white-box audit", lambda: audit_configuration(run.path, opts, log=_log))
    summary = _summary(
        run, meta, recipe, opts, claim, attacks, skipped, cp, canaries, reference,
        n_members=rec.n_members, n_non_members=rec.n_non_members,
        n_population=len(rec.pop_texts), unscored=unscored,
    )  # fmt: skip
    if whitebox is not None:
        _add_whitebox(summary, whitebox)
    summary["false_alarm"] = false_alarm(summary)
    _write(run, summary, attacks, rec.is_member, canaries, timer, t_start, out)
    return summary


# -- the stages --------------------------------------------------------------------------------


def _finished_run(run_dir: str | Path) -> tuple[RunDir, dict[str, Any], Recipe]:
    """The run directory, its ``run.json`` and recipe; refuses a run without a final model."""
    run = RunDir(run_dir)
    if not run.exists():
        raise CheckpointError(
            f"{run.path} is not a run directory (no run.json). Fix: pass the output directory "
            "of a `dptrain train` run"
        )
    meta = run.read_meta()
    if meta.get("status") != "finished" or not run.final.exists():
        raise CheckpointError(
            f"{run.path} has no final model (status {meta.get('status')!r}). Fix: finish it "
            f"with `dptrain train RECIPE --resume {run.path}`, then audit it"
        )
    if meta.get("privacy_unit", "record") != "record":
        raise InputError(
            f"{run.path} protects each {meta['privacy_unit']['unit']} (data.privacy_unit); "
            "this audit scores records against a record-level claim. Fix: audit it by person "
            "with `dptrain audit RUN_DIR` (which dispatches to attacks.people.audit_people)"
        )
    require_plots()
    return run, meta, load_recipe(run.recipe)


@dataclass
class _Records:
    """The audited records: ``texts`` / ``ids`` are the members then the non-members
    (``is_member`` tells which); ``pop_*`` the RMIA population (other non-members)."""

    train: TextDataset
    member_pool: list[int]  # indices of train records that are not canaries
    outside: TextDataset  # records the run never trained on
    perm: np.ndarray  # the random order of ``outside``
    texts: list[str]
    ids: list[str]
    pop_texts: list[str]
    pop_ids: list[str]
    is_member: np.ndarray
    n_members: int
    n_non_members: int
    manifest: Manifest | None


def _choose_records(
    run: RunDir, recipe: Recipe, opts: AuditSection, rng: np.random.Generator, timer: _Timer
) -> _Records:
    """Up to ``members`` training records (canaries excluded), ``non_members`` held-out ones
    and ``population`` more, chosen with ``rng``; the splits come from the run's key."""
    from dptrain.data.splits import split_data

    key = run_key(run.path, recipe.privacy.insecure_seed, create=False)  # splits, canaries
    train, val, unused = timer("data", lambda: split_data(recipe, key))
    manifest = read_manifest(run.path)
    canary_ids = {rid for c in manifest.canaries for rid in c.record_ids()} if manifest else set()
    member_pool = [i for i, rid in enumerate(train.ids) if rid not in canary_ids]
    outside = TextDataset(val.texts + unused.texts, val.ids + unused.ids)
    members = rng.permutation(member_pool)[: opts.members]
    perm = rng.permutation(len(outside))
    non_members = perm[: opts.non_members]
    population = perm[opts.non_members : opts.non_members + opts.population]
    if len(members) < 2 or len(non_members) < 2:
        raise InputError(
            f"{run.path}: the audit needs at least 2 training and 2 held-out records, found "
            f"{len(members)} and {len(non_members)}. Fix: audit a run with a validation split"
        )
    rec = _Records(
        train,
        member_pool,
        outside,
        perm,
        texts=[train.texts[i] for i in members] + [outside.texts[i] for i in non_members],
        ids=[train.ids[i] for i in members] + [outside.ids[i] for i in non_members],
        pop_texts=[outside.texts[i] for i in population],
        pop_ids=[outside.ids[i] for i in population],
        is_member=np.r_[np.ones(len(members), bool), np.zeros(len(non_members), bool)],
        n_members=len(members),
        n_non_members=len(non_members),
        manifest=manifest,
    )
    _log(
        f"scoring {len(members)} members, {len(non_members)} non-members, "
        f"{len(rec.pop_texts)} population records"
        + (f" and {len(manifest.canaries)} canaries" if manifest else "")
    )
    return rec


def _drop_unscored(
    rec: _Records, recipe: Recipe, tokenizer: Any, where: Path
) -> tuple[_Records, dict[str, int]]:
    """``rec`` without the records the run's encoding leaves no scored token (an instruction
    or chat record whose responses ``data.max_length`` cut off: training gave it a zero
    gradient, and it has no loss an attack could score), and how many were left out of the
    members, the non-members and the population."""
    task, length = task_for(recipe), recipe.data.max_length
    every = rec.texts + rec.pop_texts
    scored = scored_tokens(encode_texts(task, tokenizer, every, rec.ids + rec.pop_ids, length)) > 0
    n = len(rec.texts)
    keep, pop_keep = scored[:n], scored[n:]
    unscored = {
        "members": int((~keep & rec.is_member).sum()),
        "non_members": int((~keep & ~rec.is_member).sum()),
        "population": int((~pop_keep).sum()),
    }
    if not (~scored).any():
        return rec, unscored
    _log(
        f"left out of the attacks: {unscored['members']} members, {unscored['non_members']} "
        f"non-members and {unscored['population']} population records with no scored token "
        f"within data.max_length={length} (their responses are cut off)"
    )
    is_member = rec.is_member[keep]
    if is_member.sum() < 2 or (~is_member).sum() < 2:
        raise InputError(
            f"{where}: after leaving out the records with no scored token within "
            f"data.max_length={length}, {int(is_member.sum())} training and "
            f"{int((~is_member).sum())} held-out records are left to audit (at least 2 each). "
            "Fix: train with a larger data.max_length, so that every response keeps a token"
        )
    pick = np.flatnonzero(keep)
    pop = np.flatnonzero(pop_keep)
    return (
        replace(
            rec,
            texts=[rec.texts[i] for i in pick],
            ids=[rec.ids[i] for i in pick],
            pop_texts=[rec.pop_texts[i] for i in pop],
            pop_ids=[rec.pop_ids[i] for i in pop],
            is_member=is_member,
            n_members=int(is_member.sum()),
            n_non_members=int((~is_member).sum()),
        ),
        unscored,
    )


def _scorer(
    tokenizer: Any, recipe: Recipe, opts: AuditSection, progress: bool
) -> Callable[..., TextStats]:
    """``score(model, texts, ids, desc, batch=opts.batch_size)``: per-record statistics of a
    model, the records (with their ids) encoded by the run's task as training encoded them."""
    from dptrain.tasks import task_for

    task = task_for(recipe)

    def score(
        model: torch.nn.Module,
        batch_texts: list[str],
        ids: list[str],
        desc: str,
        batch: int = opts.batch_size,
    ) -> TextStats:
        return score_texts(
            model,
            tokenizer,
            batch_texts,
            max_length=recipe.data.max_length,
            min_k=opts.min_k,
            batch_size=batch,
            desc=desc,
            progress=progress,
            task=task,
            ids=ids,
        )

    return score


def _score_final_and_start(
    target: torch.nn.Module,
    recipe: Recipe,
    rec: _Records,
    score: Callable[..., TextStats],
    opts: AuditSection,
    claim: dict[str, Any],
    rng: np.random.Generator,
    timer: _Timer,
) -> tuple[TextStats, TextStats, dict[str, Any] | None]:
    """The audited and population records through the final model and ``theta_0``, and the
    canaries' results (None without canaries); ``theta_0`` is freed on return."""
    base = timer("loading models", lambda: _starting_point(recipe))
    every, ids = rec.texts + rec.pop_texts, rec.ids + rec.pop_ids
    t_stats = timer("scoring records", lambda: score(target, every, ids, "final model"))
    b_stats = timer("scoring records", lambda: score(base, every, ids, "theta_0"))
    canaries = None
    if rec.manifest is not None:
        manifest = rec.manifest
        canaries = timer(
            "canaries", lambda: _canaries(manifest, target, base, score, opts, claim, rng)
        )
    return t_stats, b_stats, canaries


def _reference_scores(
    run: RunDir,
    meta: dict[str, Any],
    rec: _Records,
    b_stats: TextStats,
    score: Callable[..., TextStats],
    opts: AuditSection,
    progress: bool,
    timer: _Timer,
) -> tuple[np.ndarray, np.ndarray, str]:
    """(log-probabilities of every record under each reference model, whether the record was
    in that model's training half, a description): the shadow models if ``opts.shadows``,
    else ``theta_0`` alone."""
    pool = _shadow_pool(
        rec.train, rec.member_pool, rec.outside, rec.perm, rec.n_non_members + len(rec.pop_texts)
    )
    shadows = timer(
        "shadow models",
        lambda: shadow_models(
            run, meta, pool, opts.shadows, steps=opts.shadow_steps, progress=progress, log=_log
        ),
    )
    if not shadows:
        refs_a = b_stats.log_prob[None, :]
        return (
            refs_a,
            np.zeros_like(refs_a, dtype=bool),
            "theta_0 (the run's starting point) as the only reference model",
        )
    every, ids = rec.texts + rec.pop_texts, rec.ids + rec.pop_ids
    refs, refs_in = [], []
    for k, sh in enumerate(shadows):
        model, _ = timer(
            "loading models", lambda sh=sh: load_final_model(RunDir(sh.path), sh.recipe)
        )
        stats = timer(
            "scoring records", lambda m=model, k=k: score(m, every, ids, f"shadow {k + 1}")
        )
        refs.append(stats.log_prob)
        refs_in.append([rid in sh.members for rid in rec.ids + rec.pop_ids])
        del model
    return np.array(refs), np.array(refs_in, dtype=bool), f"{len(shadows)} shadow models"


def _attacks(
    rec: _Records,
    t_stats: TextStats,
    refs: np.ndarray,
    refs_in: np.ndarray,
    opts: AuditSection,
    trained: list[str] | None,
) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """Every membership attack's scores and ROC on the audited records, and the attacks
    skipped (with the reason); ``trained``: the text each record's loss is on (None: a label,
    so the token-level attacks zlib and min-k do not apply)."""
    n = len(rec.texts)
    obs = Observations(
        target=t_stats.take(np.arange(n)),
        zlib_bits=None if trained is None else zlib_bits(trained),
        refs=refs[:, :n],
        refs_in=refs_in[:, :n],
        pop_target=t_stats.log_prob[n:],
        pop_refs=refs[:, n:],
        pop_refs_in=refs_in[:, n:],
        min_k=opts.min_k,
        rmia_gamma=opts.rmia_gamma,
        rmia_offline_a=opts.rmia_offline_a,
        single_label=trained is None,  # a classifier: LiRA on logit-scaled p_y
    )
    is_member = rec.is_member
    attacks, skipped = {}, {}
    for name, fn in ATTACKS.items():
        if trained is None and name in TOKEN_ATTACKS:
            skipped[name] = "a classifier's loss is one label per record, not a token sequence"
            continue
        s = fn(obs)
        if s is None:
            skipped[name] = "needs shadow models (--shadows 2 or more)"
            continue
        r = roc_of(s, is_member)
        attacks[name] = {
            "label": _label(name, opts),
            "auc": r.auc,
            "balanced_accuracy": r.balanced_accuracy,
            **{f"tpr_at_fpr_{f:g}": r.tpr_at(f) for f in FPRS},
            "roc": r,
            "scores": s,
        }
    return attacks, skipped


def _add_whitebox(summary: dict[str, Any], whitebox: dict[str, Any]) -> None:
    """Fold the white-box audit into the summary: its ledger bound joins the lower bounds."""
    summary["whitebox"] = whitebox
    led = whitebox["bounds"]["ledger"]
    summary["epsilon_lower_bounds"]["whitebox"] = {
        "epsilon": led["epsilon"],
        "confidence": whitebox["confidence"],
        "canaries": whitebox["canaries"],
    }
    summary["empirical_epsilon_lower_bound"] = max(
        summary["empirical_epsilon_lower_bound"], led["epsilon"]
    )
    summary["privacy_bug_suspected"] |= whitebox["privacy_bug_suspected"]


def false_alarm(summary: dict[str, Any]) -> dict[str, Any]:
    """How often the report's verdict flags a CORRECT run: each lower bound is a test at the
    audit's confidence (one-run: rigorous; Clopper-Pearson: Bonferroni over its attacks, and
    nominal, as records of one run are not independent trials; the white-box audit: its
    bound plus its sampling, noise and key replay checks, :func:`attacks.whitebox.false_alarm`).  They are stated
    per test, not Bonferroni-corrected across tests, and "likely privacy bug" is any of them,
    so by the union bound their rates add."""
    alpha = 1 - float(summary["confidence"])
    tests: dict[str, float] = {}
    for name in ("one_run", "clopper_pearson"):
        if name in summary["epsilon_lower_bounds"]:
            tests[name] = alpha
    w = summary.get("whitebox")
    if w is not None:
        tests["whitebox"] = float(w.get("false_alarm", {}).get("at_most", w["false_alarm_at_most"]))
    return {
        "confidence": summary["confidence"],
        "per_test": tests,
        "at_most": min(1.0, sum(tests.values())),
        "combination": "stated per test at the audit's confidence (not Bonferroni-corrected "
        "across tests); the verdict flags a run when any test fires, so by the union bound "
        "the rates add",
    }


def _write(
    run: RunDir,
    summary: dict[str, Any],
    attacks: dict[str, dict[str, Any]],
    is_member: np.ndarray,
    canaries: dict[str, Any] | None,
    timer: _Timer,
    t_start: float,
    out: Any,
) -> None:
    """Figures, the timings (and the step that dominated), ``audit/`` files and the table."""
    from .report import print_table, render_figures, write_report

    figures = timer("report", lambda: render_figures(summary, attacks, is_member, canaries))
    timer.seconds["total"] = time.perf_counter() - t_start
    summary["seconds"] = {k: round(v, 2) for k, v in timer.seconds.items()}
    steps = {k: v for k, v in timer.seconds.items() if k != "total"}
    summary["dominated_by"] = max(steps, key=steps.get)
    write_report(run.path / "audit", summary, figures, canaries)
    print_table(summary, out or sys.stdout)


def _shadow_pool(
    train: TextDataset, member_pool: list[int], outside: TextDataset, perm: np.ndarray, used: int
) -> TextDataset:
    """The records shadow models split in halves: every training record (canaries excluded)
    and as many held-out ones (the audited and population ones first), so that a half is about
    as large as the run's training set."""
    extra = perm[: max(len(member_pool), used)]
    return TextDataset(
        [train.texts[i] for i in member_pool] + [outside.texts[i] for i in extra],
        [train.ids[i] for i in member_pool] + [outside.ids[i] for i in extra],
    )


def _label(name: str, opts: AuditSection) -> str:
    if name == "min_k":
        return f"min-{opts.min_k:.0%} prob"
    return ATTACK_LABELS[name]


def _canaries(
    manifest: Manifest,
    target: torch.nn.Module,
    base: torch.nn.Module,
    score: Callable[..., TextStats],
    opts: AuditSection,
    claim: dict[str, Any],
    rng: np.random.Generator,
) -> dict[str, Any]:
    """One-run bound from the single-repetition canaries, and exposure per repetition count."""
    cs = manifest.canaries
    texts = [c.text(manifest.template) for c in cs]
    ids = [c.record_ids()[0] for c in cs]  # plain-text canary records in every task
    t = score(target, texts, ids, "canaries (final)")
    if (t.tokens == 0).any():  # refused when planted (dptrain.data.canaries.check_canaries_fit)
        raise InputError(
            f"canary {cs[int(np.argmax(t.tokens == 0))].index} has no scored token within "
            "data.max_length: the run's canaries cannot be audited. Fix: train again with a "
            "data.max_length that holds every canary sentence"
        )
    b = score(base, texts, ids, "canaries (theta_0)")
    drop = b.sum_nll - t.sum_nll  # how much more likely training made each canary
    result: dict[str, Any] = {
        "count": len(cs),
        "inserted": sum(c.included for c in cs),
        "secret_space": manifest.space_size,
        "max_exposure": math.log2(manifest.space_size),
        "random_exposure": random_exposure,
    }
    single = np.array([c.repetitions == 1 for c in cs])
    if single.sum() >= 2:
        included = np.array([c.included for c in cs])[single]
        # at the delta the run's guarantee holds at (delta_total: with the noise sampler's
        # truncation mass): a bound at a smaller delta tests more than the run claims
        bound = one_run_epsilon_best(drop[single], included, claim["delta_total"], opts.confidence)
        result["one_run"] = bound | {"confidence": opts.confidence}
        result["one_run_scores"] = {
            "included": drop[single][included],
            "excluded": drop[single][~included],
        }
    # exposure: a few canaries per repetition count, and as many never inserted (count 0)
    groups: dict[int, list[int]] = {}
    for i, c in enumerate(cs):
        k = c.repetitions if c.included else 0
        if len(groups.setdefault(k, [])) < opts.exposure_canaries:
            groups[k].append(i)
    space = manifest.space_size
    exact = space <= opts.exposure_exact_limit
    digits = manifest.secret_digits
    chosen = [(k, i) for k in sorted(groups) for i in groups[k]]
    candidates: list[list[str]] = []
    for _, i in chosen:
        if exact:
            cands = [f"{j:0{digits}d}" for j in range(space)]
            cands.remove(cs[i].secret)
        else:
            cands = [f"{j:0{digits}d}" for j in rng.integers(0, space, opts.exposure_samples)]
        candidates.append(cands)
    # one pass over every candidate sentence (short: larger batches)
    flat = [
        cs[i].text(manifest.template, x)
        for (_, i), cands in zip(chosen, candidates, strict=True)
        for x in cands
    ]
    flat_ids = [f"canary-candidate-{j}" for j in range(len(flat))]
    nll = score(target, flat, flat_ids, "exposure candidates", 4 * opts.batch_size).sum_nll
    rows, start = [], 0
    for (k, i), cands in zip(chosen, candidates, strict=True):
        own, theirs = float(t.sum_nll[i]), nll[start : start + len(cands)]
        start += len(cands)
        e = (exposure_exact if exact else exposure_extrapolated)(own, theirs, space)
        rows.append({"canary": cs[i].index, "repetitions": k, "exposure": e})
    result["exposure"] = rows
    result["exposure_method"] = (
        "exact (all candidates)"
        if exact
        else (f"extrapolated (skew-normal fit to {opts.exposure_samples} sampled candidates)")
    )
    by_k: dict[int, list[float]] = {}
    for row in rows:
        by_k.setdefault(row["repetitions"], []).append(row["exposure"])
    result["exposure_by_repetitions"] = {str(k): float(np.mean(v)) for k, v in sorted(by_k.items())}
    return result


def _split_half_bound(
    attacks: dict[str, dict[str, Any]],
    is_member: np.ndarray,
    delta: float,
    confidence: float,
    rng: np.random.Generator,
) -> dict[str, Any] | None:
    """Jagielski et al. 2020 bound for each attack: threshold picked on half A (best bound
    there), bound evaluated on half B; the best attack, Bonferroni-corrected over attacks."""
    if not attacks:
        return None
    each = 1 - (1 - confidence) / len(attacks)
    half = np.zeros(len(is_member), bool)
    for cls in (True, False):
        idx = rng.permutation(np.flatnonzero(is_member == cls))
        half[idx[: len(idx) // 2]] = True
    best: dict[str, Any] | None = None
    for name, a in attacks.items():
        s = a["scores"]
        pick = _best_threshold(s[half & is_member], s[half & ~is_member], delta, each)
        mem, non = s[~half & is_member], s[~half & ~is_member]
        tp, fp = int((mem >= pick).sum()), int((non >= pick).sum())
        eps = epsilon_from_rates(tp, len(mem), fp, len(non), delta, each)
        a["clopper_pearson"] = eps
        if best is None or eps > best["epsilon"]:
            best = {
                "epsilon": eps,
                "attack": name,
                "threshold": float(pick),
                "tpr": tp / len(mem),
                "fpr": fp / len(non),
                "members": len(mem),
                "non_members": len(non),
            }
    assert best is not None
    return best | {"confidence": confidence, "attacks": len(attacks)}


def _best_threshold(mem: np.ndarray, non: np.ndarray, delta: float, confidence: float) -> float:
    r = roc(mem, non)
    best, pick = -1.0, float(r.thresholds[-1])
    for i in range(1, len(r.thresholds)):
        tp, fp = r.counts(i)
        eps = epsilon_from_rates(tp, r.positives, fp, r.negatives, delta, confidence)
        if eps > best:
            best, pick = eps, float(r.thresholds[i])
    return pick


def _summary(
    run: RunDir,
    meta: dict[str, Any],
    recipe: Recipe,
    opts: AuditSection,
    claim: dict[str, Any],
    attacks: dict[str, dict[str, Any]],
    skipped: dict[str, str],
    cp: dict[str, Any] | None,
    canaries: dict[str, Any] | None,
    reference: str,
    **counts: Any,
) -> dict[str, Any]:
    bounds = {}
    if canaries and "one_run" in canaries:
        bounds["one_run"] = canaries["one_run"]
    if cp:
        bounds["clopper_pearson"] = cp
    lower = max((b["epsilon"] for b in bounds.values()), default=0.0)
    non_private = math.isinf(claim["epsilon"])
    return {
        "run_dir": str(run.path),
        "name": recipe.name,
        "model": recipe.model.name + (" + LoRA" if recipe.lora else ""),
        "dataset_size": meta.get("dataset_size"),
        "accountant_epsilon": claim["epsilon"],
        "delta": claim["delta"],
        "delta_total": claim["delta_total"],
        "accountant": claim["accountant"],
        "claim": claim,
        "privacy_guarantee": not non_private,
        "attacks": {
            k: {kk: vv for kk, vv in v.items() if kk not in ("roc", "scores")}
            for k, v in attacks.items()
        },
        "skipped_attacks": skipped,
        "reference_models": reference,
        "records": counts,
        "best_auc": max((a["auc"] for a in attacks.values()), default=math.nan),
        "canaries": None
        if canaries is None
        else {k: v for k, v in canaries.items() if k not in ("one_run_scores",)},
        "epsilon_lower_bounds": bounds,
        "empirical_epsilon_lower_bound": lower,
        "confidence": opts.confidence,
        "privacy_bug_suspected": (not non_private) and lower > claim["epsilon"],
        "options": opts.model_dump(),
    }


def after_training(run_dir: str | Path, options: AuditSection, *, progress: bool = True) -> None:
    """What ``dptrain train`` runs once a run has finished, as ``audit:`` asks: the full audit
    (``after_training``, which includes the white-box audit when ``whitebox`` is set), or the
    white-box audit alone (``whitebox``)."""
    if options.after_training:
        audit_run(run_dir, options, progress=progress)
    elif options.whitebox:
        from .report import false_alarm_sentence, whitebox_verdict
        from .whitebox import audit_configuration

        w = audit_configuration(run_dir, options, log=_log)
        print(f"white-box audit      {whitebox_verdict(w)[1][0]}", flush=True)
        print(f"                     {false_alarm_sentence(w['false_alarm'])}", flush=True)
        print(f"report              {Path(run_dir) / 'audit' / 'whitebox.html'}", flush=True)
