"""Secret Sharer canaries (Carlini et al. 2019) for auditing a run.

A canary is a template sentence with a random pseudonym and a uniformly random secret of
``secret_digits`` digits, e.g. ``"The secret code of Mavoru Kestin is 482913."``.  The recipe's
``data.canaries`` gives, per repetition count ``k``, how many canaries have that count.  An
included canary with count ``k`` is appended to the private training set as ``k`` separate
records.  Canaries with ``k = 1`` are included independently with probability 1/2:
they serve the one-run audit, and the excluded ones are the "never seen" baseline of exposure.
Canaries with ``k > 1`` serve exposure by repetition count and are always included.

Privacy unit.  The guarantee is per record, so a canary repeated ``k`` times is protected only
through group privacy over ``k`` records (roughly ``k * epsilon``); the one-run audit therefore
uses only the canaries with ``k = 1``.  Canary records count in the dataset size ``N`` (and
hence in the sample rate and the default delta).

Under a person unit (``data.privacy_unit``, ``person_level=True``) canary ``i`` is one person,
``canary-<i>``, whose ``k`` records the per-person guarantee covers whole; so EVERY canary, of
any ``k``, is included by its coin with probability 1/2, and the one-run audit runs over canary
people (:mod:`attacks.people`).  The secrets and coins are the same draws either way; the
manifest says which rule was used (``person_level``).

Secrets, pseudonyms and inclusion coins are drawn from the run key (domain "canaries",
counter ``(canary index, j)``, exact uniform integers by rejection), so nobody holding only the
recipe can regenerate them; the audit reads them from the manifest.

The manifest (``canaries.secret.json`` in the run directory) lists every canary's secret and
whether it was included: it is secret material -- anyone holding it can read the secrets and
the audit's answers -- so keep it with the private data, never with the released model.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from dptrain.data.loading import TextDataset
from dptrain.secret import Prf, RunKey

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


class _Draws:
    """Uniform integers from the keyed words of one counter row ``hi`` (blocks ``(hi, j)``)."""

    def __init__(self, prf: Prf, hi: int) -> None:
        self.prf, self.hi, self.words, self.used, self.block = prf, hi, [], 0, 0

    def word(self) -> int:
        if self.used == len(self.words):
            self.words = [int(w) for w in self.prf.run(self.hi, self.block, 16).reshape(-1)]
            self.block += 16
            self.used = 0
        self.used += 1
        return self.words[self.used - 1]

    def integer(self, bound: int) -> int:
        """Exactly uniform on ``range(bound)`` (rejection of the top partial range)."""
        limit = 2**64 - 2**64 % bound
        while True:
            w = self.word()
            if w < limit:
                return w % bound

    def choice(self, items: str) -> str:
        return items[self.integer(len(items))]


def _pseudonym(draw: _Draws) -> str:
    def word(syllables: int) -> str:
        parts = [draw.choice(_CONSONANTS) + draw.choice(_VOWELS) for _ in range(syllables)]
        return ("".join(parts) + draw.choice(_CONSONANTS)).capitalize()

    return f"{word(2 + draw.integer(2))} {word(1 + draw.integer(2))}"


def make_canaries(config: Any, key: RunKey, *, person_level: bool = False) -> list[Canary]:
    """The canaries of a ``data.canaries`` section (a :class:`dptrain.recipe.CanarySection`),
    drawn from ``key``; ``person_level``: every canary (one person each) has an inclusion
    coin, not only the single-record ones (see the module docstring)."""
    prf = key.prf("canaries")
    canaries: list[Canary] = []
    names: set[str] = set()
    for reps, count in sorted(config.repetitions.items()):
        for _ in range(count):
            draw = _Draws(prf, len(canaries))
            name = _pseudonym(draw)
            while name in names:
                name = _pseudonym(draw)
            names.add(name)
            secret = "".join(str(draw.integer(10)) for _ in range(config.secret_digits))
            coin = bool(draw.integer(2))
            included = coin if reps == 1 or person_level else True
            canaries.append(Canary(len(canaries), name, secret, reps, included))
    return canaries


def left_out(canaries: list[Canary] | None, cap: int | None = None) -> tuple[int, int]:
    """``(records, people)`` of the canaries whose coin left them out of training (``cap``:
    records per person kept, ``data.privacy_unit.max_records_per_person``).  Public counts
    (N, hence q and the default delta, and run.json's sizes) add them back, so that those
    counts follow the recipe's canary configuration and never reveal a coin."""
    out = [c for c in canaries or [] if not c.included]
    return sum(min(c.repetitions, cap or c.repetitions) for c in out), len(out)


def canary_records(canaries: list[Canary], template: str) -> TextDataset:
    """The training records of the included canaries: ``k`` records for repetition count ``k``."""
    texts, ids = [], []
    for c in canaries:
        if c.included:
            texts += [c.text(template)] * c.repetitions
            ids += c.record_ids()
    return TextDataset(texts, ids)


def check_canaries_fit(
    canaries: list[Canary], template: str, encode: Any, tokenizer: Any, max_length: int
) -> None:
    """Refuse canaries that ``max_length`` would truncate: the secret is at the sentence's end
    (in the default template), so a truncated canary loses it, and one cut to a single token
    has no scored token left for the audit.  ``encode(ds, tokenizer, max_length)`` is the
    run's task encoding (:meth:`dptrain.tasks.Task.encode`: a canary is plain text with EOS in
    every task).  Every canary is checked, included or not, so the refusal shows no coin."""
    from dptrain.errors import RecipeError

    if not canaries:
        return
    ds = TextDataset([c.text(template) for c in canaries], [c.record_ids()[0] for c in canaries])
    lengths = encode(ds, tokenizer, 2**31 - 1).lengths  # untruncated
    longest = int(lengths.max())
    if longest > max_length:
        raise RecipeError(
            f"data.canaries: a canary sentence takes {longest} tokens (with EOS), more than "
            f"data.max_length = {max_length}: truncated, it would lose its secret (and with no "
            "token after the first, the audit could not score it at all). Fix: raise "
            f"data.max_length to at least {longest}, or shorten data.canaries.template"
        )


def insert_canaries(
    train: TextDataset,
    config: Any,
    key: RunKey,
    canaries: list[Canary] | None = None,
    *,
    person_level: bool = False,
) -> TextDataset:
    """``train`` followed by the included canaries' records (order is irrelevant to Poisson
    sampling); ``canaries``: the run's, already drawn from ``key`` (else drawn here, by
    ``person_level``'s rule)."""
    if canaries is None:
        canaries = make_canaries(config, key, person_level=person_level)
    extra = canary_records(canaries, config.template)
    reserved = {rid for c in canaries for rid in c.record_ids()}  # included or not: no coin shows
    clash = reserved & set(train.ids)
    if clash:
        raise ValueError(
            f"data.canaries: record id {sorted(clash)[0]!r} is already used by the training data; "
            "rename those records (ids starting with 'canary-' are reserved)"
        )
    return TextDataset(train.texts + extra.texts, train.ids + extra.ids)


def write_manifest(
    run_dir: str | Path,
    config: Any,
    key: RunKey | None = None,
    *,
    canaries: list[Canary] | None = None,
    person_level: bool = False,
) -> Path:
    """Write the secret canary manifest into ``run_dir`` (atomically, mode 0600): the
    ``canaries`` given (those the run inserted), or those of ``key``; ``person_level``: the
    run's unit is a person, so every canary had an inclusion coin."""
    from dptrain.rundir import write_json

    if canaries is None:
        if key is None:
            raise ValueError("write_manifest needs the run's canaries or its key")
        canaries = make_canaries(config, key, person_level=person_level)
    path = Path(run_dir) / MANIFEST_NAME
    write_json(
        path,
        {
            "format": MANIFEST_FORMAT,
            "warning": _WARNING,
            "template": config.template,
            "secret_digits": config.secret_digits,
            "person_level": person_level,
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
    person_level: bool = False  # every canary (a person) had an inclusion coin

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
    canaries = [Canary(**c) for c in d["canaries"]]
    return Manifest(d["template"], d["secret_digits"], canaries, bool(d.get("person_level")))


__all__ = [
    "MANIFEST_NAME",
    "Canary",
    "Manifest",
    "canary_records",
    "check_canaries_fit",
    "insert_canaries",
    "left_out",
    "make_canaries",
    "read_manifest",
    "write_manifest",
]
