"""A run's figures: the privacy spent (public) and the training curves (private).

``report/privacy.png`` (public) is a function of ``ledger.json`` and ``run.json`` only (the
recipe's delta, accountant, budget and adaptivity; :mod:`dptrain.publication`): epsilon at
delta of the ledger's first ``t`` steps, for at most :data:`POINTS` evenly spaced ``t`` and the
last step (fewer where the accountant is slow: about :data:`CURVE_SECONDS` per curve; the
time a query takes is a function of the ledger and the machine), by the run's accountant (the adaptive conversion for a run whose policy chose its
noise from data, where the certified guarantee is the filter's budget), with the other cheap
accountants as thin cross-check lines; the budget as a horizontal line; and, for a ledger of
more than one mechanism, the noise multiplier ``sigma_t`` and sample rate ``q_t`` per step.

``private/training.png`` (private, like the file it reads) plots ``private/metrics.jsonl``:
the training loss per logged step and its exponential moving average, the validation
metrics (``val_*`` records and ``private/stats.json``'s before/after values), and each
further numeric value the policy logged (e.g. the rl policy's ``rl_*`` diagnostics).

Both are drawn with matplotlib's Agg backend (the ``plots`` extra) and written atomically.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from accountants import Accountant, Event, Ledger, get_accountant
from accountants.ledger import atomic_write
from accountants.progress import SLOW_SECONDS, slow_step

from .extras import require

__all__ = [
    "CROSS_CHECK_POINTS",
    "CURVE_SECONDS",
    "MIN_POINTS",
    "POINTS",
    "PRIVACY_FIGURE",
    "TRAINING_FIGURE",
    "PrivacyFigure",
    "TrainingFigure",
    "curve_steps",
    "epsilon_at",
    "headline",
    "prefix",
    "privacy_figure",
    "render_run",
    "training_figure",
]

POINTS = 60
"""Evenly spaced steps at which the run's accountant is queried (plus step 0 and the last)."""

MIN_POINTS = 10
"""At least this many steps are queried, however slow the accountant."""

CURVE_SECONDS = 10.0
"""About how long one accountant's curve may take: beyond, its steps are thinned."""

CROSS_CHECK_POINTS = 12
"""Steps at which each cross-check accountant is queried."""

CROSS_CHECKS = ("rdp", "pld")
"""Accountants drawn as cross-checks (where not the run's own): PRV's queries take about a
second each, so it is drawn only as the run's accountant."""

MAX_CROSS_CHECK_MECHANISMS = 64
"""Ledgers of more distinct mechanisms get no cross-check lines (PLD would grid them)."""

_CROSS_CHECK_COLORS = {"rdp": "C2", "pld": "C4", "prv": "C5"}
"""One colour per cross-check accountant, none the budget line's red (C3)."""

PRIVACY_FIGURE = Path("report") / "privacy.png"
TRAINING_FIGURE = Path("private") / "training.png"

_STANDARD_KEYS = frozenset(
    {"step", "loss", "batch_size", "epsilon", "noise_multiplier", "update_norm"}
    | {"nonfinite", "applied", "seconds"}
)
_MAX_DIAGNOSTICS = 6
_MAX_VALIDATION = 4


# -- the data of the public figure ----------------------------------------------------------


def curve_steps(total: int, points: int = POINTS) -> list[int]:
    """Step 0, ``points`` evenly spaced steps in ``[1, total]`` (rounded, distinct) and
    ``total``: all of them when ``total <= points``."""
    if total < 0 or points < 1:
        raise ValueError(f"need total >= 0 and points >= 1, got {total}, {points}")
    if total == 0:
        return [0]
    spaced = np.rint(np.linspace(1, total, min(points, total))).astype(int).tolist()
    return sorted({0, *spaced, total})


def prefix(events: Sequence[Event], steps: int) -> list[Event]:
    """The ledger's first ``steps`` steps, as events."""
    out: list[Event] = []
    left = steps
    for e in events:
        if left <= 0:
            break
        out.append(e if e.steps <= left else e.with_steps(left))
        left -= e.steps
    if left > 0:
        raise ValueError(f"the ledger has fewer than {steps} steps")
    return out


def epsilon_at(
    events: Sequence[Event], delta: float, accountant: str | Accountant, adaptive: bool
) -> float:
    """Epsilon at ``delta`` of ``events``, as ``dptrain epsilon`` computes it: the
    accountant's ``epsilon`` (``adaptive_epsilon`` for an adaptive run); 0 for no events."""
    if not events:
        return 0.0
    acc = get_accountant(accountant) if isinstance(accountant, str) else accountant
    if adaptive:
        return float(acc.adaptive_epsilon(list(events), delta))  # type: ignore[attr-defined]
    return float(acc.epsilon(list(events), delta))


def _curve(
    events: Sequence[Event], steps: list[int], delta: float, accountant: str, adaptive: bool
) -> tuple[np.ndarray, np.ndarray]:
    """The steps and :func:`epsilon_at` of their prefixes: the last and the middle one first;
    the middle one times the rest, which are thinned (evenly, to at least
    :data:`MIN_POINTS`) where they would take over :data:`CURVE_SECONDS`, and announced by
    :func:`accountants.progress.slow_step` where slow."""
    acc = get_accountant(accountant)  # one instance: PRV keeps its grids per instance
    eps = dict.fromkeys(steps, math.nan)
    todo = steps[:-1]
    first = [steps[-1]] + ([todo.pop(len(todo) // 2)] if todo else [])
    seconds = 0.0
    for k in first:
        t0 = time.perf_counter()
        eps[k] = epsilon_at(prefix(events, k), delta, acc, adaptive)
        seconds = time.perf_counter() - t0
    if seconds * len(todo) > CURVE_SECONDS:
        keep = max(MIN_POINTS, int(CURVE_SECONDS / seconds))
        if keep < len(todo):
            picked = np.unique(np.rint(np.linspace(0, len(todo) - 1, keep)).astype(int))
            dropped = set(todo) - {todo[i] for i in picked}
            todo = [todo[i] for i in picked]
            for k in dropped:
                del eps[k]
    expected = seconds * len(todo)
    what = f"the privacy figure: {accountant} epsilon at {len(todo)} more steps"
    with slow_step(what, expected if expected >= SLOW_SECONDS else 0.0):
        for k in todo:
            eps[k] = epsilon_at(prefix(events, k), delta, acc, adaptive)
    shown = sorted(eps)
    return np.array(shown), np.array([eps[k] for k in shown])


@dataclass
class PrivacyFigure:
    """What the public figure plots (the arrays are the plotted values)."""

    path: Path
    steps: np.ndarray  # the steps t of the curve (0 included)
    epsilon: np.ndarray  # epsilon at delta of the first t steps, by the run's accountant
    accountant: str
    delta: float
    adaptive: bool
    budget: float | None
    cross_checks: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    # per-step mechanism (drawn when the ledger has more than one): stairs over edges
    edges: np.ndarray = field(default_factory=lambda: np.zeros(0))
    noise_multiplier: np.ndarray = field(default_factory=lambda: np.zeros(0))
    sample_rate: np.ndarray = field(default_factory=lambda: np.zeros(0))


def privacy_figure(
    events: Sequence[Event],
    path: str | Path,
    *,
    delta: float,
    accountant: str,
    adaptive: bool = False,
    budget: float | None = None,
    title: str = "",
    cross_check: bool = True,
) -> PrivacyFigure:
    """Draw the public figure of a ledger's ``events`` into ``path`` (PNG) and return its data.

    Its inputs are public: the ledger, delta, the accountant, the budget, a title."""
    events = list(events)
    total = sum(e.steps for e in events)
    steps, eps = _curve(events, curve_steps(total), delta, accountant, adaptive)
    fig_data = PrivacyFigure(Path(path), steps, eps, accountant, delta, adaptive, budget)
    mechanisms = {e.key for e in events}
    if cross_check and not adaptive and total and len(mechanisms) <= MAX_CROSS_CHECK_MECHANISMS:
        # non-adaptive accountants are not valid for an adaptive run: no cross-check there
        cc_steps = curve_steps(total, CROSS_CHECK_POINTS)
        for name in CROSS_CHECKS:
            if name == accountant:
                continue
            try:
                fig_data.cross_checks[name] = _curve(events, cc_steps, delta, name, False)
            except (ValueError, ArithmeticError):  # an event kind it cannot account, a floor
                continue
    if len(mechanisms) > 1:
        fig_data.edges = np.cumsum([0] + [e.steps for e in events])
        fig_data.noise_multiplier = np.array([e.noise_multiplier for e in events])
        fig_data.sample_rate = np.array([e.sample_rate for e in events])
    _draw_privacy(fig_data, title)
    return fig_data


def headline(d: PrivacyFigure) -> str:
    """The figure's statement: the run's epsilon after its last step; for an adaptive run
    the filter's budget (the certified guarantee) and the spend only as an odometer."""
    last = float(d.epsilon[-1])
    spent = f"{last:.4g}" if math.isfinite(last) else "∞ (no guarantee)"
    at = f"at δ = {d.delta:.3g} after {d.steps[-1]} steps ({d.accountant})"
    if not d.adaptive:
        return f"ε = {spent} {at}"
    if d.budget is not None:
        return (
            f"guarantee ε = {d.budget:g} (the privacy filter's budget) {at};\nspent so far {spent}"
        )
    return (
        f"spent so far ε = {spent} {at}\n(an odometer: the filter certifies its budget at the "
        "run's δ only)"
    )


def _draw_privacy(d: PrivacyFigure, title: str) -> None:
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    two = d.edges.size > 0
    fig, axes = plt.subplots(
        2 if two else 1,
        1,
        figsize=(7.0, 6.4 if two else 4.2),
        sharex=True,
        squeeze=False,
        layout="constrained",
        height_ratios=[3, 2] if two else None,
    )
    ax = axes[0, 0]
    label = f"{d.accountant}" + (" (adaptive conversion: spent so far)" if d.adaptive else "")
    finite = np.isfinite(d.epsilon)
    ax.plot(d.steps[finite], d.epsilon[finite], lw=2.2, color="C0", label=label)
    for name, (s, e) in d.cross_checks.items():
        ok = np.isfinite(e)
        # one colour per accountant, never the budget's red (C3)
        color = _CROSS_CHECK_COLORS.get(name, "C7")
        ax.plot(s[ok], e[ok], lw=0.9, ls="--", color=color, label=f"{name} (cross-check)")
    if d.budget is not None and math.isfinite(d.budget):
        what = "filter budget: the certified guarantee" if d.adaptive else "budget"
        ax.axhline(d.budget, color="C3", lw=1.2, ls=":", label=f"{what} ε = {d.budget:g}")
    ax.set_title((f"{title}\n" if title else "") + headline(d), fontsize=10)
    fig.supxlabel(
        "Drawn from ledger.json and run.json only (public). δ is the accountant's; the run's\n"
        "guarantee adds the noise sampler's truncation term (run.json delta_total).",
        fontsize=7,
        color="0.35",
    )
    ax.set_ylabel("ε spent")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    # steps are whole numbers: no 0.25-step ticks on a short run
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if two:
        bx = axes[1, 0]
        sigma = np.where(np.isfinite(d.noise_multiplier), d.noise_multiplier, np.nan)
        bx.stairs(sigma, d.edges, baseline=None, color="C0", lw=1.4)
        bx.set_ylabel("σ per step", color="C0")
        bx.grid(alpha=0.3)
        if np.unique(d.sample_rate).size > 1:
            qx = bx.twinx()
            qx.stairs(d.sample_rate, d.edges, baseline=None, color="C1", lw=1.0, ls="--")
            qx.set_ylabel("q per step", color="C1")
        bx.set_xlabel("step")
    else:
        ax.set_xlabel("step")
    _save(fig, d.path)


# -- the private figure -----------------------------------------------------------------------


@dataclass
class TrainingFigure:
    """What the private figure plots."""

    path: Path
    steps: np.ndarray  # logged steps with a finite loss
    loss: np.ndarray
    smoothed: np.ndarray  # exponential moving average of ``loss`` (bias-corrected)
    validation: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    diagnostics: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)


def ema(values: np.ndarray, span: int) -> np.ndarray:
    """Bias-corrected exponential moving average, ``alpha = 2 / (span + 1)``."""
    alpha = 2.0 / (span + 1)
    out = np.empty(len(values))
    num = den = 0.0
    for i, v in enumerate(values):
        num = (1 - alpha) * num + alpha * v
        den = (1 - alpha) * den + alpha
        out[i] = num / den
    return out


def _number(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, int | float):
        return None
    return float(v)


def _series(records: list[dict[str, Any]], key: str) -> tuple[np.ndarray, np.ndarray]:
    pts = [
        (r["step"], _number(r.get(key)))
        for r in records
        if _number(r.get("step")) is not None and _number(r.get(key)) is not None
    ]
    pts = [(s, v) for s, v in pts if v is not None and math.isfinite(v)]
    return np.array([s for s, _ in pts], dtype=float), np.array([v for _, v in pts], dtype=float)


def training_figure(
    records: list[dict[str, Any]],
    path: str | Path,
    *,
    stats: dict[str, Any] | None = None,
    title: str = "",
) -> TrainingFigure:
    """Draw the private figure of ``private/metrics.jsonl``'s ``records`` (and the
    before/after validation metrics of ``stats``) into ``path``; return its data."""
    steps, loss = _series(records, "loss")
    span = max(1, len(loss) // 10)
    d = TrainingFigure(Path(path), steps, loss, ema(loss, span) if len(loss) else loss)
    keys: list[str] = []
    for r in records:
        keys += [k for k in r if k not in keys]
    for k in keys:
        if k.startswith("val_") and len(d.validation) < _MAX_VALIDATION:
            s, v = _series(records, k)
            if len(v):
                d.validation[k[4:]] = (s, v)
    stats = stats or {}
    last = max([0.0, *[float(r["step"]) for r in records if _number(r.get("step")) is not None]])
    for when, at in (("validation_before", 0.0), ("validation_after", last)):
        for k, v in (stats.get(when) or {}).items():
            x = _number(v)
            if x is None or not math.isfinite(x):
                continue
            s, vals = d.validation.get(k, (np.zeros(0), np.zeros(0)))
            order = np.argsort(np.append(s, at), kind="stable")
            d.validation[k] = (np.append(s, at)[order], np.append(vals, x)[order])
    for k in keys:
        if k in _STANDARD_KEYS or k.startswith("val_") or len(d.diagnostics) >= _MAX_DIAGNOSTICS:
            continue
        s, v = _series(records, k)
        if len(v):
            d.diagnostics[k] = (s, v)
    _draw_training(d, title, span)
    return d


def _draw_training(d: TrainingFigure, title: str, span: int) -> None:
    plt = _pyplot()
    panels = [("validation " + k, s, v, "o") for k, (s, v) in d.validation.items()]
    panels += [(k, s, v, "." if len(v) < 50 else None) for k, (s, v) in d.diagnostics.items()]
    fig, axes = plt.subplots(
        1 + len(panels),
        1,
        figsize=(7.0, 3.4 + 1.9 * len(panels)),
        sharex=True,
        squeeze=False,
        layout="constrained",
    )
    ax = axes[0, 0]
    ax.plot(d.steps, d.loss, lw=0.8, alpha=0.45, color="C0", label="loss (per logged step)")
    if len(d.loss) > 1:
        ax.plot(d.steps, d.smoothed, lw=2.0, color="C0", label=f"moving average (span {span})")
    ax.set_ylabel("training loss")
    ax.set_title(
        (f"{title}: " if title else "")
        + "training curves (PRIVATE: un-noised statistics of private records)",
        fontsize=10,
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    for i, (label, s, v, marker) in enumerate(panels):
        px = axes[i + 1, 0]
        px.plot(s, v, marker=marker, ms=3, lw=1.2, color=f"C{(i + 1) % 10}")
        px.set_ylabel(label, fontsize=8)
        px.grid(alpha=0.3)
    axes[-1, 0].set_xlabel("step")
    _save(fig, d.path)


# -- a run directory -------------------------------------------------------------------------


def _read_json(path: Path) -> dict[str, Any]:
    """A JSON object file ({} when absent)."""
    if not path.exists():
        return {}
    value = json.loads(path.read_text(encoding="utf-8"))
    return value if isinstance(value, dict) else {}


def _read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of ``metrics.jsonl`` (a line cut by a crash is skipped, as by
    :meth:`dptrain.rundir.RunDir.read_metrics`; read here without importing torch)."""
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict):
            out.append(rec)
    return out


def render_run(
    run_dir: str | Path,
    *,
    delta: float | None = None,
    accountant: str | None = None,
    adaptive: bool | None = None,
    private: bool = True,
) -> tuple[PrivacyFigure, TrainingFigure | None]:
    """Draw ``report/privacy.png`` of a run directory from its public files (``ledger.json``,
    ``run.json``; delta, accountant and adaptivity default to the run's; another choice draws
    ``report/privacy-<accountant>-delta<delta>[-adaptive].png`` instead, leaving the run's own
    figure as it is) and, with
    ``private`` and a ``private/metrics.jsonl``, ``private/training.png``."""
    run = Path(run_dir)
    meta = _read_json(run / "run.json")  # public: a function of the recipe and the ledger
    ledger = Ledger.load(run / "ledger.json")
    run_delta = meta.get("delta")
    delta = delta if delta is not None else run_delta
    if not isinstance(delta, float | int) or isinstance(delta, bool):
        raise ValueError(f"{run / 'run.json'} has no delta: pass delta")
    name = accountant or meta.get("accountant") or "rdp"
    adaptive = bool(meta.get("adaptive")) if adaptive is None else adaptive
    budget = meta.get("epsilon_budget")
    if not isinstance(budget, int | float) or isinstance(budget, bool) or delta != run_delta:
        budget = None  # the budget holds at the run's delta
    title = str(meta.get("name", ""))
    if meta.get("insecure_seed") is not None:
        title += " (insecure_seed: NO guarantee)"
    unit = meta.get("privacy_unit")
    if isinstance(unit, dict) and unit.get("strategy") == "example":  # the ledger is per record
        k = unit.get("group_size")
        if unit.get("max_records_per_person") == k:  # k public: the recipe's cap
            title += (
                f" (ε per record; per {unit.get('unit', 'person')}: {k}ε, group privacy over {k})"
            )
        else:  # an older uncapped run: k was the data's largest count (dptrain epsilon refuses)
            title += " (ε per record; no per-person claim: its group size was a data statistic)"
    # the run's own figure only at the run's delta, accountant and adaptivity: another view
    # goes beside it, so report/privacy.png always states the run's guarantee
    own = (
        delta == run_delta
        and name == (meta.get("accountant") or "rdp")
        and adaptive == bool(meta.get("adaptive"))
    )
    where = PRIVACY_FIGURE
    if not own:
        where = where.with_name(
            f"privacy-{name}-delta{float(delta):g}{'-adaptive' if adaptive else ''}.png"
        )
    public = privacy_figure(
        ledger.events,
        run / where,
        delta=float(delta),
        accountant=name,
        adaptive=adaptive,
        budget=None if budget is None else float(budget),
        title=title,
    )
    training = None
    metrics = run / "private" / "metrics.jsonl"
    if private and metrics.exists():
        training = training_figure(
            _read_metrics(metrics),
            run / TRAINING_FIGURE,
            stats=_read_json(run / "private" / "stats.json"),
            title=str(meta.get("name", "")),
        )
    return public, training


# -- matplotlib ------------------------------------------------------------------------------


def _pyplot():
    matplotlib = require("matplotlib", "plots", "a run's figures")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> None:
    import matplotlib.pyplot as plt

    try:
        atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110), binary=True)
    finally:
        plt.close(fig)
