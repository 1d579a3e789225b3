"""Secret Sharer canaries (Carlini et al. 2019) for auditing a run.

A canary is a template sentence with a random pseudonym and a uniformly random secret of
``secret_digits`` digits, e.g. ``"The secret code of Mavoru Kestin is 482913."``.  The recipe's
``data.canaries`` gives, per repetition count ``k``, how many canaries have that count.  An
included canary with count ``k`` is appended to the private training set as ``k`` separate
records.  Canaries with ``k = 1`` are included independently with probability 1/2 (seeded):
they serve the one-run audit, and the excluded ones are the "never seen" baseline of exposure.
Canaries with ``k > 1`` serve exposure by repetition count and are always included.

Privacy unit.  The guarantee is per record, so a canary repeated ``k`` times is protected only
through group privacy over ``k`` records (roughly ``k * epsilon``); the one-run audit therefore
uses only the canaries with ``k = 1``.  Canary records count in the dataset size ``N`` (and
hence in the sample rate and the default delta).

The manifest (``canaries.secret.json`` in the run directory) lists every canary's secret and
whether it was included: it is secret material -- anyone holding it can read the secrets and
the audit's answers -- so keep it with the private data, never with the released model.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dptrain.data.loading import TextDataset

MANIFEST_NAME = "canaries.secret.json"
MANIFEST_FORMAT = "dptrain-canaries"
_WARNING = (
    "SECRET: the canary secrets and which canaries were trained on. Keep this file with the "
    "private data; never publish it with the model."
)
_CONSONANTS = "bdfgklmnprstvz"
_VOWELS = "aeiou"


@dataclass(frozen=True)
class Canary:
    """One canary: its text is ``template`` with ``name`` and ``secret`` filled in."""

    index: int
    name: str
    secret: str
    repetitions: int
    included: bool

    def text(self, template: str, secret: str | None = None) -> str:
        """The canary sentence, or the same sentence with another candidate ``secret``."""
        return template.format(name=self.name, secret=self.secret if secret is None else secret)

    def record_ids(self) -> list[str]:
        return [f"canary-{self.index:05d}-{j}" for j in range(self.repetitions)]


def _pseudonym(rng: np.random.Generator) -> str:
    def word(syllables: int) -> str:
        parts = [
            rng.choice(list(_CONSONANTS)) + rng.choice(list(_VOWELS)) for _ in range(syllables)
        ]
        return ("".join(parts) + rng.choice(list(_CONSONANTS))).capitalize()

    return f"{word(int(rng.integers(2, 4)))} {word(int(rng.integers(1, 3)))}"


def make_canaries(config: Any, seed: int) -> list[Canary]:
    """The canaries of a ``data.canaries`` section (a :class:`dptrain.recipe.CanarySection`),
    deterministic in ``config.seed`` (default ``seed``)."""
    rng = np.random.default_rng([0xCA7A, config.seed if config.seed is not None else seed])
    canaries: list[Canary] = []
    names: set[str] = set()
    for reps, count in sorted(config.repetitions.items()):
        for _ in range(count):
            name = _pseudonym(rng)
            while name in names:
                name = _pseudonym(rng)
            names.add(name)
            secret = "".join(str(d) for d in rng.integers(0, 10, config.secret_digits))
            coin = bool(rng.integers(0, 2))
            included = coin if reps == 1 else True
            canaries.append(Canary(len(canaries), name, secret, reps, included))
    return canaries


def canary_records(canaries: list[Canary], template: str) -> TextDataset:
    """The training records of the included canaries: ``k`` records for repetition count ``k``."""
    texts, ids = [], []
    for c in canaries:
        if c.included:
            texts += [c.text(template)] * c.repetitions
            ids += c.record_ids()
    return TextDataset(texts, ids)


def insert_canaries(train: TextDataset, config: Any, seed: int) -> TextDataset:
    """``train`` followed by the included canaries' records (order is irrelevant to Poisson
    sampling)."""
    extra = canary_records(make_canaries(config, seed), config.template)
    clash = set(extra.ids) & set(train.ids)
    if clash:
        raise ValueError(
            f"data.canaries: record id {sorted(clash)[0]!r} is already used by the training data; "
            "rename those records (ids starting with 'canary-' are reserved)"
        )
    return TextDataset(train.texts + extra.texts, train.ids + extra.ids)


def write_manifest(run_dir: str | Path, config: Any, seed: int) -> Path:
    """Write the secret canary manifest into ``run_dir`` (atomically, mode 0600)."""
    from dptrain.rundir import write_json

    canaries = make_canaries(config, seed)
    path = Path(run_dir) / MANIFEST_NAME
    write_json(
        path,
        {
            "format": MANIFEST_FORMAT,
            "warning": _WARNING,
            "template": config.template,
            "secret_digits": config.secret_digits,
            "canaries": [asdict(c) for c in canaries],
        },
    )
    path.chmod(0o600)
    return path


@dataclass(frozen=True)
class Manifest:
    template: str
    secret_digits: int
    canaries: list[Canary]

    @property
    def space_size(self) -> int:
        return 10**self.secret_digits


def read_manifest(run_dir: str | Path) -> Manifest | None:
    """The run's canary manifest, or None if the run has no canaries."""
    path = Path(run_dir) / MANIFEST_NAME
    if not path.exists():
        return None
    d = json.loads(path.read_text())
    if d.get("format") != MANIFEST_FORMAT:
        raise ValueError(f"{path} is not a dptrain canary manifest")
    return Manifest(d["template"], d["secret_digits"], [Canary(**c) for c in d["canaries"]])


__all__ = [
    "MANIFEST_NAME",
    "Canary",
    "Manifest",
    "canary_records",
    "insert_canaries",
    "make_canaries",
    "read_manifest",
    "write_manifest",
]
