"""What a private ``Trainer`` run takes beside ``TrainingArguments``, and which of those it refuses.

:class:`PrivacyArguments` is the privacy half of a run (the budget, the policy, the clip, the
noise, the key).  The rest comes from ``TrainingArguments``, mapped like the recipe's
``training:`` section (:func:`training_values`):

    per_device_train_batch_size x gradient_accumulation_steps  ->  the expected Poisson batch
        B = q N (or ``PrivacyArguments.sample_rate``); one optimizer step = one Poisson batch,
        processed in physical chunks of ``per_device_train_batch_size`` (a virtual batch: the
        noise is added once, the result is that of one unchunked step)
    max_steps > 0 | num_train_epochs E  ->  T planned steps (T = max_steps | ceil(E / q))
    max_grad_norm  ->  the per-sample clip C when ``PrivacyArguments.clip`` is unset

:func:`refusals` lists every setting that would break the guarantee (or that the engine cannot
prove correct), each with its fix; :class:`DPTrainer` raises them all at once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

from ...errors import InputError


class DPTrainerError(InputError):
    """A ``Trainer`` setting that would break the privacy guarantee; the message names the fix."""


@dataclass
class PrivacyArguments:
    """The privacy settings of a :class:`DPTrainer` run.

    ``epsilon`` is the budget (and the calibration target when ``noise_multiplier`` is None);
    ``delta`` defaults to ``1 / (10 N)``.  ``clip`` is the per-sample L2 bound C (default:
    ``TrainingArguments.max_grad_norm``).  ``sample_rate`` defaults to ``B / N`` with B the
    Trainer's total batch size.  Coins and noise come from the run key in ``key_dir`` (default
    ``output_dir``; ``secret.key``, mode 0600, created on the first run and read on resume),
    or from ``insecure_seed`` (reproducible, NO guarantee against anyone who knows it).
    ``id_column``: a column of unique record ids; without one, ids derive from each record's
    content (see :func:`dptrain.integrations.hf.data.record_ids`).

    ``report_private_metrics``: also send the un-noised statistics of each log line -- the
    training ``loss`` and ``train_loss`` (means over private Poisson batches), token counts
    and timings -- to the ``report_to`` integrations (wandb, mlflow, tensorboard, ...).  They
    are statistics of private records that the guarantee does not cover: set it only for a
    tracker that the data owner alone can read.  By default those integrations get the
    released values only (``epsilon``, the noised ``grad_norm``, ``learning_rate``,
    ``epoch``); the console, your own callbacks and the log history get everything.
    ``public_eval``: ``eval_dataset`` is public data, so its ``eval_*`` metrics go to the
    integrations too (by default they are withheld: an evaluation set drawn from the private
    data is used without noise).  See :mod:`dptrain.integrations.hf.logs`.

    ``max_length``: a public bound on every record's tokens (what ``dptrain train`` takes from
    ``data.max_length``).  It lets the engine take float32 Gram matrices, with a certified
    error, for the ghost norms of wide layers (much faster than float64; see
    :mod:`dptrain.clipping`), and turns on the padding probe: on the first step, before
    anything is released, two samples padded further, up to ``max_length``, must keep their
    losses and gradient (a model whose outputs follow the batch's padded length -- dynamic
    rope beyond ``max_position_embeddings``, left padding with absolute positions, a mean
    over padded positions -- lets one record move the others' gradients, and is refused).
    DPTrainer does not truncate: truncate in your own tokenization
    (``tokenizer(..., truncation=True, max_length=L)``); a batch with a longer record, or
    padded beyond ``L``, is refused with an error before its step is released or charged.
    The probe pads as the Hugging Face collators do (:class:`~.data.BatchPadder`: the
    ``processing_class`` tokenizer's pad id and ``padding_side``); pass ``DPTrainer(pad=f)``
    for another collator.  Default None: float64 Grams and no padding probe, except for a
    :class:`dptrain.data.LMExamples` train_dataset, whose own ``max_length`` (every record
    was cut to it by :func:`dptrain.data.lm.tokenize`, a public setting) is used.  No other
    default is derived: a tokenizer's ``model_max_length`` bounds records only where your
    tokenization truncates to it, which DPTrainer cannot see, and the records' longest length
    is private."""

    epsilon: float = 8.0
    delta: float | None = None
    accountant: Literal["rdp", "prv", "pld"] = "rdp"
    policy: str = "static"
    policy_options: dict[str, Any] = field(default_factory=dict)
    grouping: str = "flat"
    clip: float | None = None
    noise_multiplier: float | None = None
    sample_rate: float | None = None
    physical_batch_size: int | None = None
    key_dir: str | None = None
    insecure_seed: int | None = None
    id_column: str = "id"
    ghost: bool | str = "auto"
    report_private_metrics: bool = False
    public_eval: bool = False
    max_length: int | None = None


# name -> (is it set in a way that breaks the guarantee?, why, fix)
_REFUSED: list[tuple[str, Any, str]] = [
    (
        "deepspeed",
        lambda a: bool(a.deepspeed),
        "DeepSpeed shards and reduces gradients itself, around the per-sample clipping. Fix: "
        "unset deepspeed (for several GPUs use `dptrain train --nproc N`)",
    ),
    (
        "fsdp",
        lambda a: bool(a.fsdp),
        "FSDP shards parameters and reduces gradients itself, around the per-sample clipping. "
        "Fix: unset fsdp (for several GPUs use `dptrain train --nproc N`)",
    ),
    (
        "fp16",
        lambda a: bool(a.fp16),
        "fp16 training scales the loss with the HF grad scaler, which skips steps whose "
        "gradients overflow: a data-dependent decision outside the privacy analysis. Fix: "
        "set fp16=False (bf16=True autocasts without a scaler, and is accepted)",
    ),
    (
        "train_sampling_strategy",
        lambda a: str(getattr(a, "train_sampling_strategy", "random")) != "random",
        "batches are Poisson samples drawn by keyed per-record coins (the sampling the "
        "accountant assumes); a sequential, length-grouped or rebalanced order is not. Fix: "
        "leave train_sampling_strategy='random' (it is replaced by the Poisson sampler)",
    ),
    (
        "group_by_length",
        lambda a: bool(getattr(a, "group_by_length", False)),
        "length-grouped batches are not Poisson samples. Fix: set group_by_length=False",
    ),
    (
        "dataloader_drop_last",
        lambda a: bool(a.dataloader_drop_last),
        "Poisson batches vary in size and are never cut; dropping a remainder would make a "
        "record's inclusion depend on the others. Fix: set dataloader_drop_last=False",
    ),
    (
        "auto_find_batch_size",
        lambda a: bool(a.auto_find_batch_size),
        "the batch size sets the sample rate q the accountant charges; retrying with a "
        "smaller one would change q mid-run. Fix: set auto_find_batch_size=False and bound "
        "memory with per_device_train_batch_size (the physical chunk)",
    ),
    (
        "neftune_noise_alpha",
        lambda a: a.neftune_noise_alpha is not None,
        "NEFTune scales its embedding noise by the padded batch length, so one record's "
        "gradient would depend on the others in its batch (no sensitivity bound). Fix: set "
        "neftune_noise_alpha=None",
    ),
    (
        "torch_compile",
        lambda a: bool(a.torch_compile),
        "the per-sample gradient hooks see every torch call of the model; a compiled graph "
        "hides them. Fix: set torch_compile=False",
    ),
    (
        "use_liger_kernel",
        lambda a: bool(getattr(a, "use_liger_kernel", False)),
        "Liger kernels replace layers by fused kernels no per-sample rule covers. Fix: set "
        "use_liger_kernel=False",
    ),
    (
        "optim",
        lambda a: str(a.optim).lower().endswith(("lomo", "adalomo")),
        "LOMO/AdaLomo update the parameters inside the backward pass, before the clipped "
        "sum and the noise exist. Fix: use another optim (e.g. adamw_torch or sgd)",
    ),
    (
        "load_best_model_at_end",
        lambda a: bool(a.load_best_model_at_end),
        "choosing the released checkpoint by a metric on evaluation data uses that data "
        "without noise. Fix: set load_best_model_at_end=False (or select on public data "
        "yourself)",
    ),
    (
        "push_to_hub",
        lambda a: bool(a.push_to_hub),
        "the Trainer uploads output_dir, which holds the run key (secret.key) and checkpoints "
        "computed from private data. Fix: set push_to_hub=False and upload the saved final "
        "model folder yourself",
    ),
    (
        "ignore_data_skip",
        lambda a: bool(a.ignore_data_skip),
        "on resume, step t must draw step t's Poisson batch; restarting the epoch's batches "
        "would replay earlier steps' coins. Fix: set ignore_data_skip=False",
    ),
]


def refusals(args: Any, privacy: PrivacyArguments, *, custom_loss: bool) -> list[str]:
    """Every ``TrainingArguments`` setting that breaks the guarantee, as ``name: why. Fix``."""
    out = [f"{name}: {why}" for name, bad, why in _REFUSED if bad(args)]
    mgn = args.max_grad_norm
    if privacy.clip is not None and mgn and not math.isclose(mgn, privacy.clip):
        out.append(
            f"max_grad_norm: {mgn:g} would clip the noisy mean after the private per-sample clip "
            f"{privacy.clip:g} (and is not applied: the DP clip is the norm bound). Fix: set "
            "max_grad_norm=0 (or equal to PrivacyArguments.clip)"
        )
    if privacy.clip is None and not mgn:
        out.append(
            "max_grad_norm: 0 and PrivacyArguments.clip unset: the per-sample clip C bounds each "
            "record's influence and must be given. Fix: set PrivacyArguments(clip=1.0) (or "
            "max_grad_norm=1.0, which is then used as the per-sample clip)"
        )
    if args.label_smoothing_factor and custom_loss:
        out.append(
            "label_smoothing_factor: the Trainer applies it to a batch-mean loss, which a "
            "custom per-sample loss_fn bypasses. Fix: smooth inside your loss_fn and set "
            "label_smoothing_factor=0 (the built-in per-sample losses apply it themselves)"
        )
    if getattr(args, "world_size", 1) > 1 or getattr(args, "n_gpu", 0) > 1:
        out.append(
            "world_size: several processes or GPUs would each clip and reduce their own "
            "gradients through DDP/DataParallel, outside the engine. Fix: train on one device "
            "(CUDA_VISIBLE_DEVICES=0), or use `dptrain train --nproc N`, which all-reduces "
            "the clipped sums and adds the noise once"
        )
    if privacy.max_length is not None and (
        isinstance(privacy.max_length, bool)
        or not isinstance(privacy.max_length, int)
        or privacy.max_length < 1
    ):
        out.append(
            f"PrivacyArguments.max_length: {privacy.max_length!r} is not a positive number of "
            "tokens. Fix: the public bound your tokenization truncates every record to, or None"
        )
    if privacy.policy not in ("static", "error_feedback"):
        out.append(
            f"PrivacyArguments.policy: '{privacy.policy}' is not available in the Trainer "
            "integration (the rl policy needs the public split of a recipe run). Fix: "
            "use 'static' or 'error_feedback', or `dptrain train` with a recipe"
        )
    return out


@dataclass
class TrainingValues:
    """The recipe ``training:`` values a Trainer run maps to (see the module docstring)."""

    clip: float
    batch_size: float | None  # expected Poisson batch B (None: sample_rate given)
    sample_rate: float | None
    steps: int | None
    epochs: float | None
    physical_batch_size: int
    pieces: int  # gradient_accumulation_steps: Trainer micro-steps per private step


def training_values(args: Any, privacy: PrivacyArguments) -> TrainingValues:
    """Map ``TrainingArguments`` onto the recipe's training values (no refusals here)."""
    per_device = int(args.per_device_train_batch_size)
    ga = int(args.gradient_accumulation_steps)
    if privacy.sample_rate is not None:
        batch, rate = None, float(privacy.sample_rate)
    else:
        batch, rate = float(per_device * ga), None
    if args.max_steps is not None and args.max_steps > 0:
        steps, epochs = int(args.max_steps), None
    else:
        steps, epochs = None, float(args.num_train_epochs)
    clip = privacy.clip if privacy.clip is not None else float(args.max_grad_norm)
    return TrainingValues(
        clip=clip,
        batch_size=batch,
        sample_rate=rate,
        steps=steps,
        epochs=epochs,
        physical_batch_size=int(privacy.physical_batch_size or per_device),
        pieces=ga,
    )
