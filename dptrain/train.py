"""``dptrain train``: a whole private fine-tuning run from a recipe, resumable.

Order of work: validate the recipe, read the data, resolve (q, delta, steps, noise) and check
the budget -- all before the model is loaded -- then train with checkpoints, and finish with
the final adapter/model, perplexities and the (epsilon, delta) guarantee.

Randomness.  Every private random choice -- the validation / public split, the canaries,
step ``t``'s Poisson batch and noise -- is a function of the run key (``secret.key``, see
:mod:`dptrain.secret`) and of ``t`` and the record ids only, so a resumed run draws what an
uninterrupted one would and an adversary holding the recipe and ``run.json`` cannot replay it.
``recipe.seed`` drives the non-private randomness (initialization, dropout).  The reported
delta includes the noise sampler's truncation term (:func:`dptrain.noise.truncation_delta`).
"""

from __future__ import annotations

import math
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from accountants import Budget, BudgetFilter, Ledger, UnsupportedEventError, get_accountant

from . import distributed
from .data import LMExamples, TextDataset, load_texts, split, tokenize
from .data.canaries import insert_canaries, write_manifest
from .data.loading import cap
from .engine import BudgetExceeded, PrivacyEngine
from .losses import causal_lm_loss, perplexity
from .models import load_model_and_tokenizer
from .noise import GaussianNoise, truncation_delta
from .policies import Policy, RunContext, make_policy
from .recipe import Recipe, RecipeError, check_against_data, dump_recipe
from .rundir import CheckpointError, RunDir, atomic_write
from .sampling import PoissonSampler
from .secret import RunKey, RunKeyError


@dataclass
class Prepared:
    """Everything resolved before the model is loaded."""

    recipe: Recipe
    run: RunDir
    train_texts: TextDataset
    val_texts: TextDataset
    sample_rate: float
    delta: float
    steps: int
    policy: Policy
    ledger: Ledger
    calibrated_noise_multiplier: float | None
    checkpoint: dict[str, Any] | None
    public_texts: TextDataset | None = None
    key: RunKey | None = None


def log(msg: str) -> None:
    """Progress messages to stderr, from rank 0 only."""
    if distributed.is_main():
        print(msg, file=sys.stderr, flush=True)


def read_data(recipe: Recipe, key: RunKey) -> tuple[TextDataset, TextDataset]:
    train, val, _ = split_data(recipe, key)
    return train, val


def split_data(recipe: Recipe, key: RunKey) -> tuple[TextDataset, TextDataset, TextDataset]:
    """``(train, validation, unused)``: ``train`` ends with the included canary records (if the
    recipe has ``data.canaries``); ``unused`` holds the records cut by ``max_records`` or
    ``max_validation_records``, never trained on (an audit's extra non-members).

    The validation split is a per-record keyed decision (:func:`dptrain.data.split`), so
    adding a record to the file changes the training set by at most that record.
    ``max_records`` is a count, not a per-record decision: it keeps the records with the
    lowest keyed hashes, so adding a record may swap one (see :func:`guarantee_numbers`)."""
    d = recipe.data
    texts = load_texts(d.path, text_field=d.text_field, format=d.format)
    if d.validation_path:
        train = texts
        val = load_texts(d.validation_path, text_field=d.text_field, format=d.format)
    else:
        train, val = split(texts, d.validation_fraction, key, "validation")
    unused = TextDataset([], [])
    if d.max_records is not None:
        train, unused = cap(train, d.max_records, key, "max_records")
    if d.max_validation_records is not None:
        val, rest = cap(val, d.max_validation_records, key, "max_validation_records")
        unused = TextDataset(unused.texts + rest.texts, unused.ids + rest.ids)
    if d.canaries is not None:
        train = insert_canaries(train, d.canaries, key)
    return train, val, unused


def read_public(
    recipe: Recipe, train: TextDataset, key: RunKey
) -> tuple[TextDataset, TextDataset | None]:
    """``(private, public)``: the split the recipe declares public (``data.public_fraction``:
    each training record is public by a per-record keyed decision, and removed from the
    private records; or ``data.public_path``); the DP guarantee covers only the private records."""
    d = recipe.data
    if d.public_fraction is not None:
        train, public = split(train, d.public_fraction, key, "public")
    elif d.public_path is not None:
        public = load_texts(d.public_path, text_field=d.text_field, format=d.format)
        shared = set(public.texts) & set(train.texts)
        if shared:
            raise RecipeError(
                f"data.public_path: {len(shared)} of its records are also private training "
                "records; public data must not contain protected records. Fix: remove them, or "
                "use data.public_fraction to carve a public split out of the training data."
            )
    else:
        return train, None
    if d.max_public_records is not None:
        public = cap(public, d.max_public_records, key, "max_public_records")[0]
    return train, public


def build_policy(recipe: Recipe) -> Policy:
    p = recipe.policy
    return make_policy(p.name, clip=p.clip, noise_multiplier=p.noise_multiplier, **p.options)


def prepare(recipe: Recipe, run_dir: str | Path | None = None, *, resume: bool = False) -> Prepared:
    """Validate everything that can be validated without the model."""
    run = RunDir(recipe.run_dir(run_dir))
    if resume:
        if not run.exists():
            raise CheckpointError(f"cannot resume: {run.path} is not a run directory (no run.json)")
        meta = run.read_meta()
        if meta.get("fingerprint") != recipe.fingerprint():
            raise CheckpointError(
                f"{run.path} was written by a different recipe: {_recipe_diff(run, recipe)}. "
                "Fix: resume with the recipe that started the run, or start a new run in another output_dir."
            )
    elif run.started():
        what = "holds a run" if run.exists() else "holds files of a run (no run.json)"
        raise RecipeError(
            f"output directory {run.path} already {what}. Fix: resume it with "
            f"--resume {run.path}, or choose another output_dir / --output."
        )
    key = _run_key(recipe, run, resume)
    train_texts, val_texts = read_data(recipe, key)
    if not len(val_texts):
        raise RecipeError(
            f"data.validation_fraction: no record of {recipe.data.path} was held out for "
            f"validation (each record is held out alone with probability "
            f"{recipe.data.validation_fraction:g}). Fix: raise data.validation_fraction or "
            "set data.validation_path."
        )
    train_texts, public_texts = read_public(recipe, train_texts, key)
    q, delta, steps = check_against_data(recipe, len(train_texts))
    if recipe.privacy.delta is None and not resume:
        log(
            f"privacy.delta not set: using 1/(10 N) = {delta:.3g} for N = {len(train_texts)} "
            "training records (N is public: it also sets the sample rate)"
        )
    policy = build_policy(recipe)
    if policy.needs_public_data and public_texts is None:
        raise RecipeError(
            f"policy.name: policy '{policy.name}' evaluates the model on public data. Fix: set "
            "data.public_fraction (e.g. 0.02: that share of the records is declared public and "
            "left out of private training) or data.public_path (a file of public records)."
        )
    acc = recipe.privacy.accountant
    if resume and getattr(policy, "noise_multiplier", 0) is None:
        # a resumed run keeps the noise it was calibrated with, whatever its new length
        policy.noise_multiplier = meta.get("calibrated_noise_multiplier")
    if getattr(policy, "noise_multiplier", 0) is None:
        sigma = policy.calibrate(recipe.privacy.epsilon, delta, steps, q, acc)
        log(
            f"calibrated noise multiplier {sigma:.4f} for epsilon={recipe.privacy.epsilon} at delta={delta:.3g} over {steps} steps ({acc})"
        )
    checkpoint = run.load_checkpoint(recipe.fingerprint()) if resume else None
    ledger = Ledger.from_dict(checkpoint["engine"]["ledger"]) if checkpoint else Ledger()
    budget = Budget(recipe.privacy.epsilon, delta)
    fil = BudgetFilter(budget, acc)
    event = policy.planned_event(q)
    if event is not None:
        fits = fil.max_steps(ledger, event)
        if fits == 0:
            spent = fil.spent(ledger) if ledger.events else 0.0
            raise RecipeError(
                f"privacy.epsilon: the budget ({budget.epsilon}, {delta:.3g}) is already spent "
                f"(epsilon {spent:.4f} after {ledger.total_steps} steps; one more step of "
                f"q={q:.4g}, sigma={event.noise_multiplier:.4g} would exceed it). Fix: start a new "
                "run with fresh data or accept a larger epsilon in a new run."
            )
        if fits < steps - ledger.total_steps:
            log(
                f"warning: the budget fits {fits} more steps of {steps - ledger.total_steps} planned; the run will stop there"
            )
    if (
        getattr(policy, "noise_multiplier", None) is not None
        and recipe.policy.noise_multiplier is None
    ):
        prepared_sigma = policy.noise_multiplier
    else:
        prepared_sigma = None
    return Prepared(
        recipe,
        run,
        train_texts,
        val_texts,
        q,
        delta,
        steps,
        policy,
        ledger,
        prepared_sigma,
        checkpoint,
        public_texts,
        key,
    )


def _run_key(recipe: Recipe, run: RunDir, resume: bool) -> RunKey:
    """The run's key: from ``privacy.insecure_seed``, or rank 0 reads ``secret.key`` (on
    ``--resume``, or left by a run that never took a step) or draws a fresh one from the OS
    CSPRNG; the other ranks receive it over the process group."""
    seed = recipe.privacy.insecure_seed
    if seed is not None:
        return RunKey.from_insecure_seed(seed)
    key: RunKey | None = None
    error: str | None = None
    if distributed.is_main():
        try:
            key = RunKey.read(run.key) if resume or run.key.exists() else RunKey.generate()
        except RunKeyError as err:
            error = str(err)
    key, error = distributed.broadcast_object((key, error))
    if error is not None:
        raise CheckpointError(error)
    return key


def _recipe_diff(run: RunDir, recipe: Recipe) -> str:
    import yaml

    try:
        old = yaml.safe_load(run.recipe.read_text())
    except Exception:
        return "its recipe.yaml is unreadable"
    new = recipe.model_dump(mode="json")
    diffs = []
    for section in sorted(set(old) | set(new)):
        a, b = old.get(section), new.get(section)
        if isinstance(a, dict) and isinstance(b, dict):
            for k in sorted(set(a) | set(b)):
                if a.get(k) != b.get(k):
                    diffs.append(f"{section}.{k}: {a.get(k)!r} -> {b.get(k)!r}")
        elif a != b and section != "output_dir":
            diffs.append(f"{section}: {a!r} -> {b!r}")
    return "; ".join(diffs[:8]) or "fingerprints differ"


def make_optimizer(recipe: Recipe, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    t = recipe.training
    if t.optimizer == "sgd":
        return torch.optim.SGD(params, lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay)
    if t.optimizer == "adam":
        return torch.optim.Adam(params, lr=t.lr, weight_decay=t.weight_decay)
    return torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay)


def build_model(recipe: Recipe) -> tuple[torch.nn.Module, Any]:
    dtype = getattr(torch, recipe.model.dtype)
    with torch.random.fork_rng():
        torch.manual_seed(recipe.seed)
        model, tok = load_model_and_tokenizer(recipe.model.name, dtype=dtype)
        if recipe.lora is not None:
            from peft import LoraConfig, get_peft_model

            cfg = LoraConfig(
                r=recipe.lora.r,
                lora_alpha=recipe.lora.alpha,
                lora_dropout=recipe.lora.dropout,
                target_modules=list(recipe.lora.target_modules),
            )
            model = get_peft_model(model, cfg)
    model.to(dtype)  # adapters are created in torch's default dtype; keep one dtype throughout
    model.train()
    return model, tok


def eval_batches(examples: LMExamples, size: int) -> list[dict[str, torch.Tensor]]:
    return [
        examples.batch(list(range(i, min(i + size, len(examples)))))
        for i in range(0, len(examples), size)
    ]


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("dptrain", "torch", "transformers", "peft", "dp-accounting", "prv-accountant"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


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


def train(
    recipe: Recipe,
    run_dir: str | Path | None = None,
    *,
    resume: bool = False,
    progress: bool = True,
    max_steps_this_session: int | None = None,
    cross_check: bool = True,
) -> RunResult:
    """Run (or resume) a recipe; see the module docstring.  Under torchrun (``WORLD_SIZE`` > 1)
    every rank runs this; rank 0 alone writes the run directory (see dptrain.distributed).
    ``cross_check=False`` skips the other accountants' epsilon in run.json (for audit shadow
    models, which are never released)."""
    distributed.init_from_env()
    main = distributed.is_main()
    prep = prepare(recipe, run_dir, resume=resume)
    if distributed.world_size() > 1 and prep.policy.adaptive:
        raise RecipeError(
            f"policy '{recipe.policy.name}' plans from each step's released outputs on one "
            "process; under --nproc the ranks would clip at different thresholds. Fix: run it "
            "with --nproc 1, or use policy static or error_feedback across processes."
        )
    distributed.barrier()  # every rank has validated the run directory before rank 0 writes
    run, q, delta = prep.run, prep.sample_rate, prep.delta
    torch.manual_seed(recipe.seed)
    fingerprint = recipe.fingerprint()
    if main:
        run.path.mkdir(parents=True, exist_ok=True)
        run.clean_partial()
        if prep.key.secure and not run.key.exists():
            prep.key.write(run.key)  # before anything that derives from it is written
        if not resume:
            atomic_write(run.recipe, lambda f: f.write(dump_recipe(recipe)))
            if recipe.data.canaries is not None:
                path = write_manifest(run.path, recipe.data.canaries, prep.key)
                log(f"inserted audit canaries; their secrets are in {path} (keep it private)")

    log(f"loading model {recipe.model.name} ...")
    t0 = time.perf_counter()
    model, tokenizer = build_model(recipe)
    log(f"model ready in {time.perf_counter() - t0:.1f}s")
    d = recipe.data
    check_context(model, d.max_length)
    train_ex = tokenize(prep.train_texts, tokenizer, d.max_length)
    val_ex = tokenize(prep.val_texts, tokenizer, d.max_length)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(recipe, params)
    noise = GaussianNoise(prep.key)
    engine = PrivacyEngine(
        model,
        optimizer,
        policy=prep.policy,
        sample_rate=q,
        dataset_size=len(train_ex),
        loss_fn=causal_lm_loss,
        grouping=recipe.policy.grouping,
        accountant=recipe.privacy.accountant,
        budget=Budget(recipe.privacy.epsilon, delta),
        max_physical_batch_size=recipe.training.physical_batch_size,
        noise=noise,
    )
    public_batches = None
    if prep.public_texts is not None:
        public_ex = tokenize(prep.public_texts, tokenizer, d.max_length)
        public_batches = eval_batches(public_ex, recipe.training.physical_batch_size)
    prep.policy.attach(RunContext(model, prep.steps, recipe.seed, public_batches))
    sampler = PoissonSampler(train_ex.ids, q, prep.key)
    val_batches = eval_batches(val_ex, recipe.training.physical_batch_size)
    accountant = get_accountant(recipe.privacy.accountant)

    if resume:
        if prep.checkpoint is not None:
            _restore(prep.checkpoint, model, optimizer, sampler, engine)
            log(f"resumed {run.path} at step {engine.steps_taken} (epsilon {engine.epsilon():.4f})")
        if main:
            run.truncate_metrics(engine.steps_taken)
        meta = run.read_meta()
        ppl_before = meta["perplexity_before"]
    else:
        log(f"validation perplexity before training ({len(val_ex)} records) ...")
        ppl_before = perplexity(model, val_batches) if main else math.nan
        meta = {
            "name": recipe.name,
            "fingerprint": fingerprint,
            "status": "running",
            "dataset_size": len(train_ex),
            "validation_size": len(val_ex),
            "truncated_records": getattr(train_ex, "truncated", None),
            "sample_rate": q,
            "expected_batch_size": q * len(train_ex),
            "delta": delta,
            "epsilon_budget": recipe.privacy.epsilon,
            "accountant": recipe.privacy.accountant,
            "adaptive": prep.policy.adaptive,
            "public_records": len(prep.public_texts) if prep.public_texts is not None else 0,
            "planned_steps": prep.steps,
            "policy": prep.policy.describe(),
            "calibrated_noise_multiplier": prep.calibrated_noise_multiplier,
            "grouping": recipe.policy.grouping,
            "groups": list(engine.groups),
            "noise_generator": noise.description,
            "randomness": prep.key.describe(),
            "key_id": prep.key.key_id,
            "insecure_seed": prep.key.insecure_seed,
            "perplexity_before": ppl_before,
            "versions": _versions(),
            "world_size": distributed.world_size(),
        }
        if main:
            run.write_meta(meta)
            engine.ledger.save(run.ledger)

    def checkpoint() -> None:
        if not main:
            return
        # ledger first: the ledger on disk never covers fewer steps than a saved model
        engine.ledger.save(run.ledger)
        run.save_checkpoint(
            engine.steps_taken,
            {
                "fingerprint": fingerprint,
                "model": trainable_state(model),
                "optimizer": optimizer.state_dict(),
                "sampler": sampler.state_dict(),
                "engine": engine.state_dict(),
                "torch_rng": torch.get_rng_state(),
            },
        )

    stopped_by_budget = False
    total = prep.steps
    start = engine.steps_taken
    end = total if max_steps_this_session is None else min(total, start + max_steps_this_session)
    bar = tqdm(
        total=total,
        initial=start,
        desc="private steps",
        unit="step",
        disable=not progress or not main,
        file=sys.stderr,
        dynamic_ncols=True,
    )
    t_train = time.perf_counter()
    eps_shown = engine.epsilon()
    nonfinite = meta.get("nonfinite_samples", 0)
    skipped = meta.get("skipped_steps", 0)
    try:
        while engine.steps_taken < end:
            # same global batch on every rank: a function of (key, step, record ids)
            idx = distributed.shard(sampler.sample(engine.steps_taken))
            batch = train_ex.batch(idx)
            try:
                report = engine.step(batch)
            except BudgetExceeded as err:
                stopped_by_budget = True
                log(f"stopping: {err}")
                break
            if report.step == start + 1:
                _report_plan(engine)
            logging = report.step % recipe.training.log_every == 0 or report.step == end
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
            if (
                main
                and recipe.training.eval_every
                and report.step % recipe.training.eval_every == 0
            ):
                record["val_perplexity"] = perplexity(model, val_batches)
            if main and logging:
                run.log(record)
            bar.update(1)
            bar.set_postfix(loss=f"{report.loss:.3f}", eps=f"{eps:.3f}", B=report.batch_size)
            if report.step % recipe.training.checkpoint_every == 0:
                checkpoint()
    finally:
        bar.close()
    train_seconds = time.perf_counter() - t_train
    checkpoint()
    finished = engine.steps_taken >= total or stopped_by_budget
    claim = guarantee_numbers(prep, engine.epsilon(), noise.pairs)
    eps = claim["epsilon"]
    ppl_after = perplexity(model, val_batches) if main else math.nan
    if finished and main:
        _save_final(model, tokenizer, run.final)
    if prep.policy.adaptive:  # what a non-adaptive schedule of the same noise would report
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
            if name != accountant.name and cross_check and not prep.policy.adaptive
        }
        | {accountant.name: engine.epsilon()},
        guarantee_accountant=accountant.name,
        guarantee=_guarantee(prep, accountant.name),
        policy=prep.policy.describe(),
        stopped_by_budget=stopped_by_budget,
        per_sample_gradients=engine.capture.summary(),
        perplexity_after=ppl_after,
        nonfinite_samples=nonfinite,
        skipped_steps=skipped,
        train_seconds=meta.get("train_seconds", 0.0) + train_seconds,
    )
    if main:
        run.write_meta(meta)
    result = RunResult(
        run.path,
        engine.steps_taken,
        eps,
        delta,
        accountant.name,
        ppl_before,
        ppl_after,
        stopped_by_budget,
        claim["delta_total"],
    )
    if main:
        _print_summary(result, meta)
        for note in prep.policy.describe().get("notes", []):
            print(f"note                {note}", flush=True)
    engine.detach()
    distributed.barrier()
    if main and finished and recipe.audit is not None and recipe.audit.after_training:
        from attacks.audit import audit_run

        audit_run(run.path, recipe.audit, progress=progress)
    elif main and finished and recipe.audit is not None and recipe.audit.whitebox:
        from attacks.report import whitebox_verdict
        from attacks.whitebox import audit_configuration

        w = audit_configuration(run.path, recipe.audit, log=log)
        print(f"white-box audit      {whitebox_verdict(w)[1][0]}", flush=True)
        print(f"report              {run.path / 'audit' / 'whitebox.html'}", flush=True)
    return result


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


def _cross_check(name: str, ledger: Ledger, delta: float) -> float | None:
    """Epsilon of the ledger by another accountant; None if it cannot account these events."""
    try:
        return get_accountant(name).epsilon(ledger.events, delta) if ledger.events else 0.0
    except UnsupportedEventError:
        return None


def check_context(model: torch.nn.Module, max_length: int) -> None:
    """Refuse sequences longer than the model's context before any step runs."""
    cfg = getattr(model, "config", None)
    ctx = getattr(cfg, "n_positions", None) or getattr(cfg, "max_position_embeddings", None)
    if ctx is not None and max_length > ctx:
        raise RecipeError(
            f"data.max_length: {max_length} tokens exceeds the model's context of {ctx} tokens. "
            f"Fix: set data.max_length to at most {ctx} (longer records are truncated)."
        )


def _restore(state: dict[str, Any], model, optimizer, sampler, engine) -> None:
    names = dict(model.named_parameters())
    with torch.no_grad():
        for n, t in state["model"].items():
            if n not in names:
                raise CheckpointError(
                    f"checkpoint has parameter {n} that the model lacks: a different model or LoRA config"
                )
            names[n].copy_(t)
    optimizer.load_state_dict(state["optimizer"])
    sampler.load_state_dict(state["sampler"])
    engine.load_state_dict(state["engine"])
    torch.set_rng_state(state["torch_rng"])


def _save_final(model: torch.nn.Module, tokenizer: Any, path: Path) -> None:
    """Write the adapter (peft) or full model plus tokenizer, atomically as a directory."""
    import shutil
    import tempfile

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".final-", dir=path.parent))
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if path.exists():
        old = path.with_name(".final-old")
        shutil.rmtree(old, ignore_errors=True)
        path.rename(old)
        tmp.rename(path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(path)


def _guarantee(prep: Prepared, accountant: str) -> str:
    """What the reported (epsilon, delta) rests on, and whom it protects."""
    if prep.policy.adaptive:
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
    if prep.key is not None and not prep.key.secure:
        text += "; NO guarantee against anyone who knows privacy.insecure_seed"
    return text


def guarantee_numbers(prep: Prepared, spent: float, noise_pairs: int) -> dict[str, Any]:
    """The run's reported guarantee (run.json keys): ``epsilon`` at ``delta_total`` = the
    accountant's delta + the noise sampler's truncation term (:func:`truncation_delta`).

    Adaptive policies: the certified epsilon is the privacy filter's budget, not the spend so
    far (``epsilon_spent_adaptive``, an odometer reading).  ``rl.init_from``: records shared
    with the warm-start run are covered by the composition of both certified guarantees.
    ``data.max_records``: file-level neighbours may differ by 2 training records (group
    privacy, ``(2 eps, (1 + e^eps) delta)``)."""
    recipe = prep.recipe
    adaptive = prep.policy.adaptive
    eps = float(recipe.privacy.epsilon) if adaptive else float(spent)
    term = truncation_delta(eps, noise_pairs)
    out: dict[str, Any] = {
        "epsilon": eps,
        "delta_noise_truncation": term,
        "delta_total": prep.delta + term,
        "noise_pairs": noise_pairs,
    }
    if adaptive:
        out["epsilon_spent_adaptive"] = float(spent)
    warm = getattr(prep.policy, "warm_start", None)
    if warm is not None:
        out["shared_with_warm_start"] = {
            "run": warm["run"],
            "epsilon": eps + float(warm["epsilon"]),
            "delta": out["delta_total"] + float(warm["delta"]),
        }
    if recipe.data.max_records is not None:
        d = out["delta_total"]
        out["file_level"] = {
            "epsilon": 2 * eps,
            "delta": min(1.0, (1 + math.exp(min(eps, 700.0))) * d) if math.isfinite(eps) else 1.0,
            "why": "data.max_records keeps a count, so an added record can swap another one "
            "out (group privacy over 2 records); without max_records the record-level "
            "guarantee holds for the file too",
        }
    return out


def _print_summary(r: RunResult, meta: dict[str, Any]) -> None:
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
    if meta.get("adaptive"):
        head += " (the adaptive privacy filter's budget)"
    lines = [
        "",
        f"run directory       {r.run_dir}",
        f"steps               {r.steps}{' (stopped at the budget)' if r.stopped_by_budget else ''}",
        f"val perplexity      {r.perplexity_before:.3f} -> {r.perplexity_after:.3f}",
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
    level = meta.get("file_level")
    if level is not None:
        lines.append(
            f"file-level          ({level['epsilon']:.4f}, {level['delta']:.3g})-DP for a record "
            f"added to the data file ({level['why']})"
        )
    lines.append(
        f"final model         {r.run_dir / 'final'}"
        if meta["status"] == "finished"
        else "status              paused"
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
