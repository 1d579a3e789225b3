"""What a federated data holder decides for itself: the client's own privacy settings.

A client's state directory (its ledger and its run key), budget ``(epsilon, delta)``,
accountant and minimum noise multiplier come from its own node config or a local file, never
from the server: the server's recipe only *asks* (:class:`Request`), and a request weaker than
the client's settings is refused with the reason (:func:`refusal`).

Node config keys (``flower-supernode --node-config "..."``), all set by the data holder::

    state-dir             where the client keeps ledger.json and secret.key (required; it
                          outlives every server run, so no new server run resets a budget)
    epsilon               the client's budget for each of its records, over its lifetime (required)
    delta                 default 1/(10 N_k) for its N_k records
    accountant            rdp (default) | prv | pld; a request for another one is refused
    min-noise-multiplier  refuse requests with less noise (default 0: the budget decides)
    data-path             the client's own records instead of its share of the recipe's data
    privacy-unit          the field naming each record's person (JSONL field / CSV column):
                          the client then protects each PERSON with all of their records
                          (user-level DP-SGD, :mod:`dptrain.user_level`); default: the record
    max-records-per-person  with privacy-unit: records of a sampled person used per step
    insecure-seed         reproducible coins and noise for tests: NO privacy guarantee
    client-config         a local YAML file with the same keys (node config keys override it)

In a simulation (:func:`dptrain.federated.simulate`) one operator plays every data holder:
client ``k``'s settings are the recipe's ``privacy`` section, its state directory is
``federated.state_dir/client-k`` (:func:`simulated`); tests pass other settings per client.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ..errors import UserError
from ..recipe import default_delta

ACCOUNTANTS = ("rdp", "prv", "pld")
_KEYS = {
    "state-dir",
    "epsilon",
    "delta",
    "accountant",
    "min-noise-multiplier",
    "data-path",
    "insecure-seed",
    "privacy-unit",
    "max-records-per-person",
}
_FLOWER_KEYS = {"partition-id", "num-partitions", "client-config"}


class ClientConfigError(UserError, ValueError):
    """A client's own settings are missing or invalid; the message names the fix."""


@dataclass(frozen=True)
class ClientConfig:
    """A data holder's own settings (see the module docstring)."""

    state_dir: Path | str
    epsilon: float
    delta: float | None = None
    accountant: str = "rdp"
    min_noise_multiplier: float = 0.0
    data_path: str | None = None
    insecure_seed: int | None = None
    privacy_unit: str | None = None  # the person field; None: the record
    max_records_per_person: int | None = None

    @property
    def unit(self) -> str:
        """What the client's epsilon is for: ``record``, or ``person:<field>``."""
        return "record" if self.privacy_unit is None else f"person:{self.privacy_unit}"

    def __post_init__(self) -> None:
        object.__setattr__(self, "state_dir", Path(self.state_dir))
        if not (self.epsilon > 0):
            raise ClientConfigError(f"epsilon must be positive, got {self.epsilon}")
        if self.delta is not None and not 0 < self.delta < 1:
            raise ClientConfigError(f"delta must be in (0, 1), got {self.delta}")
        if self.accountant not in ACCOUNTANTS:
            raise ClientConfigError(
                f"accountant {self.accountant!r} is not one of {', '.join(ACCOUNTANTS)}"
            )
        if not self.min_noise_multiplier >= 0:
            raise ClientConfigError("min-noise-multiplier must be >= 0")
        if self.privacy_unit is not None and not self.privacy_unit.strip():
            raise ClientConfigError(
                "privacy-unit must name a field, e.g. privacy-unit='patient_id'"
            )
        if self.max_records_per_person is not None:
            if self.privacy_unit is None:
                raise ClientConfigError(
                    "max-records-per-person without privacy-unit: the cap is per person. Fix: "
                    "set privacy-unit to the field naming each record's person, or drop the cap"
                )
            if self.max_records_per_person < 1:
                raise ClientConfigError("max-records-per-person must be >= 1")

    def own_delta(self, n: int) -> float:
        """The client's delta for its ``n`` records, or people under ``privacy-unit``
        (default ``1/(10 n)``)."""
        return self.delta if self.delta is not None else default_delta(n)

    @classmethod
    def from_node_config(cls, cfg: Mapping[str, Any]) -> ClientConfig:
        """The settings in a SuperNode's node config (and its ``client-config`` file)."""
        values: dict[str, Any] = {}
        if cfg.get("client-config"):
            path = Path(str(cfg["client-config"]))
            try:
                loaded = yaml.safe_load(path.read_text()) or {}
            except OSError as err:
                raise ClientConfigError(f"client-config {path}: {err.strerror}") from None
            if not isinstance(loaded, dict):
                raise ClientConfigError(f"client-config {path}: expected a mapping of keys")
            values.update({str(k).replace("_", "-"): v for k, v in loaded.items()})
        values.update({k: v for k, v in cfg.items() if k not in _FLOWER_KEYS})
        unknown = sorted(set(values) - _KEYS)
        if unknown:
            raise ClientConfigError(
                f"unknown client setting(s) {', '.join(unknown)}; known: {', '.join(sorted(_KEYS))}"
            )
        missing = [k for k in ("state-dir", "epsilon") if values.get(k) in (None, "")]
        if missing:
            raise ClientConfigError(
                f"this client has no {' or '.join(missing)} of its own: the data holder sets "
                "them, not the server. Fix: start the SuperNode with --node-config "
                "\"... state-dir='DIR' epsilon=8.0\" (or client-config='FILE.yaml')"
            )
        try:
            return cls(
                state_dir=Path(str(values["state-dir"])),
                epsilon=float(values["epsilon"]),
                delta=float(values["delta"]) if values.get("delta") is not None else None,
                accountant=str(values.get("accountant", "rdp")),
                min_noise_multiplier=float(values.get("min-noise-multiplier", 0.0)),
                data_path=str(values["data-path"]) if values.get("data-path") else None,
                insecure_seed=(
                    int(values["insecure-seed"])
                    if values.get("insecure-seed") is not None
                    else None
                ),
                privacy_unit=(
                    str(values["privacy-unit"]) if values.get("privacy-unit") is not None else None
                ),
                max_records_per_person=(
                    int(values["max-records-per-person"])
                    if values.get("max-records-per-person") is not None
                    else None
                ),
            )
        except (TypeError, ValueError) as err:
            if isinstance(err, ClientConfigError):
                raise
            raise ClientConfigError(f"client settings: {err}") from None

    def node_config(self, partition_id: int, partitions: int) -> str:
        """The ``--node-config`` string that gives a SuperNode these settings."""
        parts = [
            f"partition-id={partition_id}",
            f"num-partitions={partitions}",
            f"state-dir='{self.state_dir}'",
            f"epsilon={self.epsilon!r}",
            f"accountant='{self.accountant}'",
            f"min-noise-multiplier={self.min_noise_multiplier!r}",
        ]
        if self.delta is not None:
            parts.append(f"delta={self.delta!r}")
        if self.data_path is not None:
            parts.append(f"data-path='{self.data_path}'")
        if self.insecure_seed is not None:
            parts.append(f"insecure-seed={self.insecure_seed}")
        if self.privacy_unit is not None:
            parts.append(f"privacy-unit='{self.privacy_unit}'")
        if self.max_records_per_person is not None:
            parts.append(f"max-records-per-person={self.max_records_per_person}")
        return " ".join(parts)


def client_insecure_seed(seed: int | None, client: int) -> int | None:
    """Client ``client``'s reproducible seed derived from a recipe's ``insecure_seed``."""
    if seed is None:
        return None
    digest = hashlib.sha256(f"dptrain client {client} of insecure seed {seed}".encode()).digest()
    return int.from_bytes(digest[:7], "big")


def simulated(recipe: Any, client: int, state_root: str | Path) -> ClientConfig:
    """Client ``client``'s settings in a simulation: the recipe's privacy section (one
    operator plays every data holder), state in ``state_root/client-<client>``."""
    p = recipe.privacy
    return ClientConfig(
        state_dir=Path(state_root) / f"client-{client}",
        epsilon=float(p.epsilon),
        delta=p.delta,
        accountant=p.accountant,
        insecure_seed=client_insecure_seed(p.insecure_seed, client),
    )


def one_node_per_partition(configs: Mapping[int, ClientConfig], clients: int) -> None:
    """Refuse a set-up that gives two nodes one partition (or one state directory): each
    partition-id ``0..clients-1`` at most once, each with its own state directory.  The
    server's ``client_guarantee`` counts one request per round per client; two nodes on one
    partition would train its records twice per round (and two partitions on one state
    directory would mix two clients' ledgers)."""
    outside = sorted(k for k in configs if not 0 <= k < clients)
    if outside:
        raise ClientConfigError(
            f"client settings for partition-id(s) {outside}: the recipe has {clients} clients "
            f"(0..{clients - 1}). Fix: one setting per partition-id in that range"
        )
    by_state: dict[Path, int] = {}
    for k, own in sorted(configs.items()):
        state = Path(own.state_dir).resolve()
        if state in by_state:
            raise ClientConfigError(
                f"clients {by_state[state]} and {k} share the state-dir {own.state_dir}: one "
                "state directory (ledger and key) is one client, trained at most once per "
                "round. Fix: give each partition-id its own state-dir"
            )
        by_state[state] = k


@dataclass(frozen=True)
class Request:
    """What the server's recipe asks of a client for its records: a budget, an accountant and
    the noise multiplier its policy will use (fixed, or calibrated to the asked budget)."""

    epsilon: float
    delta: float
    accountant: str
    noise_multiplier: float | None  # None: chosen during training (adaptive policies)


def refusal(request: Request, own: ClientConfig, n: int) -> str | None:
    """Why the client refuses ``request`` (the reason sent to the server), or None."""
    if request.accountant != own.accountant:
        return (
            f"refused: the server asks for the {request.accountant} accountant; this client "
            f"accounts with {own.accountant}"
        )
    if request.epsilon > own.epsilon:
        return (
            f"refused: the server asks for epsilon {request.epsilon:g}; this client's budget "
            f"is epsilon {own.epsilon:g}"
        )
    delta = own.own_delta(n)
    if request.delta > delta:
        return (
            f"refused: the server asks for delta {request.delta:.3g}; this client's is {delta:.3g}"
        )
    sigma = request.noise_multiplier
    if own.min_noise_multiplier > 0 and (sigma is None or not sigma >= own.min_noise_multiplier):
        shown = "a noise chosen during training" if sigma is None else f"{sigma:.4g}"
        return (
            f"refused: the server's noise multiplier {shown} is below this client's minimum "
            f"{own.min_noise_multiplier:g}"
        )
    if sigma is not None and math.isnan(sigma):
        return "refused: the server's policy has no noise multiplier"
    return None
