"""The privacy ledger: an ordered, append-only record of the mechanisms a run has executed.

An :class:`Event` is one *kind* of step repeated ``steps`` times.  The basic kind is
``"poisson_gaussian"``: the Gaussian mechanism with L2 sensitivity 1 and noise
``N(0, sigma^2)`` applied to a Poisson subsample in which each record is included
independently with probability ``q`` (add/remove-one neighbouring datasets).  Other kinds
(e.g. ``"error_feedback"``, :mod:`accountants.error_feedback`) may carry extra named
``params``; each accountant states which kinds it supports and rejects the rest by name.

The ledger merges consecutive events with equal ``(kind, q, sigma[, params])`` by adding their steps, so
a run of a thousand identical steps is one entry.  It only ever grows: ``record`` appends an
entry or adds steps to the last one, which lets budget filters cache work per ledger prefix.
"""

from __future__ import annotations

import json
import math
import numbers
import operator
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

POISSON_GAUSSIAN = "poisson_gaussian"
LEDGER_FORMAT = "dptrain.ledger"
LEDGER_VERSION = 1
_EVENT_KEYS = frozenset({"kind", "sample_rate", "noise_multiplier", "steps"})
_OPTIONAL_KEYS = frozenset({"params"})

Params = tuple[tuple[str, float], ...]


class LedgerError(ValueError):
    """A ledger (dict or file) that cannot be read; the message names the problem and the fix."""


class LedgerNotFoundError(LedgerError, FileNotFoundError):
    """The ledger file does not exist."""


def _as_float(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    return float(value)


@dataclass(frozen=True)
class Event:
    """One kind of step: a Poisson-subsampled Gaussian mechanism with L2 sensitivity 1 after
    normalization: sampling rate q, noise multiplier sigma (noise std / sensitivity), repeated
    ``steps`` times.

    ``sigma = inf`` is a step without privacy cost; ``sigma = 0`` a step with infinite cost.
    ``kind`` names the mechanism; accountants raise for kinds they do not support.  ``params``
    are the extra real parameters of kinds that need them (a mapping, stored sorted by name).
    """

    sample_rate: float  # q in (0, 1]; q == 1 means no subsampling (full batch)
    noise_multiplier: float  # sigma >= 0 (inf = no privacy cost; 0 = infinite cost)
    steps: int = 1
    kind: str = POISSON_GAUSSIAN
    params: Params = ()

    def __post_init__(self) -> None:
        q = _as_float(self.sample_rate, "sample_rate")
        sigma = _as_float(self.noise_multiplier, "noise_multiplier")
        if isinstance(self.steps, bool):
            raise TypeError("steps must be an integer, got bool")
        try:
            steps = operator.index(self.steps)
        except TypeError:
            raise TypeError(
                f"steps must be an integer, got {type(self.steps).__name__} {self.steps!r}"
            ) from None
        if not isinstance(self.kind, str) or not self.kind:
            raise ValueError(f"kind must be a non-empty string, got {self.kind!r}")
        if not (0.0 < q <= 1.0):
            raise ValueError(f"sample_rate must be in (0, 1], got {q!r}")
        if math.isnan(sigma) or sigma < 0:
            raise ValueError(f"noise_multiplier must be >= 0 (inf allowed), got {sigma!r}")
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        object.__setattr__(self, "sample_rate", q)
        object.__setattr__(self, "noise_multiplier", sigma)
        object.__setattr__(self, "steps", steps)
        object.__setattr__(self, "params", _as_params(self.params))

    @property
    def key(self) -> tuple:
        """What identifies the mechanism, without the repetition count: (kind, q, sigma), and
        the params for kinds that have them."""
        base = (self.kind, self.sample_rate, self.noise_multiplier)
        return (*base, self.params) if self.params else base

    def param(self, name: str) -> float:
        """The value of one of ``params``; ValueError naming the kind if it is missing."""
        for key, value in self.params:
            if key == name:
                return value
        raise ValueError(f"an event of kind {self.kind!r} needs the parameter {name!r}")

    def with_steps(self, steps: int) -> Event:
        """The same mechanism repeated ``steps`` times."""
        return Event(self.sample_rate, self.noise_multiplier, steps, self.kind, self.params)

    def to_dict(self) -> dict[str, Any]:
        sigma: float | str = self.noise_multiplier
        if math.isinf(sigma):
            sigma = "inf"  # strict JSON has no infinity
        out: dict[str, Any] = {
            "kind": self.kind,
            "sample_rate": self.sample_rate,
            "noise_multiplier": sigma,
            "steps": self.steps,
        }
        if self.params:
            out["params"] = dict(self.params)
        return out

    @classmethod
    def from_dict(cls, d: Any) -> Event:
        if not isinstance(d, dict):
            raise LedgerError(f"an event must be a JSON object, got {type(d).__name__}")
        if not _EVENT_KEYS <= set(d) <= _EVENT_KEYS | _OPTIONAL_KEYS:
            raise LedgerError(
                f"an event must have exactly the keys {sorted(_EVENT_KEYS)} (and optionally "
                f"{sorted(_OPTIONAL_KEYS)}), got {sorted(d)}"
            )
        params = d.get("params", {})
        if not isinstance(params, dict):
            raise LedgerError(f"event params must be a JSON object, got {params!r}")
        sigma = d["noise_multiplier"]
        if sigma in ("inf", "Infinity"):
            sigma = math.inf
        steps = d["steps"]
        if isinstance(steps, bool) or not isinstance(steps, int):
            raise LedgerError(f"event steps must be an integer, got {steps!r}")
        try:
            return cls(d["sample_rate"], sigma, steps, d["kind"], tuple(params.items()))
        except (TypeError, ValueError) as err:
            raise LedgerError(f"invalid event {d!r}: {err}") from None


def _as_params(params: Any) -> Params:
    """``params`` (a mapping or (name, value) pairs) as name-sorted (str, float) pairs."""
    pairs = []
    for item in params.items() if isinstance(params, dict) else params:
        try:
            name, value = item
        except (TypeError, ValueError):
            raise TypeError(f"params must map names to numbers, got {params!r}") from None
        if not isinstance(name, str) or not name:
            raise ValueError(f"param names must be non-empty strings, got {name!r}")
        value = _as_float(value, f"param {name!r}")
        if math.isnan(value):
            raise ValueError(f"param {name!r} is NaN")
        pairs.append((name, value))
    if len({name for name, _ in pairs}) != len(pairs):
        raise ValueError(f"duplicate param names in {params!r}")
    return tuple(sorted(pairs))


class Ledger:
    """Ordered list of events. Consecutive events with equal (kind, q, sigma, params) are merged
    by adding steps.  Append-only: entries before the last never change."""

    def __init__(self, events: list[Event] | None = None) -> None:
        self._events: list[Event] = []
        for e in events or ():
            self.record(e)

    def record(self, event: Event) -> None:
        """Append ``event``, merging it into the last entry when its mechanism (key) matches."""
        if not isinstance(event, Event):
            raise TypeError(f"record() takes an Event, got {type(event).__name__}")
        if self._events and self._events[-1].key == event.key:
            last = self._events[-1]
            self._events[-1] = last.with_steps(last.steps + event.steps)
        else:
            self._events.append(event)

    @property
    def events(self) -> list[Event]:
        """A copy of the merged entries, oldest first."""
        return list(self._events)

    @property
    def total_steps(self) -> int:
        return sum(e.steps for e in self._events)

    def __len__(self) -> int:
        return len(self._events)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Ledger):
            return NotImplemented
        return self._events == other._events

    __hash__ = None  # type: ignore[assignment]  # mutable

    def __repr__(self) -> str:
        return f"Ledger({self._events!r})"

    # -- serialization ---------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """JSON-serializable form: ``{"format", "version", "events": [...]}``."""
        return {
            "format": LEDGER_FORMAT,
            "version": LEDGER_VERSION,
            "events": [e.to_dict() for e in self._events],
        }

    @classmethod
    def from_dict(cls, d: Any) -> Ledger:
        """Inverse of :meth:`to_dict`; raises :class:`LedgerError` on foreign or corrupt content."""
        if not isinstance(d, dict):
            raise LedgerError(f"a ledger must be a JSON object, got {type(d).__name__}")
        fmt = d.get("format")
        if fmt != LEDGER_FORMAT:
            raise LedgerError(
                f"not a dptrain ledger (format {fmt!r}, expected {LEDGER_FORMAT!r}); "
                "pass the ledger.json that Ledger.save wrote"
            )
        version = d.get("version")
        if isinstance(version, bool) or not isinstance(version, int):
            raise LedgerError(f"ledger version must be an integer, got {version!r}")
        if version > LEDGER_VERSION:
            raise LedgerError(
                f"ledger format version {version} is newer than this dptrain understands "
                f"({LEDGER_VERSION}); upgrade dptrain to read it"
            )
        if version < 1:
            raise LedgerError(f"invalid ledger format version {version}")
        extra = set(d) - {"format", "version", "events"}
        if extra:
            raise LedgerError(f"unexpected ledger keys {sorted(extra)}")
        events = d.get("events")
        if not isinstance(events, list):
            raise LedgerError(f"ledger 'events' must be a list, got {type(events).__name__}")
        ledger = cls()
        for i, item in enumerate(events):
            try:
                ledger.record(Event.from_dict(item))
            except LedgerError as err:
                raise LedgerError(f"ledger event #{i}: {err}") from None
        return ledger

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write atomically: a temp file in the same directory, fsync, then ``os.replace``.

        A crash leaves either the previous file or the new one, never a partial file."""
        text = json.dumps(self.to_dict(), indent=2, allow_nan=False) + "\n"
        atomic_write(Path(path), lambda f: f.write(text), parents=False)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Ledger:
        """Read a file written by :meth:`save`; :class:`LedgerError` names the path on failure."""
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise LedgerNotFoundError(f"ledger file {path} does not exist") from None
        except (OSError, UnicodeDecodeError) as err:
            raise LedgerError(f"cannot read ledger file {path}: {err}") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise LedgerError(
                f"ledger file {path} is not valid JSON ({err}); it may be truncated or corrupted"
            ) from None
        try:
            return cls.from_dict(data)
        except LedgerError as err:
            raise LedgerError(f"ledger file {path}: {err}") from None


def atomic_write(
    path: Path, write: Callable[[Any], None], *, binary: bool = False, parents: bool = True
) -> None:
    """Write through ``write(file)`` to a temp file beside ``path``, fsync, then rename (and
    fsync the directory): a crash leaves the old file or the new, never half of one.
    ``parents``: create missing parent directories.  Shared by every dptrain file writer."""
    path = Path(path)
    if parents:
        path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(
            fd, "wb" if binary else "w", **({} if binary else {"encoding": "utf-8"})
        ) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    fsync_dir(path.parent)


def fsync_dir(path: Path) -> None:
    """Persist the rename itself (best effort; not every platform has directory fds)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)
