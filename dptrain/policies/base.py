"""The policy interface: how a step is clipped, noised and accounted.

A policy is consulted twice per step:

1. ``plan(context)`` before any private data is touched, returning a :class:`StepPlan`
   (clip threshold ``C_g`` and Gaussian noise std ``s_g`` per parameter group).  Its
   ``event`` is what the accountant is charged; the budget filter sees it before the step.
2. ``release(sums, plan, noise)`` turns the clipped sums into the gradient handed to the
   optimizer.  This is the only place private data meets the policy.

Privacy contract of a plan: adding or removing one sample changes group ``g``'s clipped sum
by at most ``C_g`` in L2; adding ``N(0, s_g^2 I)`` to each group is one Gaussian mechanism
with noise multiplier ``sigma_eff = 1 / sqrt(sum_g (C_g / s_g)^2)``, Poisson-subsampled at
the engine's sample rate.  Policies whose analysis differs (hidden state, adaptivity)
override :meth:`Policy.event`.

Frozen settings.  :meth:`Policy.bind` derives the plans from the policy's privacy settings
(its :attr:`Policy.frozen_settings`: sigma, clip norms, ...), and the pre-run checks, the budget
filter's forecasts and the federated planned-round charge read :meth:`Policy.planned_event` from
the same settings; so once bound, assigning one raises :class:`FrozenPolicyError` (the bind's
own assignments excepted), and a second bind is allowed only with the same groups and sampling
constants (a no-op).  Every view of a run then reads one value.  The containers bind stores
(the groups, per-group clips, the plans' maps) are immutable too (tuples, :class:`FrozenMap`),
so that mutating one in place raises as well: assignment and mutation are both refused.
"""

from __future__ import annotations

import functools
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, NoReturn, TypeVar

from torch import Tensor, nn

from accountants import Event, Ledger

NoiseFn = Callable[[Tensor, float], Tensor]  # (like, std) -> N(0, std^2) shaped like `like`

_Bind = TypeVar("_Bind", bound=Callable[..., None])


class FrozenPolicyError(RuntimeError):
    """A bound policy's privacy setting was assigned, or the policy was bound again with other
    constants: its plans and its planned event would disagree (see the module docstring)."""


class FrozenMap(dict):  # type: ignore[type-arg]
    """A dict that refuses in-place mutation (a bound policy's per-group settings and plans).

    A dict subclass rather than ``types.MappingProxyType``: it stays JSON-able (``describe()``,
    run.json), picklable and deep-copyable (a copy is a new FrozenMap of the same items), and
    equal to a dict of the same items."""

    def _refuse(self, *args: Any, **kwargs: Any) -> NoReturn:
        raise FrozenPolicyError(
            "a bound policy's per-group settings and plans are read-only: the steps are "
            "planned and charged from them. Fix: give the values before the engine is built "
            "(before bind()), or copy them (dict(...)) to change a copy"
        )

    __setitem__ = __delitem__ = __ior__ = _refuse
    clear = pop = popitem = setdefault = update = _refuse

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (dict(self),))


def _freezing(bind: _Bind) -> _Bind:
    """Wrap a ``bind`` so that, once the outermost bind returns, the policy's
    :attr:`~Policy.frozen_settings` are frozen; its own assignments (at any depth of
    ``super().bind``) pass, a bind that raises freezes nothing, and a second bind with the same
    constants returns at once."""

    @functools.wraps(bind)
    def wrapper(
        self: Policy, groups: Sequence[str], *, sample_rate: float, expected_batch_size: float
    ) -> None:
        groups = list(groups)
        depth = self.__dict__.get("_binding", 0)
        if depth == 0:
            bound_to = self.__dict__.get("_bound_to")
            asked = (tuple(groups), sample_rate, expected_batch_size)
            if bound_to == asked:
                return  # bound already to these constants: its plans stay as they are
            if bound_to is not None:
                raise FrozenPolicyError(
                    f"policy '{self.name}' is bound to groups {list(bound_to[0])[:5]}, sample "
                    f"rate {bound_to[1]!r}, E[B] {bound_to[2]!r}; binding it to groups "
                    f"{list(groups)[:5]}, sample rate {sample_rate!r}, E[B] "
                    f"{expected_batch_size!r} would charge the first engine's steps at the "
                    "second's constants. Fix: build a new policy for each engine"
                )
        object.__setattr__(self, "_binding", depth + 1)
        try:
            bind(self, groups, sample_rate=sample_rate, expected_batch_size=expected_batch_size)
        finally:
            object.__setattr__(self, "_binding", depth)
        if depth == 0:
            object.__setattr__(self, "_bound_to", asked)

    return wrapper  # type: ignore[return-value]


_Calibrate = TypeVar("_Calibrate", bound=Callable[..., float])


def _unbound_only(calibrate: _Calibrate) -> _Calibrate:
    """Wrap a ``calibrate`` so that a bound policy refuses it before any work (a calibration
    can take seconds, and its sigma could only be refused: noise_multiplier is frozen)."""

    @functools.wraps(calibrate)
    def wrapper(self: Policy, *args: Any, **kwargs: Any) -> float:
        if self.bound:
            raise self._frozen("noise_multiplier", "a sigma calibrated now")
        return calibrate(self, *args, **kwargs)

    return wrapper  # type: ignore[return-value]


@dataclass(frozen=True)
class StepPlan:
    """Per-group clip thresholds ``C_g`` and noise standard deviations ``s_g`` (sum units)."""

    clip: dict[str, float]
    noise_std: dict[str, float]

    def __post_init__(self) -> None:
        if set(self.clip) != set(self.noise_std):
            raise ValueError(
                f"a step plan needs a clip and a noise std for the same groups; clip has "
                f"{sorted(self.clip)}, noise_std {sorted(self.noise_std)}"
            )
        bad = {
            g: (c, self.noise_std[g])
            for g, c in self.clip.items()
            if not (c >= 0 and self.noise_std[g] >= 0)  # also refuses NaN
        }
        if bad:
            raise ValueError(
                f"a step plan needs clip C_g >= 0 and noise std s_g >= 0 (no NaN); got "
                f"(C_g, s_g) = {bad}: fix the policy's clip / noise settings"
            )

    @property
    def noise_multiplier(self) -> float:
        """``sigma_eff = 1 / sqrt(sum_g (C_g / s_g)^2)`` over the groups with ``C_g > 0`` (a
        group clipped at 0 releases nothing); 0 if such a group is noiseless or unclipped,
        inf if no group releases anything."""
        total = 0.0
        for g, c in self.clip.items():
            s = self.noise_std[g]
            if c == 0:
                continue
            if s == 0 or math.isinf(c):
                return 0.0
            total += (c / s) ** 2
        return math.inf if total == 0 else 1.0 / math.sqrt(total)


@dataclass
class StepContext:
    """What a policy may look at when planning: public or already released quantities only.
    (The sampling constants come once, through :meth:`Policy.bind`.)"""

    step: int
    budget_epsilon: float | None
    delta: float | None
    ledger: Ledger | None = None  # the events charged so far (public: a function of past plans)
    spent: Callable[[], float] | None = field(default=None, repr=False)

    def epsilon_spent(self) -> float:
        """Epsilon spent so far by the engine's accountant, computed only when asked (and
        cached by the engine per ledger length); nan without a budget."""
        return self.spent() if self.spent is not None else math.nan


@dataclass
class StepSums:
    """The private inputs of a release: clipped sums, and raw sums when a policy asks."""

    clipped: dict[nn.Parameter, Tensor]
    raw: dict[nn.Parameter, Tensor] | None
    group_of: dict[nn.Parameter, str]
    expected_batch_size: float
    names: dict[nn.Parameter, str] | None = None  # parameter names (keys of stateful policies)
    nonfinite: int = 0  # samples dropped for a non-finite gradient (their raw sums are lost)
    # per group, per sample of this process's part of the batch (under torch.distributed, its
    # shard): was ||grad_b|_g|| <= C_g (private; release only noised)
    within_clip: dict[str, Tensor] = field(default_factory=dict)
    # the policy's private_counts summed over the ranks: counts over the whole global batch
    counts: Tensor | None = None


@dataclass
class RunContext:
    """What a run hands a policy once the model exists (see :meth:`Policy.attach`)."""

    model: nn.Module
    planned_steps: int
    seed: int = 0
    public_batches: list[Any] | None = None  # batches of a split the recipe declares public


class Policy(ABC):
    """Base class of clipping and noise policies (see the module docstring)."""

    name: str = "policy"
    needs_raw_sums: bool = False  # whether release() reads unclipped gradient sums
    adaptive: bool = False  # whether plans depend on data (then only adaptive-valid accountants may guard the budget)
    accountants: tuple[str, ...] | None = None  # accountants able to account its events (None: all)
    needs_public_data: bool = False  # whether attach() needs a public split (data.public_*)
    # sigma of the schedule (for adaptive policies its reference); None until the run plan
    # calibrates it (calibrate) or restores it from run.json on resume
    noise_multiplier: float | None = None
    # a run this policy's state starts from: {run, epsilon, delta} of its certified guarantee
    warm_start: dict[str, Any] | None = None
    # the attributes bind() derives plans and events from: read-only once bound (subclasses
    # add their own: ``frozen_settings = Policy.frozen_settings | {...}``)
    frozen_settings: ClassVar[frozenset[str]] = frozenset(
        {"noise_multiplier", "sample_rate", "expected_batch_size", "groups", "adaptive",
         "accountants"}
    )  # fmt: skip

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "bind" in cls.__dict__:  # every override freezes the settings when it returns
            cls.bind = _freezing(cls.__dict__["bind"])  # type: ignore[method-assign]
        if "calibrate" in cls.__dict__:  # and every calibrate refuses a bound policy at once
            cls.calibrate = _unbound_only(cls.__dict__["calibrate"])  # type: ignore[method-assign]

    def _frozen(self, name: str, value: str) -> FrozenPolicyError:
        """The refusal of setting ``name`` (to ``value``, a repr) on a bound policy."""
        return FrozenPolicyError(
            f"policy '{self.name}': {name} is frozen once the policy is bound (bind(), "
            f"which the PrivacyEngine calls): the steps' plans were derived from "
            f"{name}={getattr(self, name, None)!r}, and the pre-run budget checks, the "
            f"budget filter's forecasts and reports would read {value}. Fix: set {name} "
            "before the engine is built (before bind()), or build a new policy (and engine)"
        )

    def __setattr__(self, name: str, value: Any) -> None:
        # ``_bound_to`` is set only when the outermost bind returns, so bind's own assignments
        # (at any depth of ``super().bind``) pass without a check of their own
        if name in self.frozen_settings and "_bound_to" in self.__dict__:
            raise self._frozen(name, repr(value))
        super().__setattr__(name, value)

    @property
    def bound(self) -> bool:
        """Whether :meth:`bind` has run (the frozen settings are then read-only)."""
        return "_bound_to" in self.__dict__

    @_freezing
    def bind(
        self, groups: Sequence[str], *, sample_rate: float, expected_batch_size: float
    ) -> None:
        """Called once by the engine with the group names and the public sampling constants;
        freezes :attr:`frozen_settings` when it returns."""
        self.groups = tuple(groups)  # immutable, like every container a bound policy keeps
        self.sample_rate = sample_rate
        self.expected_batch_size = expected_batch_size

    @abstractmethod
    def plan(self, context: StepContext) -> StepPlan: ...

    @_unbound_only
    def calibrate(
        self,
        target_epsilon: float,
        delta: float,
        *,
        sample_rate: float,
        steps: int,
        accountant: str,
    ) -> float:
        """Set and return the smallest noise multiplier meeting (target_epsilon, delta) over
        ``steps`` steps at ``sample_rate`` (the argument order of
        :func:`accountants.calibrate_noise`); the default assumes one Poisson-subsampled Gaussian
        event per step.  A bound policy refuses it (:class:`FrozenPolicyError`) before any work;
        so do the overrides (wrapped by ``__init_subclass__``)."""
        from accountants import calibrate_noise

        self.noise_multiplier = calibrate_noise(
            target_epsilon, delta, sample_rate, steps, accountant
        )
        return self.noise_multiplier

    def planned_event(self, sample_rate: float) -> Event | None:
        """The per-step event when it is fixed in advance (lets a run check its budget before
        loading the model); None for policies that plan adaptively."""
        return None

    def event(self, plan: StepPlan) -> Event:
        """The accountant event charged for a step taken under ``plan``."""
        return Event(sample_rate=self.sample_rate, noise_multiplier=plan.noise_multiplier)

    def private_counts(self, plan: StepPlan, within_clip: dict[str, Tensor]) -> Tensor | None:
        """Statistics of this rank's samples, additive over disjoint parts of the batch, that
        :meth:`release` needs over the whole batch (a CPU float64 vector, or None: none, the
        default).  The engine calls it on every rank with the rank's ``within_clip`` flags and
        sums the results over ranks with the clipped sums, before any noise; ``release`` (rank 0
        only) reads the sum as ``StepSums.counts``.  Private: release it only noised."""
        return None

    @property
    def max_noised_counts(self) -> int:
        """The most values :meth:`release` noises in a step besides the parameters' noise
        (the length of its noised :meth:`private_counts`; 0: none).  Bounds the noise pairs a
        step draws, hence the sampler's truncation term, without running the step."""
        return 0

    def release(self, sums: StepSums, plan: StepPlan, noise: NoiseFn) -> dict[nn.Parameter, Tensor]:
        """DP-SGD: ``(sum_b clip(g_b) + N(0, s_g^2 I)) / E[B]`` per parameter."""
        params = list(sums.clipped)
        stds = [plan.noise_std[sums.group_of[p]] for p in params]
        many = getattr(noise, "many", None)
        if many is None:  # any NoiseFn: one call per parameter
            return {
                p: (sums.clipped[p] + noise(sums.clipped[p], std)) / sums.expected_batch_size
                for p, std in zip(params, stds, strict=True)
            }
        # the keyed sampler: one parallel draw of the same values, fresh tensors of the sums'
        # dtypes, so (s + z) / E[B] is computed in place (bitwise the same)
        draws = many([sums.clipped[p] for p in params], stds)
        return {
            p: z.add_(sums.clipped[p]).div_(sums.expected_batch_size)
            for p, z in zip(params, draws, strict=True)
        }

    def attach(self, run: RunContext) -> None:
        """Called by ``dptrain train`` after the engine is built and before a checkpoint is
        restored, for policies that evaluate the model on public data or learn across steps."""
        return None

    def observe(self, report: dict[str, Any]) -> dict[str, float] | None:
        """Called after each step with ``{"step": t}`` (the steps taken so far); may return
        metrics to log with the step (released or public quantities only)."""
        return None

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        return None

    def describe(self) -> dict[str, Any]:
        """A JSON-able summary for run metadata."""
        return {"name": self.name}
