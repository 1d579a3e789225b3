"""User-level DP: the person, with all of their records, as the privacy unit.

Neighbouring datasets differ by adding or removing one person and every record of theirs
(``data.privacy_unit: {field: patient_id}``); the number of people ``N`` is public (it sets
``q`` and the default delta ``1 / (10 N)``).  Two strategies, as compared by Chua et al. 2024
("Mind the privacy unit", arXiv 2406.14322) and Charles et al. 2024 (arXiv 2407.07737):

``user`` (default): user-level sampling, per-person clipping.
    Step ``t`` includes person ``u`` iff ``PRF_k(t, id(u)) < q`` (keyed Poisson coins over
    people, :class:`~dptrain.sampling.PoissonSampler` with the run key's ``people`` child key).
    Of a sampled person's records, at most ``m = max_records_per_person`` are used: those with
    the ``m`` lowest ``PRF_k'(t, id(r))`` (a fresh keyed choice per step that reads only that
    person's record ids).  The person's contribution is the SUM of those records' gradients,
    ``G_u = sum_r g_r`` (the gradient of their summed loss), clipped as one sample to
    ``min(1, C / ||G_u||) G_u``; noise ``N(0, sigma^2 C^2)`` and the normalization by
    ``E[B] = q N`` are as for records.  Sensitivity: adding or removing one person changes the
    clipped sum by one clipped vector, norm ``<= C``, whatever their number of records; other
    people's coins and selections do not change.  So each step is the Poisson-subsampled
    Gaussian mechanism over people with rate ``q`` and multiplier ``sigma``: the ledger event
    is the same as for records, with ``q`` over people.  Sum, not mean: a mean divides each
    person's sum by their record count, which keeps the same sensitivity but down-weights the
    records of people with many notes; the sum keeps every record's loss on one scale, and the
    cap ``m`` bounds the work per person.  Default because it is the tight analysis: epsilon
    does not grow with the records per person.
``example``: example-level sampling with user-level accounting.
    Each person keeps at most ``m`` records (the ``m`` with the lowest keyed hashes, fixed for
    the run); ordinary record-level DP-SGD runs on them, and a person is a group of at most
    ``k = m`` records (the cap is required: ``k`` is published, so it must be the recipe's
    value, not the data's largest count, a statistic of one person).  Group privacy for
    ``(eps', delta')``-DP over ``k`` add/remove steps gives ``(k eps', delta' sum_{i<k}
    e^{i eps'})``-DP; so the run's record-level budget is ``eps' = eps / k`` at
    ``delta' = delta (e^{eps'} - 1) / (e^{eps} - 1)``, and the noise is calibrated to it.
    Reported honestly: this bound is loose (it is the baseline of the papers above).

Physical chunks hold whole persons; exact per-person norms (ghost norms over the Gram of a
person's tokens) are in :mod:`dptrain.segments`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from . import distributed
from .data.loading import TextDataset
from .data.people import People, is_canary_person, read_people, recipe_person_ids, unit_name
from .errors import RecipeError
from .recipe import default_delta
from .sampling import PoissonSampler
from .secret import RunKey, record_keys

if TYPE_CHECKING:
    from accountants import Ledger

    from .data.lm import LMExamples
    from .plan import RunPlan
    from .recipe import Recipe


def group_delta_factor(eps: float, k: int) -> float:
    """``sum_{i<k} e^{i eps} = (e^{k eps} - 1) / (e^{eps} - 1)``: the delta factor of group
    privacy over ``k`` add/remove steps (``k`` for ``eps = 0``)."""
    if eps == 0:
        return float(k)
    if k * eps > 700:
        return math.inf
    return math.expm1(k * eps) / math.expm1(eps)


def group_privacy(eps: float, delta: float, k: int) -> tuple[float, float]:
    """``(eps, delta)``-DP for one record -> the guarantee for a group of ``k`` records."""
    if not math.isfinite(eps):
        return math.inf, 1.0
    return k * eps, min(1.0, delta * group_delta_factor(eps, k))


def record_budget(eps: float, delta: float, k: int) -> tuple[float, float]:
    """The record-level ``(eps', delta')`` whose group privacy over ``k`` is ``(eps, delta)``:
    ``eps' = eps / k``, ``delta' = delta / sum_{i<k} e^{i eps'}``."""
    if not math.isfinite(eps):
        return eps, delta
    e = eps / k
    return e, delta / group_delta_factor(e, k)


def person_epsilon(events: list, accountant: Any, delta: float, k: int) -> float:
    """The smallest ``k eps'`` such that the record-level ledger is ``(eps', delta')``-DP with
    ``delta' sum_{i<k} e^{i eps'} <= delta``: the person-level epsilon of a record-level run by
    group privacy (``inf`` when no ``eps'`` up to 64 times the record-level one fits)."""
    if not events:
        return 0.0
    if k == 1:
        return float(accountant.epsilon(events, delta))

    def fits(e: float) -> bool:
        return accountant.delta(events, e) * group_delta_factor(e, k) <= delta

    lo = float(accountant.epsilon(events, delta))
    hi = max(lo, 1e-3) * 2
    while not fits(hi):
        hi *= 2
        if hi > 64 * max(lo, 1e-3) or k * hi > 700:
            return math.inf
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if fits(mid) else (mid, hi)
    return k * hi


class PersonSampler:
    """Step ``t``'s people (keyed Poisson coins over person ids) and, for each, at most ``cap``
    of their records (keyed per step); rows come out grouped by person."""

    def __init__(
        self,
        people: People,
        record_ids: list[str],
        sample_rate: float,
        key: RunKey,
        cap: int | None = None,
    ) -> None:
        self.people = people
        self.cap = cap
        self.persons = PoissonSampler(people.ids, sample_rate, key.child("people"))
        self._records = key.prf("people/records")
        self._keys = record_keys(record_ids)

    @property
    def sample_rate(self) -> float:
        return self.persons.sample_rate

    def sample(self, step: int) -> tuple[Tensor, Tensor]:
        """``(record indices, segment of each row)`` of step ``step``, grouped by person (this
        rank's share of the people under ``torch.distributed``)."""
        chosen = distributed.shard(self.persons.sample(step))
        rows: list[np.ndarray] = []
        for person in chosen.tolist():
            members = self.people.members[person]
            if self.cap is not None and len(members) > self.cap:
                words = self._records.at(step, self._keys[members])[:, 0]
                members = np.sort(members[np.argsort(words, kind="stable")[: self.cap]])
            rows.append(members)
        if not rows:
            return torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long)
        # people with equal record counts side by side: a physical chunk pads each person to
        # its largest count, so this bounds the padding (the order does not change the sum)
        rows = [rows[i] for i in np.argsort([len(r) for r in rows], kind="stable")]
        seg = np.repeat(np.arange(len(rows)), [len(r) for r in rows])
        return torch.from_numpy(np.concatenate(rows)), torch.from_numpy(seg)

    def batch(self, step: int, examples: LMExamples) -> tuple[dict[str, Tensor], Tensor]:
        idx, seg = self.sample(step)
        return examples.batch(idx), seg

    def state_dict(self) -> dict[str, Any]:
        return {**self.persons.state_dict(), "cap": self.cap}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.persons.load_state_dict({k: v for k, v in state.items() if k != "cap"})


def cap_records(ds: TextDataset, people: People, cap: int, key: RunKey) -> TextDataset:
    """At most ``cap`` records per person (the lowest keyed hashes of their ids, fixed for the
    run), in the original order: each person's choice reads only that person's records."""
    words = key.prf("people/cap").at(0, record_keys(ds.ids))[:, 0]
    keep: list[int] = []
    for members in people.members:
        if len(members) > cap:
            members = members[np.argsort(words[members], kind="stable")[:cap]]
        keep.extend(members.tolist())
    return ds.subset(sorted(keep))


@dataclass
class UnitPlan:
    """A person-level run: its people, strategy and the group size of its accounting."""

    field: str
    strategy: str  # "user" | "example"
    people: People
    cap: int | None
    group_size: int  # k: records per person the accounting allows for ("example": the cap)
    person_delta: float  # the person-level delta target
    person_epsilon_budget: float
    records_before_cap: int
    canary_people: int = 0  # data.canaries: canary persons, each included by a keyed coin
    withheld_people: int = 0  # canary people their coin left out: counted in the public size

    @property
    def size(self) -> int:
        """N in people, public: the people trained on plus the canary people left out (so N
        reveals no canary's coin)."""
        return len(self.people) + self.withheld_people

    @property
    def name(self) -> str:
        return unit_name(self.field)

    @property
    def user_level(self) -> bool:
        return self.strategy == "user"

    def sampler(self, record_ids: list[str], sample_rate: float, key: RunKey) -> PersonSampler:
        return PersonSampler(self.people, record_ids, sample_rate, key, self.cap)

    def stats(self, records: int) -> dict[str, Any]:
        """The private statistics of the run's people (``private/stats.json``): the training
        records (``records``, public only when they set ``q``: strategy ``example``) and the
        records per person of the data's people (the canaries' counts follow their coins).
        Neither is covered by the guarantee: beside the public ``N``, adding a person moves
        them by that person's number of records."""
        counts = self.people.counts
        if self.canary_people:
            real = [not is_canary_person(p) for p in self.people.ids]
            counts = counts[np.asarray(real)] if any(real) else counts
        return {
            "records": records,
            "records_per_person": {
                "max": int(counts.max()),
                "mean": float(counts.mean()),
                "median": float(np.median(counts)),
            },
        }

    def meta(self) -> dict[str, Any]:
        """The unit's public description (``run.json``): the recipe's settings, the public
        ``N`` people and the group size ``k`` of the accounting (strategy ``example``: the
        recipe's cap, which its noise is calibrated to; 1 for ``user``)."""
        return {
            "unit": self.name,
            "field": self.field,
            "strategy": self.strategy,
            "people": self.size,
            "max_records_per_person": self.cap,
            "group_size": self.group_size,
            "epsilon_budget": self.person_epsilon_budget,
            "delta": self.person_delta,
            **(
                {
                    "canaries": {
                        "unit": self.name,
                        "people": self.canary_people,
                        "inclusion": "each canary person (all of its repetitions) with "
                        "probability 1/2 by a coin of the run key: the one-run audit bound "
                        f"is per {self.name}",
                    }
                }
                if self.canary_people
                else {}
            ),
        }

    def guarantee(self, record_eps: float, record_delta_total: float) -> dict[str, Any]:
        """The person-level guarantee of the run from its record- or person-level spend."""
        if self.user_level:
            eps, delta = record_eps, record_delta_total
            how = (
                "user-level DP-SGD: Poisson sampling over people, each person's records summed "
                "and clipped together (sensitivity C per person)"
            )
        else:
            eps, delta = group_privacy(record_eps, record_delta_total, self.group_size)
            how = (
                f"record-level DP-SGD over at most {self.group_size} records per person; "
                f"group privacy over {self.group_size} records: (k eps', delta' sum_(i<k) e^(i eps'))"
            )
        return {
            "epsilon": eps,
            "delta": delta,
            "statement": f"({eps:.4f}, {delta:.3g})-DP for each {self.name}, over all of their records",
            "how": how,
        }


def resolve_unit(
    recipe: Recipe, train: TextDataset, key: RunKey, *, withheld_people: int = 0
) -> tuple[UnitPlan | None, TextDataset]:
    """The person-level plan of a recipe with ``data.privacy_unit`` (None otherwise) and the
    training records to use (capped per person for the ``example`` strategy);
    ``withheld_people``: canary people left out by their coins (counted in the public N,
    :func:`dptrain.data.canaries.left_out`)."""
    unit = recipe.data.privacy_unit
    if unit is None:
        return None, train
    persons = recipe_person_ids(recipe)
    people = read_people(train, persons)
    n = len(people) + withheld_people
    delta = recipe.privacy.delta if recipe.privacy.delta is not None else default_delta(n)
    before = len(train)
    canaries = recipe.data.canaries
    reps = canaries.repetitions if canaries is not None else {}
    k = 1
    if unit.strategy == "example":
        # k: the recipe's cap, public (the recipe refuses strategy example without one: the
        # data's largest count would be a private statistic).  Every person keeps at most
        # k records, chosen by the run key; a canary person (data.canaries: its repetitions
        # are its records, inserted before this) is capped like any other, so a canary
        # repeated more than k times trains on k of its copies and k covers it; whether its
        # coin included it does not move k
        k = unit.max_records_per_person
        if k is None:  # PrivacyUnitSection refuses it; a constructed recipe may not have
            raise RecipeError(
                "data.privacy_unit: strategy example needs max_records_per_person (a public "
                "cap on records per person), or use strategy user"
            )
        train = cap_records(train, people, k, key)
        people = read_people(train, persons)
    return (
        UnitPlan(
            unit.field,
            unit.strategy,
            people,
            unit.max_records_per_person,
            k,
            delta,
            recipe.privacy.epsilon,
            before,
            sum(reps.values()),
            withheld_people,
        ),
        train,
    )


def plan_unit(
    recipe: Recipe, unit: UnitPlan, n_records: int, *, restored_noise: float | None = None
) -> RunPlan:
    """The run plan of a person-level run: over people (``user``), or over records with the
    record-level budget whose group privacy is the person-level one (``example``)."""
    from .plan import plan_privacy

    n = unit.size
    if unit.person_delta >= 1.0 / n:
        raise RecipeError(
            f"privacy.delta: {unit.person_delta:g} is not below 1/N = {1.0 / n:g} (N = {n} "
            f"people); such a delta allows publishing a whole {unit.name}. Fix: set "
            f"privacy.delta below {1.0 / n:.2g}, e.g. {default_delta(n):.2g}."
        )
    if unit.user_level:
        return plan_privacy(recipe, n, unit="people", restored_noise=restored_noise)
    eps, delta = record_budget(recipe.privacy.epsilon, unit.person_delta, unit.group_size)
    privacy = recipe.privacy.model_copy(update={"epsilon": eps, "delta": delta})
    return plan_privacy(
        recipe.model_copy(update={"privacy": privacy}), n_records, restored_noise=restored_noise
    )


def record_run_person_level(
    recipe: Recipe, train: TextDataset, ledger: Ledger, accountant: Any, delta: float
) -> dict[str, Any] | None:
    """For a record-level run with ``data.person_field``: the person-level epsilon at the run's
    delta by group privacy at the largest number of records per person (a comparison; the
    run's guarantee is per record)."""
    field = recipe.data.person_field
    if field is None:
        return None
    persons = recipe_person_ids(recipe, field)
    people = read_people(train, persons)
    k = people.max_records
    eps = person_epsilon(list(ledger.events), accountant, delta, k)
    return {
        "unit": unit_name(field),
        "field": field,
        "people": len(people),
        "group_size": k,
        "epsilon": eps,
        "delta": delta,
        "why": f"group privacy over the largest number of records of one {unit_name(field)} "
        f"({k}); the run's guarantee is per record",
    }
