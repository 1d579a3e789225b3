"""The one registry of policies: name -> factory, recipe options, and what its analysis needs.

A :class:`PolicySpec` says, before any policy is built, which accountants can account the
policy's events (``accountants``; None: every accountant) and whether its plans depend on data
(``adaptive``: then only an accountant valid under fully adaptive composition may guard its
budget).  Recipe validation asks :func:`accountant_refusal` once, before the data or the model
is loaded; the engine asks the same function again, as a defensive assertion for Python callers.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from pydantic import BaseModel

from ..errors import RecipeError
from .base import Policy


class PolicyTraits(Protocol):
    """What the accountant and set-up rules read: a :class:`PolicySpec` or a built :class:`Policy`."""

    name: str
    adaptive: bool
    accountants: tuple[str, ...] | None
    needs_public_data: bool


@dataclass(frozen=True)
class PolicySpec:
    """A registered policy.  ``options``: the schema of its recipe keys beyond ``name``,
    ``grouping``, ``clip`` and ``noise_multiplier`` (None: it takes none)."""

    name: str
    factory: Callable[..., Policy]
    options: type[BaseModel] | None = None
    accountants: tuple[str, ...] | None = None
    adaptive: bool = False
    needs_public_data: bool = False


POLICIES: dict[str, PolicySpec] = {}


def register_policy(
    name: str,
    factory: Callable[..., Policy],
    *,
    options: type[BaseModel] | None = None,
    accountants: tuple[str, ...] | None = None,
    adaptive: bool | None = None,
    needs_public_data: bool | None = None,
) -> PolicySpec:
    """Make ``factory(clip=..., noise_multiplier=..., **options)`` available as
    ``policy: <name>``.  A :class:`Policy` subclass as factory gives its own class attributes
    as the defaults of ``accountants``, ``adaptive`` and ``needs_public_data``; a function must
    state them (a lazily importing factory cannot be inspected)."""
    cls = factory if isinstance(factory, type) and issubclass(factory, Policy) else None
    spec = PolicySpec(
        name,
        factory,
        options,
        accountants if accountants is not None or cls is None else cls.accountants,
        bool(adaptive if adaptive is not None else cls is not None and cls.adaptive),
        bool(
            needs_public_data
            if needs_public_data is not None
            else cls is not None and cls.needs_public_data
        ),
    )
    POLICIES[name] = spec
    return spec


def policy_spec(name: str) -> PolicySpec:
    """The registered policy ``name``, or a :class:`RecipeError` naming the close ones."""
    if name not in POLICIES:
        close = difflib.get_close_matches(name, list(POLICIES), n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise RecipeError(
            f"policy.name: unknown policy '{name}'.{hint} Known: {', '.join(sorted(POLICIES))}"
        )
    return POLICIES[name]


def make_policy(name: str, **options: Any) -> Policy:
    return policy_spec(name).factory(**options)


def policy_from_recipe(section: Any) -> Policy:
    """The policy a recipe's ``policy:`` section describes (a validated ``PolicySection``);
    its ``noise_multiplier`` is the recipe's (None: to be calibrated by the run plan)."""
    return make_policy(
        section.name,
        clip=section.clip,
        noise_multiplier=section.noise_multiplier,
        **section.options,
    )


def accountant_refusal(policy: PolicyTraits, accountant: str) -> str | None:
    """Why ``accountant`` cannot guard the budget of ``policy``, or None if it can."""
    from accountants import get_accountant

    fix = "Fix: set privacy.accountant: {0} (accountant='{0}' in Python)"
    allowed = policy.accountants
    if allowed is not None and accountant not in allowed:
        return (
            f"privacy.accountant: policy '{policy.name}' is accounted by its own analysis, which "
            f"only the accountant {' / '.join(repr(a) for a in allowed)} implements; got "
            f"'{accountant}'. " + fix.format(allowed[0])
        )
    if policy.adaptive and not get_accountant(accountant).adaptive_valid:
        valid = [a for a in ("rdp", "prv", "pld") if get_accountant(a).adaptive_valid]
        return (
            f"privacy.accountant: policy '{policy.name}' chooses its noise from released data, "
            "so only an accountant valid under fully adaptive composition may guard its budget; "
            f"'{accountant}' is not. " + fix.format(valid[0])
        )
    return None


def check_accountant(policy: PolicyTraits, accountant: str) -> None:
    """Raise :class:`RecipeError` with :func:`accountant_refusal`'s reason, if any."""
    reason = accountant_refusal(policy, accountant)
    if reason is not None:
        raise RecipeError(reason)
