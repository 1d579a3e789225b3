"""The privacy engine: one private step = plan, budget check, clipped sums, noisy release.

Step flow (``PrivacyEngine.step``)::

    plan = policy.plan(public context)           # clip C_g and noise s_g per group
    event = policy.event(plan)                   # what the accountant will be charged
    budget filter: refuse before anything runs if ledger + event would exceed (eps, delta)
    for each physical chunk of the logical Poisson batch:
        forward, backward of sum_b loss_b         # hooks record layer inputs and output grads
        clip per sample and group, add to sums    # ghost norms or materialized per rule
    counts = policy.private_counts(plan, flags)  # e.g. the rl policy's within-clip counts
    (torch.distributed: sums and counts all-reduced over ranks; rank 0 alone releases)
    update = policy.release(sums, plan, noise)   # e.g. (sum + N(0, s_g^2)) / E[B]
    ledger.record(event)                          # charged before the update exists anywhere
    optimizer.step(update)

Normalization is by the expected batch size ``E[B] = q N`` (public), never the realized one.
An empty Poisson batch still takes a (pure-noise) step and is charged.

Devices and precision.  The batch is moved to the model's device; the forward and backward of
each chunk run under the ``precision``'s autocast, with fp16's loss scale removed from the
per-sample gradients before they are clipped (:mod:`dptrain.precision` states the contract).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from accountants import Budget, BudgetExceeded, BudgetFilter, Event, Ledger, get_accountant
from accountants.budget import ledger_epsilon

from . import distributed, rng
from .batching import batch_len, batch_slice
from .clipping import Float32Decisions, clip_and_sum, ghost_mode
from .grad_sample import GradCapture, Recorded
from .groups import group_parameters
from .hardware import module_device, to_device
from .losses import LossFn, causal_lm_loss
from .noise import GaussianNoise
from .policies import Policy, StepContext, StepPlan, StepSums, check_accountant
from .precision import Precision, unscale
from .segments import Segments, person_chunks


@dataclass
class StepReport:
    """What a step did.  ``loss`` and ``batch_size`` are statistics of private data: show them to
    the data owner, do not publish them (the DP guarantee covers the model and the ledger)."""

    step: int
    batch_size: int
    loss: float
    noise_multiplier: float
    clip: dict[str, float]
    update_norm: float
    nonfinite: int
    seconds: float
    event: Event
    applied: bool = True  # False: the released update was not finite and was skipped (charged)
    extra: dict[str, Any] = field(default_factory=dict)


def _mean_loss(total: float, count: int) -> float:
    """The mean of a step's finite losses; NaN where there is none (an empty batch, or every
    loss non-finite), never a 0 that reads as a perfect fit."""
    return total / count if count > 0 else math.nan


class PrivacyEngine:
    """Private training of ``model`` with ``optimizer`` under a clipping and noise ``policy``.

    ``sample_rate`` and ``dataset_size`` must describe the Poisson sampling that produces the
    batches passed to :meth:`step` (see :class:`dptrain.PoissonSampler`).  ``max_length``, a
    public bound on the tokens of every sample (``dptrain train`` passes ``data.max_length``),
    lets wide layers' ghost norms use float32 Grams with a certified error
    (:mod:`dptrain.clipping`); a ghosted layer applied at more positions than that is refused.

    ``pad`` (with ``max_length``): the collator's padding, ``pad(batch, n)`` the batch's
    samples padded to ``n`` positions as every batch is padded (``n=None``: to their longest;
    ``dptrain train`` passes its examples' :meth:`~dptrain.data.lm.LMExamples.pad`).  The
    probe then checks that no sample's loss or gradient changes when its batch is padded
    further, up to ``max_length`` (:meth:`~dptrain.grad_sample.GradCapture._check_padding`):
    a batch is padded to its longest record, so a model whose outputs follow the padded
    length (dynamic rope scaling beyond ``max_position_embeddings``) lets one record change
    every other sample's gradient in its batch, and is refused.  Without ``pad`` (or without
    ``max_length``) that is not checked: the batch's padding is the caller's to keep public
    (pad every batch to one length) or harmless.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        policy: Policy,
        sample_rate: float,
        dataset_size: int,
        loss_fn: LossFn = causal_lm_loss,
        grouping: str = "flat",
        accountant: str = "rdp",
        budget: Budget | None = None,
        ledger: Ledger | None = None,
        max_physical_batch_size: int | None = None,
        noise: GaussianNoise | None = None,
        ghost: bool | str = "auto",
        precision: Precision | None = None,
        max_length: int | None = None,
        pad: Callable[[Any, int | None], Any] | None = None,
    ) -> None:
        if dataset_size <= 0:
            raise ValueError(
                "dataset_size must be positive: the sample rate is undefined for an empty dataset"
            )
        if not 0 < sample_rate <= 1:
            raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
        if max_physical_batch_size is not None and max_physical_batch_size < 1:
            raise ValueError("max_physical_batch_size must be >= 1")
        check_accountant(policy, accountant)  # validated with the recipe; Python callers too
        self.model = model
        self.optimizer = optimizer
        self.policy = policy
        self.sample_rate = sample_rate
        self.dataset_size = dataset_size
        self.expected_batch_size = sample_rate * dataset_size
        self.loss_fn = loss_fn
        self.max_physical_batch_size = max_physical_batch_size
        self.noise = noise if noise is not None else GaussianNoise()  # a fresh secret key
        self.ghost = ghost_mode(ghost)  # per-sample norms: "auto" (by cost), "always", "never"
        if max_length is not None and max_length < 1:
            raise ValueError(f"max_length must be a positive number of tokens, got {max_length}")
        self.max_length = max_length  # public bound on tokens per sample: float32 Gram norms
        # per parameter, the use structure its float32 decision was made on (clip_and_sum's
        # decided): a later batch with another is refused where float32 Grams are involved
        self._float32_decisions: Float32Decisions = {}
        self.precision = precision if precision is not None else Precision()

        names = group_parameters(model, grouping)
        by_name = dict(model.named_parameters())
        self.grouping = grouping
        self.groups = {g: [by_name[n] for n in ns] for g, ns in names.items()}
        self.names = {by_name[n]: n for ns in names.values() for n in ns}
        self.group_of = {p: g for g, ps in self.groups.items() for p in ps}
        self.params = [p for ps in self.groups.values() for p in ps]
        prepare = getattr(self.noise, "prepare", None)  # (a test or audit noise may lack it)
        if self.params and prepare is not None:  # the CUDA noise kernels: now, not in step 1
            prepare(self.params[0].device)
        _check_optimizer(optimizer, self.params)

        self.capture = GradCapture(model)
        self.capture.attach()
        if pad is not None:
            if max_length is None:
                raise ValueError(
                    "pad needs max_length: the padding probe pads the probe batch up to the "
                    "public bound on a sample's tokens"
                )
            self.capture.padding = (pad, max_length)
        policy.bind(
            list(self.groups), sample_rate=sample_rate, expected_batch_size=self.expected_batch_size
        )

        self.accountant = get_accountant(accountant)
        self.budget = budget
        self.filter = (
            BudgetFilter(budget, self.accountant, adaptive=policy.adaptive)
            if budget is not None
            else None
        )
        self.ledger = ledger if ledger is not None else Ledger()
        self.steps_taken = self.ledger.total_steps
        self.last_update_norms: dict[str, float] | None = None
        self._release_hooks: list[Callable[[int, dict[nn.Parameter, Tensor]], None]] = []
        self._eps_cache: tuple[int, float] | None = None

    # -- planning and budget -------------------------------------------------------------

    def context(self) -> StepContext:
        return StepContext(
            step=self.steps_taken,
            budget_epsilon=self.budget.epsilon if self.budget else None,
            delta=self.budget.delta if self.budget else None,
            ledger=self.ledger,
            spent=self.epsilon if self.budget else None,
        )

    def next_plan(self) -> tuple[StepPlan, Event]:
        plan = self.policy.plan(self.context())
        if set(plan.clip) != set(self.groups):
            # a group without a plan would be clipped and noised by no one's contract; a
            # plan for a group the engine lacks would be charged for a release that never runs
            raise ValueError(
                f"policy '{self.policy.name}' planned for the groups {sorted(plan.clip)[:5]}, "
                f"but the engine's groups are {sorted(self.groups)[:5]} (grouping "
                f"'{self.grouping}'): the policy must plan every group of the engine, no other"
            )
        return plan, self.policy.event(plan)

    def add_release_hook(self, fn: Callable[[int, dict[nn.Parameter, Tensor]], None]) -> None:
        """Call ``fn(step, update)`` on the main rank with every released update (noised and
        normalized: what the optimizer receives), after the ledger has recorded the step and
        before the update is applied.  For audits that see every release."""
        self._release_hooks.append(fn)

    def epsilon(self, delta: float | None = None) -> float:
        """Epsilon spent so far at ``delta`` (default: the budget's), by this engine's accountant;
        for adaptive policies, the conversion valid under fully adaptive composition."""
        if delta is None:
            if self.budget is None:
                raise ValueError("no budget set: pass delta explicitly")
            delta = self.budget.delta
        key = (self.ledger.total_steps, delta)
        if self._eps_cache is None or self._eps_cache[0] != key:
            eps = ledger_epsilon(self.accountant, self.ledger, delta, self.policy.adaptive)
            self._eps_cache = (key, eps)
        return self._eps_cache[1]

    def remaining_steps(self) -> int | None:
        """How many steps of the next plan still fit the budget (None without a budget)."""
        if self.filter is None:
            return None
        _, event = self.next_plan()
        return self.filter.max_steps(self.ledger, event)

    def next_step_fits(self) -> bool | None:
        """Does the next plan's step fit the budget (None without a budget)?  The filter's
        ``allows``: a counter or a dominance certificate per step, where :meth:`remaining_steps`
        searches the exact count (a full search per step for PRV/PLD when the noise changes)."""
        if self.filter is None:
            return None
        _, event = self.next_plan()
        return self.filter.allows(self.ledger, event)

    # -- the step ------------------------------------------------------------------------

    def _chunks(self, batch: Any, n: int) -> Iterator[Any]:
        size = self.max_physical_batch_size or max(n, 1)
        for start in range(0, n, size):
            yield batch_slice(batch, start, min(start + size, n))

    def _person_chunks(self, batch: Any, segments: Tensor) -> list[tuple[Any, Segments]]:
        """Physical chunks of whole persons, each with its segments renumbered from 0."""
        n = batch_len(batch) if batch is not None else 0
        seg = torch.as_tensor(segments, dtype=torch.long).reshape(-1)
        if seg.numel() != n:
            raise ValueError(f"segments has {seg.numel()} ids for a batch of {n} rows")
        size = self.max_physical_batch_size or max(n, 1)
        out = []
        for start, stop in person_chunks(seg, size):
            local = torch.unique(seg[start:stop], return_inverse=True)[1]
            out.append((batch_slice(batch, start, stop), Segments.from_ids(local)))
        return out

    def step(
        self,
        batch: Any,
        *,
        injected: dict[nn.Parameter, Tensor] | None = None,
        segments: Tensor | None = None,
    ) -> StepReport:
        """One private step on a logical (Poisson) batch; raises BudgetExceeded before touching
        data if the step would exceed the budget.  Under ``torch.distributed``, ``batch`` is
        this rank's shard of the global batch (see :mod:`dptrain.distributed`).

        ``injected[p]`` (shape ``(m, *p.shape)``) gives the per-sample gradients of ``m`` more
        samples of this batch (white-box audit canaries): they are clipped, summed and noised by
        the same code as the batch's samples; parameters absent from it get zero for them.

        ``segments`` (user-level DP, :mod:`dptrain.user_level`): one id per row, rows sorted by
        it; the rows of one id (a person's records) are summed before the clip, so a person is
        one sample (physical chunks hold whole persons), ``sample_rate`` and ``dataset_size``
        are then over persons and ``batch_size`` in the report counts persons."""
        t0 = time.perf_counter()
        main = distributed.is_main()
        plan, event = self.next_plan() if main else (None, None)
        allowed = self.filter is None or self.filter.allows(self.ledger, event) if main else None
        plan, event, allowed = distributed.broadcast_object((plan, event, allowed))
        if not allowed:
            raise BudgetExceeded(
                f"the next step (q={event.sample_rate:.4g}, sigma={event.noise_multiplier:.4g}) would "
                f"exceed the budget epsilon={self.budget.epsilon} at delta={self.budget.delta} "
                f"(spent {self.epsilon():.4f} after {self.ledger.total_steps} steps). Fix: raise the "
                "budget in a new run, or stop here: the model so far is covered by the ledger."
            )
        n = batch_len(batch) if batch is not None else 0
        device = module_device(self.model)
        if n > 0:
            batch = to_device(batch, device)
        loss_fn, scale = self.precision.scaled(self.loss_fn), self.precision.scale
        if segments is not None:
            n = len(torch.unique(segments)) if n else 0
        clipped: dict[nn.Parameter, Tensor] = {}
        within: dict[str, list[Tensor]] = {}
        raw_sums: dict[nn.Parameter, Tensor] = {}
        loss_sum, nonfinite = 0.0, 0

        def add(recorded: Recorded, seg: Segments | None = None) -> None:
            nonlocal nonfinite
            result = clip_and_sum(
                recorded,
                self.group_of,
                plan.clip,
                ghost=self.ghost,
                raw=self.policy.needs_raw_sums,
                segments=seg,
                max_length=self.max_length,
                decided=self._float32_decisions,
                names=self.names,
            )
            for p, s in result.sums.items():
                clipped[p] = clipped[p] + s if p in clipped else s
            for g, norm in result.norms.items():
                within.setdefault(g, []).append(norm <= plan.clip[g])
            for p, s in (result.raw or {}).items():
                raw_sums[p] = raw_sums[p] + s if p in raw_sums else s
            nonfinite += result.nonfinite

        self.optimizer.zero_grad(set_to_none=True)
        if segments is None:
            chunks = [(chunk, None) for chunk in (self._chunks(batch, n) if n > 0 else ())]
        else:
            chunks = self._person_chunks(batch, segments)
        rows = 0
        with keyed_rng(getattr(self.noise, "key", None), self.steps_taken, device):
            for chunk, seg in chunks:
                with self.precision.autocast(device):
                    recorded, losses = self.capture.run(loss_fn, chunk)
                add(unscale(recorded, scale), seg)  # unscaled before clipping: sensitivity C
                losses = losses.detach() / scale
                finite = torch.isfinite(losses)
                loss_sum += float(losses[finite].sum())
                rows += int(finite.sum())
                self.optimizer.zero_grad(set_to_none=True)
        if injected:  # extra samples with given per-sample gradients, through the same clipping
            m = _check_injected(injected, self.group_of)
            add(Recorded([], {p: g.to(p.device, p.dtype) for p, g in injected.items()}, m))
            n += m
        # in the engine's parameter order, whatever order the clipping produced them in (ghost
        # norms first): the release draws its noise in this order, so it must not depend on the
        # batch or on how the ranks split it (all-reduced sums come back in this order)
        clipped = {p: clipped[p] if p in clipped else torch.zeros_like(p) for p in self.params}
        raw = None
        if self.policy.needs_raw_sums:  # unclipped sums over the samples with finite gradients
            raw = {p: raw_sums.get(p, torch.zeros_like(p)) for p in self.params}
        within_clip = {g: torch.cat(ts) for g, ts in within.items()}
        counts = self.policy.private_counts(plan, within_clip)  # this rank's samples
        if distributed.world_size() > 1:
            n, loss_sum, nonfinite, clipped, raw, counts = self._all_reduce(
                n, loss_sum, nonfinite, clipped, raw, counts
            )
        sums = StepSums(
            clipped=clipped,
            raw=raw,
            group_of=self.group_of,
            expected_batch_size=self.expected_batch_size,
            names=self.names,
            nonfinite=nonfinite,
            within_clip=within_clip,
            counts=counts,
        )
        if main:
            begin = getattr(self.noise, "begin_step", None)
            if begin is not None:  # step t's noise is a function of (key, t) only
                begin(self.steps_taken)
            update = self.policy.release(sums, plan, self.noise)  # noise added once, on rank 0
        else:
            update = {p: torch.zeros_like(p) for p in self.params}
        if distributed.world_size() > 1:
            update = dict(
                zip(
                    self.params,
                    distributed.broadcast_tensors([update[p] for p in self.params]),
                    strict=True,
                )
            )
        self.ledger.record(event)  # charged before the noisy update reaches the model
        if main:
            for hook in self._release_hooks:
                hook(self.steps_taken + 1, update)
        # A released update that is not finite (diverged parameters, overflow) is not applied;
        # the decision reads only the released update, so it is post-processing.
        # A finite sum of squares means every entry is finite, so the entries are inspected only
        # when a group's norm is not finite (NaN, or squares of finite entries overflowing).
        # (one host-device read of all the groups' norms)
        groups = list(self.groups.items())
        squares = [sum(update[p].pow(2).sum() for p in ps) for _, ps in groups]
        dev = self.params[0].device if self.params else torch.device("cpu")
        read = torch.stack([torch.as_tensor(x, device=dev).double() for x in squares])
        read = read.sqrt().tolist()
        norms = {g: float(v) for (g, _), v in zip(groups, read, strict=True)}
        applied = all(math.isfinite(v) for v in norms.values()) or bool(
            torch.stack([torch.isfinite(update[p]).all() for p in self.params]).all()
        )
        if applied:
            for p in self.params:
                p.grad = update[p].to(p.dtype)
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.last_update_norms = norms
        self.steps_taken += 1
        report = StepReport(
            step=self.steps_taken,
            batch_size=n,
            loss=_mean_loss(loss_sum, n - nonfinite if segments is None else rows),
            noise_multiplier=plan.noise_multiplier,
            clip=dict(plan.clip),
            update_norm=math.sqrt(sum(v**2 for v in norms.values())),
            nonfinite=nonfinite,
            applied=applied,
            seconds=time.perf_counter() - t0,
            event=event,
        )
        if main:
            extra = self.policy.observe({"step": report.step})
            report.extra.update(extra or {})
        return report

    def _all_reduce(self, n, loss_sum, nonfinite, clipped, raw, counts):
        """Sum the clipped (and raw) sums, the policy's private counts and the batch statistics
        over ranks (:func:`distributed.all_reduce_sum`: the counts and statistics in float64,
        where integer counts sum exactly, the sums in their own dtype)."""
        device = self.params[0].device if self.params else None  # NCCL reduces GPU tensors
        stats = torch.tensor(
            [float(n), loss_sum, float(nonfinite)], dtype=torch.float64, device=device
        )
        extra = [] if counts is None else [counts.to(device=device, dtype=torch.float64)]
        tensors = (
            [stats]
            + extra
            + [clipped[p] for p in self.params]
            + ([raw[p] for p in self.params] if raw else [])
        )
        reduced = distributed.all_reduce_sum(tensors)
        k, j = len(self.params), 1 + len(extra)
        stats = reduced[0]
        if counts is not None:
            counts = reduced[1].cpu()
        clipped = dict(zip(self.params, reduced[j : j + k], strict=True))
        if raw is not None:
            raw = dict(zip(self.params, reduced[j + k :], strict=True))
        return int(stats[0]), float(stats[1]), int(stats[2]), clipped, raw, counts

    # -- state ---------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Privacy state for checkpoints (model and optimizer are saved by the caller)."""
        return {
            "ledger": self.ledger.to_dict(),
            "policy": self.policy.state_dict(),
            "noise": self.noise.state_dict(),
            "steps_taken": self.steps_taken,
            "last_update_norms": self.last_update_norms,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.ledger = Ledger.from_dict(state["ledger"])
        self.policy.load_state_dict(state["policy"])
        self.noise.load_state_dict(state["noise"])
        self.steps_taken = state["steps_taken"]
        self.last_update_norms = state.get("last_update_norms")
        self._eps_cache = None

    def detach(self) -> None:
        """Remove the hooks; the model is an ordinary module again."""
        self.capture.detach()


@contextlib.contextmanager
def keyed_rng(key: Any, step: int, device: torch.device) -> Iterator[None]:
    """Torch's generators (the CPU's and ``device``'s), NumPy's and Python's, seeded from the
    run key for step ``step``'s forward and backward passes, and restored afterwards.

    Why.  Dropout (and any other random draw of the model's forward pass: torch's, NumPy's or
    Python's global generators) reads a process-wide generator that ``recipe.seed`` (public)
    or the user's own script seeds.  Its masks are laid out by the
    batch's shape, so adding a record (one more row, or a longer padded length) moves the
    masks every *other* record of the batch gets, and later steps' masks follow the earlier
    batch sizes: with the seed known, the released sum then moves by far more than the one
    record's clipped gradient.  Masks drawn from a secret, per-step seed are independent of
    the data and unknown to the adversary; every record's masks are then identically
    distributed whatever the batch, so the release is a mixture of Gaussian mechanisms of
    sensitivity C (joint convexity) and the ledger's event holds.  Seeded per (step, rank),
    so a resumed run draws the same masks, and restored afterwards, so the public stream
    never depends on the private batch sizes.  The lock of :func:`dptrain.rng.seeded` is
    held throughout, so threads of one process (in-process federated clients) cannot move
    each other's streams.  Without a key (a caller's own noise
    function) the generators are left as they are."""
    if key is None or not hasattr(key, "prf"):
        yield
        return
    word = key.prf("model-rng").at(int(step), np.array([distributed.rank()], dtype=np.uint64))
    with rng.seeded(int(word[0, 0]) >> 1, device, host=True):  # 63 bits: every generator takes it
        yield


def _check_injected(injected: dict[nn.Parameter, Tensor], group_of: dict) -> int:
    """The number of injected samples, after checking their shapes name this engine's params."""
    sizes = {t.shape[0] for t in injected.values()}
    if len(sizes) != 1 or any(p not in group_of for p in injected):
        raise ValueError(
            "injected gradients must be given for trainable parameters of this engine, all "
            f"with the same number of samples; got sample counts {sorted(sizes)}"
        )
    for p, t in injected.items():
        if tuple(t.shape[1:]) != tuple(p.shape):
            raise ValueError(f"injected[p] must have shape (m, *p.shape), got {tuple(t.shape)}")
    return sizes.pop()


def _check_optimizer(optimizer: torch.optim.Optimizer, params: list[nn.Parameter]) -> None:
    in_opt = {id(p) for g in optimizer.param_groups for p in g["params"]}
    missing = [p for p in params if id(p) not in in_opt]
    if missing:
        raise ValueError(
            f"{len(missing)} trainable parameters are not in the optimizer: pass "
            "[p for p in model.parameters() if p.requires_grad] to it, or freeze them"
        )
