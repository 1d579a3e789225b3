"""``dptrain train``: a whole private fine-tuning run from a recipe, resumable, in stages.

    prepare  validate the run directory, read the run key and the data, resolve the run plan
             (:mod:`dptrain.plan`: q, delta, steps, the policy's noise, the accountant, the
             budget) and check it -- all before the model is loaded
    start    rank 0 writes the run key, ``recipe.yaml``, ``README.txt`` (what may be
             published) and the canary manifest
    build    model (:func:`dptrain.models.build_model`), tokenized data, optimizer
             (:mod:`dptrain.optim`), engine, policy attached, sampler; a checkpoint restored
    loop     private steps with checkpoints, until the plan's steps or the budget end
    finish   the final adapter/model, perplexities and the (epsilon, delta) guarantee

What is public.  ``run.json`` holds values derived from the recipe, the public record count N
and released outputs only (the guarantee, the ledger's epsilon, steps skipped because a
*released* update was not finite).  Statistics of private records that carry no noise -- the
validation perplexities (the validation split is drawn from the private file and used without
noise), the validation split's size, truncated and non-finite sample counts, every per-step
metric -- go to ``private/`` (:mod:`dptrain.rundir`), which is never to be published.

The one path from ``policy.noise_multiplier`` and ``privacy.epsilon`` in the recipe down to
the engine's release is written in :mod:`dptrain.plan`.  The audit after training
(``audit.after_training`` / ``audit.whitebox``) is run by the command layer
(:mod:`dptrain.commands.train`), not here.

Randomness.  Every private random choice -- the validation / public split, the canaries,
step ``t``'s Poisson batch and noise -- is a function of the run key (``secret.key``, see
:mod:`dptrain.secret`) and of ``t`` and the record ids only, so a resumed run draws what an
uninterrupted one would and an adversary holding the recipe and ``run.json`` cannot replay it.
The key is marked used in ``secret.key`` before the first step draws from it, and a run never
starts over from step 0 with a used key (that would repeat its noise; see
:mod:`dptrain.secret`).
``recipe.seed`` drives the non-private randomness (initialization); a step's dropout is
keyed by the run key (:func:`dptrain.engine.keyed_rng`).  The reported
delta includes the noise sampler's truncation term (:func:`dptrain.noise.truncation_delta`).
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from accountants import Ledger, UnsupportedEventError, get_accountant
from accountants.grid import composition

from . import distributed, rng
from .data import TextDataset
from .data.canaries import Canary, check_canaries_fit, left_out, make_canaries, write_manifest
from .data.lm import eval_batches
from .data.people import recipe_person_ids
from .data.splits import no_validation_error, read_data, read_public
from .engine import BudgetExceeded, PrivacyEngine
from .errors import RunInterrupted
from .hardware import describe_device, module_device, resolve_device
from .models import check_context
from .noise import GaussianNoise
from .optim import make_optimizer
from .plan import (
    CalibratedNoise,
    RunPlan,
    check_not_stopped,
    check_run,
    guarantee_numbers,
    plan_privacy,
)
from .policies import Policy, RunContext
from .precision import Precision
from .recipe import RESUMABLE_KEYS, Recipe, RecipeError, dump_recipe, resume_blockers
from .rundir import (
    DISK_FULL,
    PUBLIC_FILES,
    CheckpointError,
    CheckpointWriteError,
    RunDir,
    atomic_write,
    save_final,
    versions,
)
from .sampling import PoissonSampler
from .secret import RunKey, RunKeyError
from .steplog import StepLog
from .tasks import Task, task_for, validation_line
from .user_level import PersonSampler, UnitPlan, plan_unit, record_run_person_level, resolve_unit


@dataclass
class Prepared:
    """Everything resolved before the model is loaded."""

    recipe: Recipe
    run: RunDir
    key: RunKey
    train_texts: TextDataset
    val_texts: TextDataset
    public_texts: TextDataset | None
    plan: RunPlan
    ledger: Ledger
    checkpoint: dict[str, Any] | None
    resume: bool
    canaries: list[Canary] | None = None  # drawn once, inserted and written to the manifest
    unit: UnitPlan | None = None  # data.privacy_unit: the person is the unit
    withheld_records: int = 0  # canary records their coins left out (in the public sizes)
    complete: bool = False  # a resume of a finished run that took all its planned steps

    @property
    def policy(self) -> Policy:
        return self.plan.policy


@dataclass
class Built:
    """The run's model and engine, ready for its first (or next) step."""

    model: torch.nn.Module
    tokenizer: Any
    optimizer: torch.optim.Optimizer
    engine: PrivacyEngine
    noise: GaussianNoise
    sampler: PoissonSampler | PersonSampler
    train_ex: Any  # LMExamples, or the task's examples (dptrain.tasks)
    validation_size: int
    val_batches: list[dict[str, torch.Tensor]]
    task: Task


@dataclass
class RunResult:
    run_dir: Path
    steps: int
    epsilon: float
    delta: float
    accountant: str
    perplexity_before: float
    perplexity_after: float
    stopped_by_budget: bool
    delta_total: float = math.nan  # delta plus the noise sampler's truncation term
    finished: bool = False  # all planned steps taken, or stopped by the budget (not paused)
    already_complete: bool = False  # resumed a finished run: nothing was done


def log(msg: str) -> None:
    """Progress messages to stderr, from rank 0 only."""
    if distributed.is_main():
        print(msg, file=sys.stderr, flush=True)


def train(
    recipe: Recipe,
    run_dir: str | Path | None = None,
    *,
    resume: bool = False,
    progress: bool = True,
    max_steps_this_session: int | None = None,
    cross_check: bool = True,
    calibrated: CalibratedNoise | None = None,
) -> RunResult:
    """Run (or resume) a recipe; see the module docstring.  Under torchrun (``WORLD_SIZE`` > 1)
    every rank runs this; rank 0 alone writes the run directory (see dptrain.distributed).
    ``cross_check=False`` skips the other accountants' epsilon in run.json (for audit shadow
    models, which are never released); ``calibrated``: a sigma calibrated for a plan, taken
    instead of calibrating when the run's plan equals it (audit shadow models pass their
    run's, :class:`dptrain.plan.CalibratedNoise`)."""
    distributed.init_from_env(recipe.training.device)
    run = RunDir(recipe.run_dir(run_dir))
    # rank 0 writes the directory, so it alone holds the lock (a resume of a directory that
    # does not exist is left to prepare's error rather than creating it)
    locked = distributed.is_main() and (run.path.exists() or not resume)
    with run.exclusive() if locked else contextlib.nullcontext():
        return _train(
            recipe, run_dir, resume, progress, max_steps_this_session, cross_check, calibrated
        )


def _train(
    recipe: Recipe,
    run_dir: str | Path | None,
    resume: bool,
    progress: bool,
    max_steps_this_session: int | None,
    cross_check: bool,
    calibrated: CalibratedNoise | None = None,
) -> RunResult:
    prep = prepare(recipe, run_dir, resume=resume, calibrated=calibrated)
    if prep.complete:
        return _already_complete(prep)
    distributed.barrier()  # every rank has validated the run directory before rank 0 writes
    try:
        start(prep)
        built = build(prep)
        meta, stats = begin_meta(prep, built)
        stopped, seconds, counts = loop(prep, built, meta, stats, progress, max_steps_this_session)
    except KeyboardInterrupt:
        raise _interrupted(prep.run) from None
    except OSError as err:
        if err.errno not in DISK_FULL:
            raise
        raise CheckpointWriteError(prep.run, "the run directory's files", err) from err
    try:
        return finish(prep, built, meta, stats, stopped, seconds, counts, cross_check)
    except KeyboardInterrupt:  # during the final evaluation, samples or figures
        raise _interrupted(prep.run) from None
    except OSError as err:  # a full disk while writing the final model or run.json
        if err.errno not in DISK_FULL:
            raise
        raise CheckpointWriteError(prep.run, "the final model or run.json", err) from err


def _interrupted(run: RunDir) -> RunInterrupted:
    """Ctrl-C: ``run.json`` says "interrupted" and the message gives the real resume path."""
    if not run.exists():  # before the first write of run.json: no run has started
        return RunInterrupted(
            f"before training started; {run.path} holds no run yet: run the same command again"
        )
    if distributed.is_main():
        run.update_meta(status="interrupted")
    kept = run.checkpoint_files()
    state = (
        f"the last checkpoint ({kept[-1].name}) and the ledger covering it are intact"
        if kept
        else "no checkpoint was written yet"
    )
    return RunInterrupted(state, run_dir=run.path)


# -- prepare: everything checked before the model loads -----------------------------------


def prepare(
    recipe: Recipe,
    run_dir: str | Path | None = None,
    *,
    resume: bool = False,
    calibrated: CalibratedNoise | None = None,
) -> Prepared:
    """Validate the run directory, read the key and the data, resolve and check the plan
    (``calibrated``: see :func:`train`)."""
    run = RunDir(recipe.run_dir(run_dir))
    meta = _check_run_dir(run, recipe, resume)
    key = run_key_for(recipe, run, resume)
    canaries = (
        make_canaries(recipe.data.canaries, key, person_level=recipe.data.privacy_unit is not None)
        if recipe.data.canaries
        else None
    )
    train_texts, val_texts = read_data(recipe, key, canaries=canaries)
    if not len(val_texts):
        raise no_validation_error(recipe)
    train_texts, public_texts = read_public(recipe, train_texts, key)
    restored = meta.get("calibrated_noise_multiplier") if meta else None
    cap = recipe.data.privacy_unit.max_records_per_person if recipe.data.privacy_unit else None
    withheld, withheld_people = left_out(canaries, cap)  # public sizes count them: no coin shows
    unit, train_texts = resolve_unit(recipe, train_texts, key, withheld_people=withheld_people)
    if recipe.data.person_field is not None:  # read at the end of training: refused before it
        recipe_person_ids(recipe, recipe.data.person_field)
    records = len(train_texts) + withheld
    if unit is None:
        plan = plan_privacy(recipe, records, restored_noise=restored, calibrated=calibrated)
    else:
        plan = plan_unit(recipe, unit, records, restored_noise=restored)

    def prepared(ledger: Ledger, checkpoint: dict[str, Any] | None, **kw: Any) -> Prepared:
        return Prepared(
            recipe,
            run,
            key,
            train_texts,
            val_texts,
            public_texts,
            plan,
            ledger,
            checkpoint,
            resume,
            canaries,
            unit,
            withheld,
            **kw,
        )

    if resume and _is_complete(run, meta, plan):  # before the model, the checkpoint, the budget
        return prepared(Ledger.load(run.ledger), None, complete=True)
    if recipe.privacy.delta is None and not resume:
        count = f"{records} training records" if unit is None else f"{unit.size} people"
        log(
            f"privacy.delta not set: using 1/(10 N) = "
            f"{plan.delta if unit is None else unit.person_delta:.3g} for N = {count} (N is "
            "public: it also sets the sample rate)"
        )
    if unit is not None and not unit.user_level:
        log(
            f"privacy unit: each {unit.name} (at most {unit.group_size} records); record-level "
            f"budget ({plan.budget.epsilon:.4g}, {plan.delta:.3g}) gives ({recipe.privacy.epsilon}"
            f", {unit.person_delta:.3g}) per {unit.name} by group privacy"
        )
    if plan.noise_source == "calibrated":
        log(
            f"calibrated noise multiplier {plan.noise_multiplier:.4f} for epsilon="
            f"{recipe.privacy.epsilon} at delta={plan.delta:.3g} over {plan.steps} steps "
            f"({plan.accountant})"
        )
    elif plan.noise_source == "reused":  # calibrated for the same plan (an audit shadow's run)
        log(
            f"reused noise multiplier {plan.noise_multiplier:.4f} (calibrated for the same "
            f"epsilon={recipe.privacy.epsilon}, delta={plan.delta:.3g}, q, {plan.steps} steps, "
            f"{plan.accountant} and policy)"
        )
    elif plan.noise_source == "restored":  # calibrated by the session that started the run
        log(
            f"restored noise multiplier {plan.noise_multiplier:.4f} (from run.json: the noise "
            "this run was calibrated with; a resume keeps it)"
        )
    if resume and run.ledger.exists():  # cheap: run.json and ledger.json, before the checkpoint
        check_not_stopped(plan, Ledger.load(run.ledger), _stopped_at(meta, plan))
    checkpoint = run.load_checkpoint(recipe.fingerprint()) if resume else None
    if resume and checkpoint is None:
        key.refuse_restart(run.key, f"{run.path} has no checkpoint left to resume from")
    ledger = Ledger.from_dict(checkpoint["engine"]["ledger"]) if checkpoint else Ledger()
    public = len(public_texts) if public_texts is not None else None
    fits = check_run(
        plan, public_records=public, ledger=ledger, world_size=distributed.world_size()
    )
    if fits is not None and fits < plan.steps - ledger.total_steps:
        log(
            f"warning: the budget fits {fits} more steps of {plan.steps - ledger.total_steps} "
            "planned; the run will stop there"
        )
    return prepared(ledger, checkpoint)


def _stopped_at(meta: dict[str, Any] | None, plan: RunPlan) -> int | None:
    """The steps of the last session if the budget filter stopped it while planning
    ``plan.steps`` (``run.json``), else None (see :func:`dptrain.plan.check_not_stopped`)."""
    steps = (meta or {}).get("steps")
    if (
        meta is not None
        and meta.get("stopped_by_budget") is True
        and meta.get("planned_steps") == plan.steps
        and isinstance(steps, int)
    ):
        return steps
    return None


def _is_complete(run: RunDir, meta: dict[str, Any] | None, plan: RunPlan) -> bool:
    """A finished run that took all ``plan.steps`` and wrote its final model: nothing to resume.
    (A run stopped by the budget took fewer steps; one that crashed before ``final/`` is not
    finished, and its resume writes the final model.)"""
    steps = (meta or {}).get("steps")
    return (
        meta is not None
        and meta.get("status") == "finished"
        and isinstance(steps, int)
        and steps >= plan.steps
        and run.final.exists()
    )


def _already_complete(prep: Prepared) -> RunResult:
    """Say that the run is complete -- its steps, guarantee and final model -- and do nothing."""
    run, plan = prep.run, prep.plan
    meta, stats = run.read_meta(), run.read_stats()
    steps = meta["steps"]
    eps, delta_total = meta.get("epsilon", math.nan), meta.get("delta_total", math.nan)
    if distributed.is_main():
        print(
            f"run complete: {run.path}: {steps} steps taken ({plan.steps} planned), "
            f"(epsilon, delta) = ({eps:.4f}, {delta_total:.3g}) in run.json; final model in "
            f"{run.final}. Nothing to resume. To take more steps, resume with a larger "
            f"training.steps (e.g. --set training.steps={2 * steps}) while the budget allows, "
            "or start a new run.",
            flush=True,
        )
    return RunResult(
        run.path,
        steps,
        eps,
        meta.get("delta", plan.delta),
        meta.get("guarantee_accountant", plan.accountant),
        stats.get("perplexity_before", math.nan),
        stats.get("perplexity_after", math.nan),
        bool(meta.get("stopped_by_budget", False)),
        delta_total,
        finished=True,
        already_complete=True,
    )


def _check_run_dir(run: RunDir, recipe: Recipe, resume: bool) -> dict[str, Any] | None:
    """The run's ``run.json`` on resume (it must be this recipe's); a fresh run needs an
    unused directory."""
    if resume:
        if not run.exists():
            raise CheckpointError(f"cannot resume: {run.path} is not a run directory (no run.json)")
        meta = run.read_meta()
        if meta.get("fingerprint") != recipe.fingerprint():
            raise CheckpointError(_recipe_diff(run, recipe))
        return meta
    if run.started():
        what = "holds a run" if run.exists() else "holds files of a run (no run.json)"
        raise RecipeError(
            f"output directory {run.path} already {what}. Fix: resume it with "
            f"--resume {run.path}, or choose another output_dir / --output."
        )
    return None


def run_key_for(recipe: Recipe, run: RunDir, resume: bool) -> RunKey:
    """The run's key: from ``privacy.insecure_seed``, or rank 0 reads ``secret.key`` (on
    ``--resume``, or left by a run that never took a step: a used key is refused) or draws a
    fresh one from the OS CSPRNG; the other ranks receive it over the process group."""
    seed = recipe.privacy.insecure_seed
    if seed is not None:
        return RunKey.from_insecure_seed(seed)
    key: RunKey | None = None
    error: str | None = None
    if distributed.is_main():
        try:
            key = RunKey.read(run.key) if resume or run.key.exists() else RunKey.generate()
            if not resume:
                key.refuse_restart(
                    run.key, f"{run.path} holds no run any more (no run.json, ledger or checkpoint)"
                )
        except RunKeyError as err:
            error = str(err)
    key, error = distributed.broadcast_object((key, error))
    if error is not None:
        raise CheckpointError(error)
    return key


def _recipe_diff(run: RunDir, recipe: Recipe) -> str:
    """Why ``recipe`` cannot resume ``run``: the keys that differ from the run's
    ``recipe.yaml`` and block a resume (never a resumable one such as ``training.steps``),
    and the fix."""
    import yaml

    fix = (
        f"Fix: resume with the run's own recipe (dptrain train {run.recipe} --resume "
        f"{run.path}; the resumable keys {', '.join(RESUMABLE_KEYS)} may be changed with "
        "--set), or start a new run in another output_dir"
    )
    try:
        old = yaml.safe_load(run.recipe.read_text())
    except Exception:
        old = None
    if not isinstance(old, dict):
        return (
            f"{run.path} was written by a different recipe (its recipe.yaml is unreadable). {fix}"
        )
    diffs = resume_blockers(old, recipe.model_dump(mode="json"))
    if not diffs:
        return (
            f"{run.path} was written by a different recipe: its recipe.yaml matches this one "
            "in every key that must match, but run.json's fingerprint differs (recipe.yaml or "
            f"run.json was edited, or another dptrain version wrote them). {fix}"
        )
    more = f"; and {len(diffs) - 8} more" if len(diffs) > 8 else ""
    return (
        f"{run.path} was written by a different recipe; these keys must match to resume: "
        f"{'; '.join(diffs[:8])}{more}. {fix}"
    )


# -- start and build ----------------------------------------------------------------------


def start(prep: Prepared) -> None:
    """Rank 0 opens the run directory: the key first, then the recipe as the user wrote it."""
    with rng.GLOBAL_RNG:  # the public stream of what follows (not privacy randomness)
        torch.manual_seed(prep.recipe.seed)
    if not distributed.is_main():
        return
    run, recipe = prep.run, prep.recipe
    run.path.mkdir(parents=True, exist_ok=True)
    run.clean_partial()
    if prep.key.secure and not run.key.exists():
        prep.key.write(run.key)  # before anything that derives from it is written
    if not prep.resume or not run.readme.exists():
        run.write_readme()
    if not prep.resume:
        atomic_write(run.recipe, lambda f: f.write(dump_recipe(recipe)))
        if recipe.data.canaries is not None:
            path = write_manifest(
                run.path,
                recipe.data.canaries,
                canaries=prep.canaries,
                person_level=recipe.data.privacy_unit is not None,
            )
            log(f"inserted audit canaries; their secrets are in {path} (keep it private)")


def build(prep: Prepared) -> Built:
    """Model, tokenized data, optimizer, engine and sampler; the policy attached and a
    checkpoint restored (on resume)."""
    recipe, plan, d = prep.recipe, prep.plan, prep.recipe.data
    task = task_for(recipe)  # model head, tokenization, loss and metric of task.kind
    device = resolve_device(recipe.training.device)
    precision = Precision(recipe.training.precision, recipe.training.loss_scale)
    log(f"loading model {recipe.model.name} ...")
    t0 = time.perf_counter()
    model, tokenizer = task.build_model(recipe)
    model.to(device)
    log(
        f"model ready in {time.perf_counter() - t0:.1f}s on {describe_device(device)}, "
        f"precision {precision.name}"
    )
    check_context(model, d.max_length)
    if prep.canaries and d.canaries is not None and not prep.resume:  # planted: they must fit
        check_canaries_fit(prep.canaries, d.canaries.template, task.encode, tokenizer, d.max_length)
    train_ex = task.encode(prep.train_texts, tokenizer, d.max_length)
    val_ex = task.encode(prep.val_texts, tokenizer, d.max_length)
    optimizer = make_optimizer(recipe.training, [p for p in model.parameters() if p.requires_grad])
    noise = GaussianNoise(prep.key)
    user_level = prep.unit is not None and prep.unit.user_level
    engine = PrivacyEngine(
        model,
        optimizer,
        policy=plan.policy,
        sample_rate=plan.sample_rate,
        dataset_size=plan.dataset_size,  # public N (records, or people): E[B] = q N
        loss_fn=task.loss_fn,
        grouping=recipe.policy.grouping,
        accountant=plan.accountant,
        budget=plan.budget,
        max_physical_batch_size=recipe.training.physical_batch_size,
        noise=noise,
        precision=precision,
        max_length=d.max_length,  # public; every encoded example is cut to it
        pad=train_ex.pad,  # the probe pads up to max_length: outputs must not follow padding
    )
    public_batches = None
    if prep.public_texts is not None:
        public_ex = task.encode(prep.public_texts, tokenizer, d.max_length)
        public_batches = eval_batches(public_ex, recipe.training.physical_batch_size)
    plan.policy.attach(RunContext(model, plan.steps, recipe.seed, public_batches))
    sampler: PoissonSampler | PersonSampler
    if user_level:  # people by keyed coins, each with at most the cap of their records
        sampler = prep.unit.sampler(train_ex.ids, plan.sample_rate, prep.key)
    else:
        sampler = PoissonSampler(train_ex.ids, plan.sample_rate, prep.key)
    val_batches = eval_batches(val_ex, recipe.training.physical_batch_size)
    built = Built(
        model,
        tokenizer,
        optimizer,
        engine,
        noise,
        sampler,
        train_ex,
        len(val_ex),
        val_batches,
        task,
    )
    if prep.checkpoint is not None:
        _restore(prep.checkpoint, built)
        log(
            f"resumed {prep.run.path} at step {engine.steps_taken} (epsilon {engine.epsilon():.4f})"
        )
    return built


def begin_meta(prep: Prepared, built: Built) -> tuple[dict[str, Any], dict[str, Any]]:
    """``run.json`` at the start -- the resolved plan and what the run was built with, all
    public -- and the private statistics (``private/stats.json``); written once, a resumed
    run continues its own."""
    run, recipe, plan = prep.run, prep.recipe, prep.plan
    main = distributed.is_main()
    here = _segment(built, recipe.training.device)
    if prep.resume:
        meta = run.read_meta()
        # the resumable keys in force now: where this session computes, the planned steps
        meta.update(resumed_segments(meta, here), planned_steps=plan.steps)
        if main:
            run.truncate_metrics(built.engine.steps_taken)
            run.write_meta(meta)
        return meta, run.read_stats()
    log(f"validation metrics before training ({built.validation_size} records) ...")
    before = built.task.evaluate(built.model, built.val_batches) if main else {}
    records = len(built.train_ex) + prep.withheld_records  # no canary coin shows
    stats = {  # un-noised statistics of private records: private/
        "validation_size": built.validation_size,
        "truncated_records": getattr(built.train_ex, "truncated", None),
        "perplexity_before": before.get("perplexity", math.nan),
        "validation_before": before,
    }
    user_level = prep.unit is not None and prep.unit.user_level
    if prep.unit is not None:
        stats.update(prep.unit.stats(records))
    meta = {
        "name": recipe.name,
        "fingerprint": recipe.fingerprint(),
        "status": "running",
        # N of the sample rate, public: the records, or under user-level DP the people (the
        # record count is then private: beside N it would give a person's number of records)
        "dataset_size": plan.dataset_size if user_level else records,
        "expected_batch_size": plan.sample_rate * plan.dataset_size,
        "public_records": len(prep.public_texts) if prep.public_texts is not None else 0,
        "privacy_unit": prep.unit.meta() if prep.unit is not None else "record",
        **plan.meta(),
        "groups": list(built.engine.groups),
        "noise_generator": built.noise.description,
        "randomness": prep.key.describe(),
        "key_id": prep.key.key_id,
        "insecure_seed": prep.key.insecure_seed,
        "task": built.task.kind,
        "versions": versions(),
        "world_size": distributed.world_size(),
        "device": here["device"],
        "devices": [here],
        **built.engine.precision.describe(),
    }
    if main:
        run.update_stats(**stats)
        run.write_meta(meta)
        run.save_ledger(built.engine.ledger)
    return meta, stats


def _segment(built: Built, requested: str) -> dict[str, Any]:
    """Where the steps from now on are computed: ``{from_step, device, requested,
    world_size}`` (``requested``: the recipe's ``training.device``, e.g. ``auto``)."""
    return {
        "from_step": built.engine.steps_taken,
        "device": str(module_device(built.model)),
        "requested": str(requested),
        "world_size": distributed.world_size(),
    }


def resumed_segments(meta: dict[str, Any], here: dict[str, Any]) -> dict[str, Any]:
    """``run.json``'s ``device``, ``devices`` and ``world_size`` after a resume with segment
    ``here``.

    ``devices`` lists the segments of the run, oldest first: a new one starts where a resumed
    session computes on another device, from another ``training.device`` value or with another
    ``--nproc`` than the last segment (a resume that changes none of them extends it);
    ``device`` and ``world_size`` are the current segment's.  Segments at or after the resumed
    step are dropped: the checkpoint is older, so their steps are recomputed.  A run written before
    ``devices`` existed starts its list with ``{from_step: 0, device: <its device>}``.  The
    precision is not per segment: ``training.precision`` is part of the recipe's fingerprint,
    so it is the same in every session of a run."""
    segments = [dict(s) for s in meta.get("devices") or []]
    if not segments and meta.get("device") is not None:
        segments = [
            {"from_step": 0, "device": meta["device"], "world_size": meta.get("world_size")}
        ]
    segments = [s for s in segments if s["from_step"] < here["from_step"]]
    same = ("device", "requested", "world_size")
    if not segments or any(segments[-1].get(k) != here[k] for k in same):
        segments.append(dict(here))
    return {"device": here["device"], "devices": segments, "world_size": here["world_size"]}


# -- loop ---------------------------------------------------------------------------------


def loop(
    prep: Prepared,
    built: Built,
    meta: dict[str, Any],
    stats: dict[str, Any],
    progress: bool,
    max_steps_this_session: int | None,
) -> tuple[bool, float, tuple[int, int]]:
    """Private steps until the plan's steps (or this session's share) are done or the budget
    stops the run; returns (stopped by the budget, seconds, (non-finite samples, skipped
    steps) so far)."""
    recipe, run, engine = prep.recipe, prep.run, built.engine
    main = distributed.is_main()
    t = recipe.training
    total = prep.plan.steps
    first = engine.steps_taken
    end = total if max_steps_this_session is None else min(total, first + max_steps_this_session)
    bar = tqdm(
        total=total,
        initial=first,
        desc="private steps",
        unit="step",
        disable=not progress or not main,
        file=sys.stderr,
        dynamic_ncols=True,
    )
    if main:
        steplog = StepLog(
            run.private,  # private/tensorboard: the metrics' values, as private as they are
            total=total,
            first=first,
            report_to=t.report_to,
            plain=not progress,
            echo=lambda line: tqdm.write(line, file=sys.stderr),
        )
        run.listeners.append(steplog)  # sees exactly the records metrics.jsonl gets
        log(
            "note: the progress lines show each step's loss and batch size, un-noised "
            "statistics of private records (the batch sizes follow the secret coins): keep "
            "this output private, like private/metrics.jsonl"
        )
    t_train = time.perf_counter()
    eps_shown = engine.epsilon()
    nonfinite = stats.get("nonfinite_samples", 0)
    skipped = meta.get("skipped_steps", 0)
    stopped_by_budget = False
    if main and first == 0:  # before step 0 draws coins and noise: the key is never reused
        prep.key.mark_used(run.key)
    try:
        while engine.steps_taken < end:
            try:
                report = _step(built)
            except BudgetExceeded as err:
                stopped_by_budget = True
                log(f"stopping: {err}")
                break
            if report.step == first + 1:
                _report_plan(engine)
            logging = report.step % t.log_every == 0 or report.step == end
            eps = engine.epsilon() if logging else eps_shown
            eps_shown = eps
            record = {
                "step": report.step,
                "loss": report.loss,
                "batch_size": report.batch_size,
                "epsilon": eps,
                "noise_multiplier": report.noise_multiplier,
                "update_norm": report.update_norm,
                "nonfinite": report.nonfinite,
                "applied": report.applied,
                "seconds": report.seconds,
                **report.extra,
            }
            nonfinite += report.nonfinite
            skipped += not report.applied
            if main and t.eval_every and report.step % t.eval_every == 0:
                metrics = built.task.evaluate(built.model, built.val_batches)
                record.update({f"val_{k}": v for k, v in metrics.items()})
            if main and logging:
                run.save_ledger(built.engine.ledger)  # the ledger covers what the log shows
                run.log(record)
            bar.update(1)
            bar.set_postfix(loss=f"{report.loss:.3f}", eps=f"{eps:.3f}", B=report.batch_size)
            if report.step % t.checkpoint_every == 0:
                checkpoint(prep, built)
    finally:
        bar.close()
        if main:
            run.listeners.remove(steplog)
            steplog.close()
    seconds = time.perf_counter() - t_train
    checkpoint(prep, built)
    return stopped_by_budget, seconds, (nonfinite, skipped)


def _step(built: Built):
    """One private step on step t's batch (the same global batch on every rank: a function of
    (key, t, the ids)); user-level: people, each with their selected records as one segment."""
    engine = built.engine
    if isinstance(built.sampler, PersonSampler):
        batch, segments = built.sampler.batch(engine.steps_taken, built.train_ex)
        return engine.step(batch, segments=segments)
    idx = distributed.shard(built.sampler.sample(engine.steps_taken))
    return engine.step(built.train_ex.batch(idx))


def checkpoint(prep: Prepared, built: Built) -> None:
    """Rank 0 saves the ledger, then the model, optimizer, sampler and engine state."""
    if not distributed.is_main():
        return
    engine = built.engine
    # ledger first: the ledger on disk never covers fewer steps than a saved model
    prep.run.save_ledger(engine.ledger)
    prep.run.save_checkpoint(
        engine.steps_taken,
        {
            "fingerprint": prep.recipe.fingerprint(),
            "model": trainable_state(built.model),
            "optimizer": built.optimizer.state_dict(),
            "sampler": built.sampler.state_dict(),
            "engine": engine.state_dict(),
            "torch_rng": torch.get_rng_state(),
        },
    )


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _restore(state: dict[str, Any], built: Built) -> None:
    names = dict(built.model.named_parameters())
    with torch.no_grad():
        for n, t in state["model"].items():
            if n not in names:
                raise CheckpointError(
                    f"checkpoint has parameter {n} that the model lacks: a different model or LoRA config"
                )
            names[n].copy_(t)
    built.optimizer.load_state_dict(state["optimizer"])
    built.sampler.load_state_dict(state["sampler"])
    built.engine.load_state_dict(state["engine"])
    torch.set_rng_state(state["torch_rng"])


def _report_plan(engine: PrivacyEngine) -> None:
    """Say once which parameters take the exact but slow per-sample path, and why."""
    summary = engine.capture.summary()
    slow = summary["autograd_per_sample"]
    if slow:
        log(
            f"note: {len(slow)} parameter(s) ({', '.join(slow[:3])}{', ...' if len(slow) > 3 else ''}) "
            "are used in a way no per-sample rule covers (shared by the batch, or outside a "
            "layer); their per-sample gradients take one backward pass per sample: exact, "
            "slower. `dptrain check` shows the rule of every layer."
        )
    for note in summary["notes"]:
        log(f"note: {note}")


# -- finish -------------------------------------------------------------------------------


def finish(
    prep: Prepared,
    built: Built,
    meta: dict[str, Any],
    stats: dict[str, Any],
    stopped_by_budget: bool,
    train_seconds: float,
    counts: tuple[int, int],
    cross_check: bool,
) -> RunResult:
    """The final model, the guarantee in ``run.json``, the private statistics in
    ``private/stats.json`` and the summary."""
    run, plan, engine = prep.run, prep.plan, built.engine
    main = distributed.is_main()
    accountant = get_accountant(plan.accountant)
    delta = plan.delta
    finished = engine.steps_taken >= plan.steps or stopped_by_budget
    claim = guarantee_numbers(plan, engine.epsilon(), built.noise.pairs)
    after = built.task.evaluate(built.model, built.val_batches) if main else {}
    ppl_after = after.get("perplexity", math.nan)
    if finished and main:
        save_final(built.model, built.tokenizer, run.final)
    if plan.adaptive:  # what a non-adaptive schedule of the same noise would report
        meta["epsilon_non_adaptive"] = (
            accountant.epsilon(engine.ledger.events, delta) if engine.ledger.events else 0.0
        )
    meta.update(
        status="finished" if finished else "paused",
        steps=engine.steps_taken,
        **claim,
        epsilon_by_accountant={
            name: _cross_check(name, engine.ledger, delta)
            for name in ("rdp", "prv", "pld")
            if name != accountant.name and cross_check and not plan.adaptive
        }
        | {accountant.name: engine.epsilon()},
        guarantee_accountant=accountant.name,
        # exact, or gridded (an upper bound) for PLD/PRV ledgers of many distinct mechanisms
        epsilon_composition=composition(accountant, engine.ledger.events),
        guarantee=_guarantee(prep, accountant.name),
        policy=plan.policy.describe(),
        stopped_by_budget=stopped_by_budget,
        per_sample_gradients=engine.capture.summary(),
        skipped_steps=counts[1],
    )
    stats.update(
        perplexity_after=ppl_after,
        validation_after=after,
        nonfinite_samples=counts[0],
        # error texts of the per-sample planning: they may quote a Poisson batch's shapes
        per_sample_gradients_errors=engine.capture.private_notes(),
        # wall-clock time follows the Poisson batch sizes and the records' lengths: private
        train_seconds=stats.get("train_seconds", 0.0) + train_seconds,
    )
    if prep.unit is not None:
        meta["person_level"] = prep.unit.guarantee(claim["epsilon"], claim["delta_total"])
    elif recipe_person_field(prep):
        # a comparison, not the run's guarantee: it holds the data's number of people and its
        # largest records per person, which a record-level run does not make public
        stats["person_level_group_privacy"] = record_run_person_level(
            prep.recipe, prep.train_texts, engine.ledger, accountant, claim["delta_total"]
        )
    if main:
        run.update_stats(**stats)
        run.write_meta(meta)
    result = RunResult(
        run.path,
        engine.steps_taken,
        claim["epsilon"],
        delta,
        accountant.name,
        stats.get("perplexity_before", math.nan),
        ppl_after,
        stopped_by_budget,
        claim["delta_total"],
        finished,
    )
    if main:
        _print_summary(result, meta, stats)
        for note in plan.policy.describe().get("notes", []):
            print(f"note                {note}", flush=True)
    engine.detach()  # the samples below are drawn from the plain (released) model
    if main and finished and cross_check and built.task.generates:  # not for audit shadows
        from .tasks.generation import after_training

        after_training(prep.recipe, run, built.model, built.tokenizer, built.task, log)
    distributed.barrier()
    return result


def recipe_person_field(prep: Prepared) -> bool:
    return prep.recipe.data.person_field is not None


def _cross_check(name: str, ledger: Ledger, delta: float) -> float | None:
    """Epsilon of the ledger by another accountant; None if it cannot account these events."""
    try:
        return get_accountant(name).epsilon(ledger.events, delta) if ledger.events else 0.0
    except UnsupportedEventError:
        return None


def _guarantee(prep: Prepared, accountant: str) -> str:
    """What the reported (epsilon, delta) rests on, and whom it protects."""
    if prep.plan.adaptive:
        text = (
            f"{accountant} privacy filter valid under fully adaptive composition (noise chosen "
            "from released and public data; Feldman & Zrnic 2021, union bound over RDP orders)"
        )
    else:
        text = f"{accountant} accountant"
    if prep.public_texts is not None:
        text += (
            f"; covers the {len(prep.train_texts)} private training records, not the "
            f"{len(prep.public_texts)} records declared public"
        )
    if not prep.key.secure:
        text += "; NO guarantee against anyone who knows privacy.insecure_seed"
    return text


def _print_summary(r: RunResult, meta: dict[str, Any], stats: dict[str, Any]) -> None:
    others = (
        ", ".join(
            f"{k} {v:.3f}" if v is not None else f"{k} n/a"
            for k, v in meta["epsilon_by_accountant"].items()
            if k != r.accountant
        )
        or "skipped"
    )
    if meta.get("adaptive"):
        others = (
            f"non-adaptive rdp {meta['epsilon_non_adaptive']:.3f} (not valid for this run: "
            "its noise was chosen from data)"
        )
    head = f"({r.epsilon:.4f}, {r.delta_total:.3g})-DP for each training record"
    person = meta.get("person_level")
    if person is not None:  # the person is the unit: the headline is theirs
        head = person["statement"]
        if meta["privacy_unit"]["strategy"] == "example":
            head += f" (group privacy; per record: ({r.epsilon:.4f}, {r.delta_total:.3g}))"
    if meta.get("adaptive"):
        head += " (the adaptive privacy filter's budget)"
    lines = [
        "",
        f"run directory       {r.run_dir}",
        f"steps               {r.steps}{' (stopped at the budget)' if r.stopped_by_budget else ''}",
        f"{validation_line({**meta, **stats})} (private: the validation records are not "
        "covered by the guarantee)",
        f"privacy guarantee   {head}",
    ]
    shared = meta.get("shared_with_warm_start")
    if shared is not None:
        lines[-1] = (
            f"privacy guarantee   ({shared['epsilon']:.4f}, {shared['delta']:.3g})-DP for records "
            f"shared with {shared['run']} (the agent was warm-started from it: both runs "
            f"compose); {head} private to this run"
        )
    lines += [
        f"accountant          {r.accountant} (the guarantee rests on it); cross-check: {others}",
        f"guarantee           {meta['guarantee']}",
        f"noise               full-tailed Gaussian; its truncation adds "
        f"{meta['delta_noise_truncation']:.2g} to delta (included above)",
        f"dataset size        N = {meta['dataset_size']} (public: it sets q and the default delta)",
    ]
    if "epsilon_spent_adaptive" in meta:
        lines.append(
            f"note                spent so far by the filter's accounting: epsilon "
            f"{meta['epsilon_spent_adaptive']:.4f} (an odometer reading, not a guarantee)"
        )
    if person is not None:
        people, records = meta["privacy_unit"]["people"], meta["dataset_size"]
        lines[-1] = (
            f"dataset size        N = {people} people (public: N sets q and the default "
            f"delta); {stats.get('records', '?')} records (private: beside N it would give a "
            "person's number of records)"
            if meta["privacy_unit"]["strategy"] == "user"
            else f"dataset size        {records} records (they set q) of N = {people} people "
            "(it sets the default delta); both public"
        )
        lines.append(f"privacy unit        {person['how']}")
    grouped = stats.get("person_level_group_privacy")
    if grouped is not None:
        lines.append(
            f"per {grouped['unit']:<15} ({grouped['epsilon']:.4f}, {grouped['delta']:.3g})-DP "
            f"over all of their records ({grouped['why']}; private: k is a statistic of the data)"
        )
    level = meta.get("file_level")
    if level is not None:
        lines.append(
            f"file-level          ({level['epsilon']:.4f}, {level['delta']:.3g})-DP for a record "
            f"added to the data file ({level['why']})"
        )
        if level["delta"] * meta["dataset_size"] >= 1:  # delta >= 1/N: one record in the clear
            lines.append(
                "                    WARNING: that delta is at least 1/N, so it protects almost "
                "nothing for the file; the record-level guarantee above still holds. Fix: drop "
                "data.max_records, or lower epsilon or data.public_fraction"
            )
    lines.append(
        f"final model         {r.run_dir / 'final'}"
        if meta["status"] == "finished"
        else "status              paused"
    )
    lines.append(
        f"publishable         {', '.join(PUBLIC_FILES)}; everything else is private "
        f"(secret.key, private/, checkpoints/, ...: {r.run_dir / 'README.txt'})"
    )
    print("\n".join(lines), flush=True)
    if meta.get("insecure_seed") is not None:
        print(
            f"warning: privacy.insecure_seed={meta['insecure_seed']}: this run has NO privacy "
            "guarantee against anyone who knows that seed (its coins and noise can be replayed)",
            flush=True,
        )
    if not math.isfinite(r.epsilon):
        print("warning: epsilon is infinite: this run has no privacy guarantee", flush=True)
