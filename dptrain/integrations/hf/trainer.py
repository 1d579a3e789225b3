"""``DPTrainer``: a ``transformers.Trainer`` whose every optimizer step is the privacy engine's.

What changes against the Trainer (everything else -- the optimizer and scheduler built from
``TrainingArguments``, callbacks, logging, evaluation, checkpoint folders -- is the Trainer's):

    batches      step t's batch is the keyed Poisson sample of step t
                 (:mod:`dptrain.integrations.hf.data`); the Trainer's sampler is never built
    the step     ``training_step`` runs ``PrivacyEngine.step`` on the whole Poisson batch
                 (forward and backward per physical chunk, clip per sample, sum, noise once,
                 ledger, optimizer step); the optimizer the Trainer holds
                 (:class:`AppliedByEngine`) no longer steps, the scheduler still sets its lr
    the plan     q, delta, T steps and the noise resolved by :func:`dptrain.plan.plan_privacy`
                 from a recipe built of ``PrivacyArguments`` and ``TrainingArguments``; a
                 budget that cannot take one step is refused before the model trains
    the budget   the engine refuses a step before it runs; after each step the trainer stops
                 training when the next one would not fit (``PrivacyCallback``)
    logs         every Trainer log gets ``epsilon`` (spent so far, at the plan's delta);
                 ``grad_norm`` is the norm of the released (noised) update; ``loss`` is, as
                 the Trainer's, the mean over the line's optimizer steps of each step's loss
                 (:class:`LossMeans`): the mean per-record loss of its whole Poisson batch,
                 whatever ``gradient_accumulation_steps``; steps with an empty batch have no
                 loss and are left out (the Trainer would count them as 0; a line of such
                 steps only has no ``loss``);
                 ``train_loss`` likewise over the run; a statistic of private data, which the
                 ``report_to`` integrations get only with
                 ``PrivacyArguments.report_private_metrics`` (:mod:`.logs`); before any log
                 line is shown, ``output_dir/ledger.json`` is saved (atomically) so that it
                 covers every step the line reports
    checkpoints  ``checkpoint-N/dptrain_privacy.pt`` (ledger, policy, noise position, the
                 plan's fingerprint; never the key) is written atomically, and
                 ``output_dir/ledger.json`` before it, both before the Trainer writes the
                 model of that checkpoint; resuming reads it back or is refused
    the key      ``output_dir/ledger.json`` is first written when the run starts; a new run
                 refuses a ``secret.key`` that a started run has used
    the end      ``output_dir/privacy.json``: the plan and the (epsilon, delta) guarantee
    the length   ``PrivacyArguments.max_length`` (public) reaches the engine as in ``dptrain
                 train``: float32 Grams for wide ghost norms, and the padding probe with the
                 collator's padding (:class:`~.data.BatchPadder`); a batch wider than it is
                 refused before its step (:func:`~.data.check_length`)

The run key is ``key_dir/secret.key`` (default ``output_dir``), as in ``dptrain train``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, TrainOutput, get_last_checkpoint

from accountants import BudgetExceeded, Ledger
from accountants.ledger import atomic_write

from ...data.lm import LMExamples, pad_token_id
from ...engine import PrivacyEngine, StepReport
from ...grad_sample import UnsupportedLayerError
from ...losses import LossFn
from ...noise import GaussianNoise
from ...plan import RunPlan, check_run, guarantee_numbers, plan_privacy
from ...policies import RunContext
from ...recipe import parse_recipe
from ...rundir import CHECKPOINT_FORMAT, CHECKPOINT_VERSION, load_checkpoint_file, write_json
from ...sampling import PoissonSampler
from ...secret import RunKey, run_key
from .arguments import DPTrainerError, PrivacyArguments, TrainingValues, refusals, training_values
from .data import (
    PIECE_KEY,
    STEP_KEY,
    BatchPadder,
    PadCollator,
    PoissonBatches,
    StepCollator,
    StepRecords,
    check_length,
    record_ids,
)
from .logs import is_integration, public_logs
from .losses import default_loss

log = logging.getLogger(__name__)

PRIVACY_STATE = "dptrain_privacy.pt"  # in each checkpoint-N folder
LEDGER_FILE = "ledger.json"  # in output_dir
PRIVACY_FILE = "privacy.json"  # in output_dir, at the end of training


class AppliedByEngine(torch.optim.Optimizer):
    """The optimizer the Trainer holds: a view of the real optimizer's ``param_groups``, state
    and state dict (so the lr scheduler and checkpoints act on the real one, also after a
    ``load_state_dict`` replaced its groups) whose ``step`` does nothing, because the private
    step has already applied the released update with the real optimizer."""

    def __init__(self, inner: torch.optim.Optimizer) -> None:  # no super().__init__: a view
        self.inner = inner

    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        return self.inner.param_groups

    @param_groups.setter
    def param_groups(self, groups: list[dict[str, Any]]) -> None:
        self.inner.param_groups = groups

    @property
    def defaults(self) -> dict[str, Any]:  # type: ignore[override]
        return self.inner.defaults

    @property
    def state(self) -> Any:  # type: ignore[override]
        return self.inner.state

    def step(self, closure: Any = None) -> None:  # type: ignore[override]
        return None

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.inner.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return self.inner.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.inner.load_state_dict(state_dict)

    def __getattr__(self, name: str) -> Any:  # train()/eval() of schedule-free optimizers, ...
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    def __repr__(self) -> str:
        return f"AppliedByEngine({self.inner!r})"


class LossMeans:
    """The logged ``loss`` (mean over the optimizer steps since the last log line) and
    ``train_loss`` (over the run's steps in this process) of a private run.

    Step t's loss is ``L_t = (1/n_t) sum_{i in B_t} loss_i``: the mean per-record loss of its
    whole Poisson batch (the engine's objective; the Trainer's own token-weighted mean differs
    where records have different numbers of labelled tokens), the same for any number of
    accumulation micro-steps.  A step with no finite per-record loss (an empty Poisson batch,
    a refused step) has no ``L_t`` and is not counted; a window without any has no mean (its
    log line has no ``loss``: a NaN would read as divergence), a run without any a NaN
    ``train_loss``."""

    def __init__(self) -> None:
        self.window = [0.0, 0]
        self.total = [0.0, 0]

    def add(self, report: StepReport) -> bool:
        """Count ``report``'s step if it has a loss; says whether it had one."""
        if report.batch_size - report.nonfinite <= 0 or not math.isfinite(report.loss):
            return False
        for acc in (self.window, self.total):
            acc[0] += report.loss
            acc[1] += 1
        return True

    def take_window(self) -> float | None:
        """The window's mean (None: no step of it had a loss), starting a new window."""
        (total, n), self.window = self.window, [0.0, 0]
        return total / n if n else None

    def run_mean(self) -> float:
        total, n = self.total
        return total / n if n else math.nan


class _PoissonLoader(DataLoader):
    """A DataLoader whose ``set_epoch`` reaches the Poisson batch sampler."""

    def set_epoch(self, epoch: int) -> None:
        self.batch_sampler.set_epoch(epoch)


class PrivacyCallback(TrainerCallback):
    """Keeps the Trainer's step count equal to the private steps taken, and stops training
    when the budget cannot take the next step."""

    def __init__(self, trainer: DPTrainer) -> None:
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        engine = self.trainer.engine
        if engine is None:
            return control
        state.global_step = engine.steps_taken  # a refused step is no step
        if self.trainer.stopped_by_budget is None and engine.next_step_fits() is False:
            self.trainer.stopped_by_budget = (
                f"budget epsilon={engine.budget.epsilon} at delta={engine.budget.delta:.3g} "
                f"reached after {engine.steps_taken} steps (epsilon {engine.epsilon():.4f})"
            )
        if self.trainer.stopped_by_budget is not None and not control.should_training_stop:
            self.trainer.save_ledger()  # the line shows the epsilon spent
            log.warning("stopping: %s", self.trainer.stopped_by_budget)
            control.should_training_stop = True
            if args.save_strategy != "no":
                control.should_save = True  # the last model is covered by the ledger: keep it
        return control

    def on_train_end(self, args, state, control, **kwargs):
        self.trainer.write_privacy_report()
        return control


class DPTrainer(Trainer):
    """A ``transformers.Trainer`` with differentially private steps (see the module docstring).

    ``privacy``: the budget, policy, clip, noise and key (:class:`PrivacyArguments`);
    ``loss_fn(model, batch) -> (B,)`` per-sample losses (default: by the model's head,
    :func:`dptrain.integrations.hf.losses.default_loss`).  Settings that would break the
    guarantee raise :class:`DPTrainerError` listing each with its fix.

    ``pad(batch, n)`` (with ``PrivacyArguments.max_length``): the collator's padding for the
    engine's padding probe, the batch's samples padded to ``n`` positions (None: to their
    longest) as the collator pads; default :class:`~.data.BatchPadder` of the
    ``processing_class`` tokenizer (or of :class:`~.data.PadCollator`)."""

    def __init__(
        self,
        model: Any = None,
        args: Any = None,
        *,
        privacy: PrivacyArguments | None = None,
        loss_fn: LossFn | None = None,
        pad: Callable[[Any, int | None], Any] | None = None,
        **kwargs: Any,
    ) -> None:
        if kwargs.get("model_init") is not None:
            raise DPTrainerError(
                "model_init: each re-initialized model would be another run on the same data "
                "(privacy composes over them). Fix: pass the model itself"
            )
        self.privacy = privacy if privacy is not None else PrivacyArguments()
        if kwargs.get("data_collator") is None and isinstance(
            kwargs.get("train_dataset"), LMExamples
        ):
            kwargs["data_collator"] = PadCollator(pad_token_id=kwargs["train_dataset"].pad_token_id)
        super().__init__(model=model, args=args, **kwargs)
        self._refuse(custom_loss=loss_fn is not None)
        self.loss_fn = (
            loss_fn
            if loss_fn is not None
            else default_loss(self.model, self.args.label_smoothing_factor)
        )
        self.values: TrainingValues = training_values(self.args, self.privacy)
        self.engine: PrivacyEngine | None = None
        self.plan: RunPlan | None = None
        self.key: RunKey | None = None
        self.noise: GaussianNoise | None = None
        self.sampler: PoissonSampler | None = None
        self.stopped_by_budget: str | None = None
        self.last_report: StepReport | None = None
        self._warned_nonfinite = False  # the non-finite records warning, once per trainer
        self._resume_state: dict[str, Any] | None = None
        self._ledger_saved_at: int | None = None  # engine steps covered by ledger.json
        self.losses = LossMeans()
        self.add_callback(PrivacyCallback(self))
        self.max_length, self.pad = self._length_and_pad(pad)

    def _length_and_pad(self, pad: Callable | None) -> tuple[int | None, Callable | None]:
        """The public length bound (``PrivacyArguments.max_length``, else an
        :class:`LMExamples` train_dataset's own) and the padding probe's ``pad``: the caller's,
        else the collator's (:class:`PadCollator`: right, its pad id) or the
        ``processing_class`` tokenizer's (its pad id, else EOS, and ``padding_side``)."""
        length = self.privacy.max_length
        ds = self.train_dataset
        if length is None and isinstance(ds, LMExamples) and ds.max_length is not None:
            length = int(ds.max_length)  # tokenize() cut every record to it: public
        if length is None:
            if pad is not None:
                raise DPTrainerError(
                    "pad: the padding probe pads up to the public bound on a record's tokens. "
                    "Fix: set PrivacyArguments(max_length=L) too"
                )
            return None, None
        if pad is not None:
            return length, pad
        collate = self.data_collator
        if isinstance(collate, PadCollator):
            return length, BatchPadder(collate.pad["input_ids"], "right")
        tok = self.processing_class
        tok = getattr(tok, "tokenizer", tok)  # a processor's tokenizer
        pad_id = None
        if tok is not None and hasattr(tok, "padding_side"):
            try:
                pad_id = pad_token_id(tok)
            except ValueError:
                pad_id = None
        if pad_id is None:
            log.warning(
                "PrivacyArguments.max_length = %d: no tokenizer (processing_class) with a pad "
                "token, so the padding probe is off (a model whose outputs follow the "
                "batch's padded length is not refused). Fix: pass processing_class=tokenizer, "
                "or DPTrainer(pad=f) padding as your collator does",
                length,
            )
            return length, None
        return length, BatchPadder(pad_id, str(tok.padding_side))

    # -- refusals ------------------------------------------------------------------------

    def _refuse(self, *, custom_loss: bool) -> None:
        problems = refusals(self.args, self.privacy, custom_loss=custom_loss)
        if self.compute_loss_func is not None:
            problems.append(
                "compute_loss_func: it returns a batch loss; the engine needs one loss per "
                "sample. Fix: pass DPTrainer(..., loss_fn=f) with f(model, batch) -> (B,)"
            )
        cls = type(self)
        for name in ("compute_loss", "get_train_dataloader", "_get_train_sampler"):
            if getattr(cls, name) is not getattr(DPTrainer, name):
                problems.append(
                    f"{cls.__name__}.{name}: overridden, but private training never uses it "
                    "(batches are keyed Poisson samples, the loss is loss_fn per sample). "
                    "Fix: remove the override and pass loss_fn"
                )
        if problems:
            raise DPTrainerError(
                "DPTrainer cannot keep the privacy guarantee with these settings:\n  - "
                + "\n  - ".join(problems)
            )

    # -- planning ------------------------------------------------------------------------

    def train(self, resume_from_checkpoint: str | bool | None = None, trial: Any = None, **kw: Any):
        """Plan the private run (or read back a checkpoint's privacy state), then train."""
        if trial is not None:
            raise DPTrainerError(
                "trial: a hyperparameter search trains many models on the same data; their "
                "privacy composes and no single ledger covers it. Fix: search on public data"
            )
        if self.engine is not None:
            raise DPTrainerError(
                "train() was already called on this DPTrainer: its ledger belongs to that run. "
                "Fix: build a new DPTrainer with resume_from_checkpoint to continue it"
            )
        if resume_from_checkpoint is True:
            resume_from_checkpoint = get_last_checkpoint(self.args.output_dir)
            if resume_from_checkpoint is None:
                raise DPTrainerError(
                    f"resume_from_checkpoint: no checkpoint in {self.args.output_dir}"
                )
        if resume_from_checkpoint:
            self._resume_state = _read_privacy_state(Path(resume_from_checkpoint))
        self._plan()
        out = super().train(resume_from_checkpoint=resume_from_checkpoint or None, **kw)
        return TrainOutput(out.global_step, self.losses.run_mean(), out.metrics)

    def _plan(self) -> None:
        ds = self.train_dataset
        if ds is None or isinstance(ds, IterableDataset) or not hasattr(ds, "__len__"):
            raise DPTrainerError(
                "train_dataset: Poisson sampling needs a dataset with a length and indexed "
                "records (each record its own coins). Fix: pass a map-style dataset"
            )
        ids = record_ids(ds, self.privacy.id_column)
        v, p = self.values, self.privacy
        data = {
            "name": "hf-trainer",
            "seed": int(self.args.seed),
            "model": {"name": f"hf-trainer:{type(self.model).__name__}"},
            "data": {"path": "hf-trainer:train_dataset"},
            "training": {
                "steps": v.steps,
                "epochs": v.epochs,
                "batch_size": v.batch_size,
                "sample_rate": v.sample_rate,
                "physical_batch_size": v.physical_batch_size,
            },
            "policy": {
                "name": p.policy,
                "grouping": p.grouping,
                "clip": v.clip,
                "noise_multiplier": p.noise_multiplier,
                **p.policy_options,
            },
            "privacy": {
                "epsilon": p.epsilon,
                "delta": p.delta,
                "accountant": p.accountant,
                "insecure_seed": p.insecure_seed,
            },
        }
        recipe = parse_recipe(data, "(DPTrainer's PrivacyArguments and TrainingArguments)")
        state = self._resume_state
        restored = state.get("calibrated_noise_multiplier") if state else None
        plan = plan_privacy(recipe, len(ids), restored_noise=restored)
        ledger = Ledger.from_dict(state["engine"]["ledger"]) if state else Ledger()
        if state is not None:
            _check_same_run(state, recipe.fingerprint(), len(ids))
        check_run(plan, public_records=None, ledger=ledger)
        key_dir = p.key_dir or self.args.output_dir
        if state is None and p.insecure_seed is None:
            _check_fresh_key(Path(key_dir), Path(self.args.output_dir))
        key = run_key(key_dir, p.insecure_seed, create=state is None)
        if state is not None and state["key_id"] != key.key_id:
            raise DPTrainerError(
                f"resume_from_checkpoint: the checkpoint was written with another run key than "
                f"{Path(key_dir) / 'secret.key'}. Fix: resume with the key_dir of that run"
            )
        if plan.delta_defaulted and state is None:
            log.warning(
                "PrivacyArguments.delta not set: using 1/(10 N) = %.3g for N = %d records",
                plan.delta,
                len(ids),
            )
        if not key.secure:
            log.warning("%s", key.describe())
        trackers = [
            type(cb).__name__ for cb in self.callback_handler.callbacks if is_integration(cb)
        ]
        if trackers and p.report_private_metrics:
            log.warning(
                "PrivacyArguments.report_private_metrics: %s receive the un-noised training "
                "loss, token counts and timings (statistics of private data, not covered by "
                "the guarantee)",
                ", ".join(trackers),
            )
        self.plan, self.key = plan, key
        self.sampler = PoissonSampler(ids, plan.sample_rate, key)
        if state is None and self.args.should_save:  # the run has started: its key is spent
            ledger.save(Path(self.args.output_dir) / LEDGER_FILE)
            self._ledger_saved_at = 0

    # -- the Trainer's hooks -------------------------------------------------------------

    def get_train_dataloader(self) -> DataLoader:
        """The planned steps' Poisson batches (see :mod:`dptrain.integrations.hf.data`)."""
        if self.plan is None or self.sampler is None:
            raise DPTrainerError("the train dataloader exists only inside DPTrainer.train()")
        ds, collate = self.train_dataset, self.data_collator
        try:
            import datasets

            is_hf = isinstance(ds, datasets.Dataset)
        except ImportError:
            is_hf = False
        if is_hf:
            ds = self._remove_unused_columns(ds, description="training")
        else:
            collate = self._get_collator_with_removed_columns(collate, description="training")
        batches = PoissonBatches(self.sampler, self.plan.steps, self.values.pieces)
        start = self._resume_state["step"] if self._resume_state else 0
        batches.set_epoch(start // batches.steps_per_epoch)
        workers = self.args.dataloader_num_workers
        return _PoissonLoader(
            StepRecords(ds),
            batch_sampler=batches,
            collate_fn=StepCollator(collate),
            num_workers=workers,
            pin_memory=self.args.dataloader_pin_memory,
            persistent_workers=self.args.dataloader_persistent_workers and workers > 0,
        )

    def set_initial_training_values(self, args: Any, dataloader: DataLoader) -> tuple:
        """Epochs and steps from the plan: T steps, ``ceil(1/q)`` steps per epoch."""
        batches: PoissonBatches = dataloader.batch_sampler
        plan = self.plan
        steps, per_epoch = plan.steps, batches.steps_per_epoch
        expected = plan.sample_rate * plan.dataset_size
        return (
            math.ceil(steps / per_epoch),  # num_train_epochs
            per_epoch,  # num_update_steps_per_epoch
            plan.dataset_size,  # num_examples
            round(steps * expected),  # num_train_samples (expected)
            max(1, round(expected)),  # total_train_batch_size (expected Poisson batch)
            per_epoch * batches.pieces,  # steps_in_epoch (dataloader items)
            steps,  # max_steps
        )

    def create_optimizer(self, model: Any = None) -> torch.optim.Optimizer:
        """The Trainer's optimizer, driven by a new privacy engine (restored on resume); the
        Trainer keeps an :class:`AppliedByEngine` view of it."""
        if isinstance(self.optimizer, AppliedByEngine):
            return self.optimizer
        real = super().create_optimizer(model)
        plan, v = self.plan, self.values
        if plan is None or self.key is None:
            raise DPTrainerError("the optimizer is created inside DPTrainer.train()")
        self.noise = GaussianNoise(self.key)
        self.engine = PrivacyEngine(
            self.model,
            real,
            policy=plan.policy,
            sample_rate=plan.sample_rate,
            dataset_size=plan.dataset_size,
            loss_fn=self.loss_fn,
            grouping=self.privacy.grouping,
            accountant=plan.accountant,
            budget=plan.budget,
            max_physical_batch_size=v.physical_batch_size,
            noise=self.noise,
            ghost=self.privacy.ghost,
            max_length=self.max_length,  # public: float32 Grams for wide layers' ghost norms
            pad=self.pad,  # the padding probe: outputs must not follow the padded length
        )
        plan.policy.attach(RunContext(self.model, plan.steps, int(self.args.seed), None))
        if self._resume_state is not None:
            self.engine.load_state_dict(self._resume_state["engine"])
            self.sampler.load_state_dict(self._resume_state["sampler"])
        self.optimizer = AppliedByEngine(real)
        return self.optimizer

    def training_step(
        self, model: Any, inputs: dict[str, Any], num_items_in_batch: Any = None
    ) -> torch.Tensor:
        """One private step on the step's whole Poisson batch (at its last piece).  Returns the
        step's loss for the Trainer's accumulator, 0 for a marker piece and a step without a
        loss; the logged values are :class:`LossMeans`' (see :meth:`log`)."""
        engine = self.engine
        step, piece = inputs.pop(STEP_KEY), inputs.pop(PIECE_KEY)
        if step != engine.steps_taken:
            raise DPTrainerError(
                f"the Trainer fed step {step}'s Poisson batch at private step "
                f"{engine.steps_taken}: its batches are out of step with the coins. Fix: "
                "resume with the checkpoint's own trainer_state.json and ignore_data_skip=False"
            )
        if piece < self.values.pieces - 1:  # a marker: the virtual batch comes at its end
            return torch.zeros((), device=self.args.device)
        model.train()
        if inputs and self.max_length is not None:
            check_length(inputs, self.max_length, step)
        batch = self._prepare_input(inputs) if inputs else None
        with self.compute_loss_context_manager():
            try:
                report = engine.step(batch)
            except BudgetExceeded as err:
                self.stopped_by_budget = str(err)
                self.control.should_training_stop = True
                return torch.zeros((), device=self.args.device)
            except (UnsupportedLayerError, ValueError) as err:
                renamed = in_trainer_terms(err)
                if renamed is None:
                    raise
                raise renamed from err
        self.last_report = report
        if report.nonfinite and not self._warned_nonfinite:
            self._warned_nonfinite = True  # once: a statistic of private records, for their owner
            log.warning(
                "private step %d: %d of its %d records had a non-finite loss or gradient and "
                "contributed nothing (the step is charged all the same). Common causes: left "
                "padding under eager attention, whose fully masked rows turn to NaN (fix: "
                "attn_implementation='sdpa', or pad on the right), fp16 overflow (a smaller "
                "loss scale), or a diverging model (a lower learning rate)",
                step,
                report.nonfinite,
                report.batch_size,
            )
        counted = self.losses.add(report)
        return torch.tensor(report.loss if counted else 0.0, device=self.args.device)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """The Trainer's log line with ``epsilon`` spent so far; ``grad_norm`` is the norm of
        the released (noised) update (the Trainer's own is of cleared gradients); ``loss``
        and ``train_loss`` are :class:`LossMeans`'.

        ``output_dir/ledger.json`` is saved first: no line shows a step the ledger on disk
        does not cover.  The console, the user's callbacks and the log history get the whole
        line; the ``report_to`` integrations get :func:`.logs.public_logs` of it unless
        ``PrivacyArguments.report_private_metrics`` is set."""
        if self.engine is not None:
            self.save_ledger()
            logs["epsilon"] = self.engine.epsilon()
            if "loss" in logs:  # the Trainer's sum / steps would count empty batches as 0
                mean = self.losses.take_window()
                if mean is None:
                    del logs["loss"]
                else:
                    logs["loss"] = mean
            if "train_loss" in logs:
                logs["train_loss"] = self.losses.run_mean()
            if "grad_norm" in logs and self.last_report is not None:
                logs["grad_norm"] = self.last_report.update_norm
        handler = self.callback_handler
        everyone = handler.callbacks
        trackers = [cb for cb in everyone if is_integration(cb)]
        if not trackers or self.privacy.report_private_metrics:
            super().log(logs, start_time)
            return
        try:
            handler.callbacks = [cb for cb in everyone if not is_integration(cb)]
            super().log(logs, start_time)  # adds epoch, token counts; console, log history
            public = public_logs(logs, public_eval=self.privacy.public_eval)
            if self.last_report is None:  # no released update yet: not a released norm
                public.pop("grad_norm", None)
            if set(public) - {"epoch"}:
                handler.callbacks = trackers
                self.control = handler.on_log(self.args, self.state, self.control, public)
        finally:
            handler.callbacks = everyone

    def save_ledger(self) -> None:
        """Save ``output_dir/ledger.json`` atomically if it lacks steps the engine has taken
        (rank 0; before any output that shows those steps)."""
        engine = self.engine
        if engine is None or not self.args.should_save:
            return
        if self._ledger_saved_at != engine.steps_taken:
            engine.ledger.save(Path(self.args.output_dir) / LEDGER_FILE)
            self._ledger_saved_at = engine.steps_taken

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        """The ledger, then the privacy state, then the Trainer's checkpoint (model last)."""
        if self.engine is not None and self.args.should_save:
            run_dir = Path(self._get_output_dir(trial=trial))
            folder = run_dir / f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
            self.engine.ledger.save(run_dir / LEDGER_FILE)
            if run_dir == Path(self.args.output_dir):
                self._ledger_saved_at = self.engine.steps_taken
            state = {
                "format": CHECKPOINT_FORMAT,
                "version": CHECKPOINT_VERSION,
                "step": self.engine.steps_taken,
                "fingerprint": self.plan.recipe.fingerprint(),
                "dataset_size": self.plan.dataset_size,
                "calibrated_noise_multiplier": self.plan.calibrated_noise_multiplier,
                "key_id": self.key.key_id,
                "engine": self.engine.state_dict(),
                "sampler": self.sampler.state_dict(),
            }
            folder.mkdir(parents=True, exist_ok=True)
            atomic_write(folder / PRIVACY_STATE, lambda f: torch.save(state, f), binary=True)
        super()._save_checkpoint(model, trial)

    # -- the report ----------------------------------------------------------------------

    def write_privacy_report(self) -> dict[str, Any] | None:
        """``output_dir/ledger.json`` and ``output_dir/privacy.json`` (the plan and the
        guarantee); returns the latter's content."""
        if self.engine is None or not self.args.should_save:
            return None
        out = Path(self.args.output_dir)
        self.engine.ledger.save(out / LEDGER_FILE)
        self._ledger_saved_at = self.engine.steps_taken
        report = {
            "dataset_size": self.plan.dataset_size,
            **self.plan.meta(),
            "steps": self.engine.steps_taken,
            "stopped_by_budget": self.stopped_by_budget,
            "randomness": self.key.describe(),
            "key_id": self.key.key_id,
            "noise_generator": self.noise.description,
            **guarantee_numbers(self.plan, self.engine.epsilon(), self.noise.pairs),
        }
        # DPTrainer splits nothing off train_dataset (no validation or public split, no
        # max_records): a record added to it is a training record, so the file-level
        # guarantee is the record-level one (the recipe's default validation_fraction, which
        # the plan reads, would describe a split this trainer never makes)
        report["file_level"] = {
            "epsilon": report["epsilon"],
            "delta": report["delta_total"],
            "public_probability": 0.0,
            "validation_probability": 0.0,
            "why": "DPTrainer trains on the whole train_dataset (no validation or public "
            "split): a record added to it is a training record",
        }
        write_json(out / PRIVACY_FILE, report)
        return report

    def epsilon(self) -> float:
        """Epsilon spent so far at the plan's delta (0 before the first step)."""
        return self.engine.epsilon() if self.engine is not None else 0.0


_RENAMES = (  # the engine's words for the length bound -> a Trainer run's setting
    ("the recipe's data.max_length", "PrivacyArguments.max_length"),
    ("data.max_length", "PrivacyArguments.max_length"),
    ("pass max_length=None", "set PrivacyArguments(max_length=None)"),
    ("or max_length=None", "or PrivacyArguments(max_length=None)"),
)


def in_trainer_terms(err: Exception) -> Exception | None:
    """``err`` of the engine with its fix in DPTrainer's terms (the engine names the recipe's
    ``data.max_length`` and its own ``max_length`` argument; a Trainer run sets
    ``PrivacyArguments.max_length``), of the same type where it takes a message (else a
    :class:`DPTrainerError`); None where nothing is renamed."""
    text = str(err)
    new = text
    for old, word in _RENAMES:
        new = new.replace(old, word)
    if new == text:
        return None
    try:
        return type(err)(new)
    except TypeError:
        return DPTrainerError(new)


def _read_privacy_state(folder: Path) -> dict[str, Any]:
    path = folder / PRIVACY_STATE
    if not path.exists():
        raise DPTrainerError(
            f"resume_from_checkpoint: {folder} has no privacy state ({PRIVACY_STATE}): without "
            "its ledger and noise position the resumed run would restart the accounting. Fix: "
            "resume from a checkpoint written by DPTrainer"
        )
    return load_checkpoint_file(path)


def _check_fresh_key(key_dir: Path, output_dir: Path) -> None:
    """A new run needs a key no other run has used: an existing ``secret.key`` is reused only
    in the ``output_dir`` of a run that never started (no ``ledger.json``)."""
    if not (key_dir / "secret.key").exists():
        return
    if key_dir.resolve() != output_dir.resolve() or (output_dir / LEDGER_FILE).exists():
        raise DPTrainerError(
            f"output_dir: {key_dir / 'secret.key'} belongs to another run; a new run drawing "
            "the same coins and noise on other data would reveal the difference. Fix: use a "
            "new output_dir (or key_dir), or continue that run with resume_from_checkpoint"
        )


def _check_same_run(state: dict[str, Any], fingerprint: str, n: int) -> None:
    if state["fingerprint"] != fingerprint or state["dataset_size"] != n:
        raise DPTrainerError(
            "resume_from_checkpoint: the checkpoint's privacy settings or dataset size differ "
            f"from this run's (N = {state['dataset_size']} vs {n}). Fix: resume with the "
            "PrivacyArguments, batch size and dataset of the run that wrote it (only "
            "max_steps / num_train_epochs may change)"
        )
