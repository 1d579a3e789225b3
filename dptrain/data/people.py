"""People: which person each record belongs to (``data.privacy_unit.field``), read from the file.

A record's person is the value of its ``field`` (a JSON field, or a CSV / Parquet / dataset
column) in the canonical text of :func:`~dptrain.data.loading.canonical_id`, the same in every
format: ``1``, ``1.0`` and ``"1"`` are one person (else one person's records could be split
into several "people", each bounded alone, and the person-level guarantee would silently
weaken).  A record without one (missing, null, NaN, empty or whitespace-only, alike in every
format) is an error naming the line: under a person-level guarantee every record must be
attributed, or a person's unattributed records would escape their bound.  Two ids that are
the same number written two ways (``"007"`` and ``7``, ``"+7"`` and ``"7"``) are refused too
(:func:`person_ids`).  Audit canaries (:mod:`dptrain.data.canaries`) are people of their own:
canary ``i``'s repetitions are the records of person ``canary-<i>`` (:func:`is_canary_person`),
so when a recipe has ``data.canaries`` a person id of that form in the data is refused: it
would merge a real person's records with a canary's (one bound over both), or be counted as a
canary.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from decimal import Decimal
from typing import TYPE_CHECKING

import numpy as np

from .loading import DataError, NoFieldsError, TextDataset, canonical_id, load_field

if TYPE_CHECKING:
    from ..recipe import Recipe
    from ..tasks.schema import TaskSection

__all__ = [
    "People",
    "is_canary_person",
    "person_ids",
    "read_people",
    "recipe_person_ids",
    "same_number",
    "unit_name",
]

_CANARY = re.compile(r"^(canary-\d+)-\d+$")  # a canary record's id: its person, repetition
_CANARY_PERSON = re.compile(r"canary-\d+")


def is_canary_person(person: str) -> bool:
    """Is ``person`` an audit canary (:func:`read_people` names canary ``i`` ``canary-<i>``)?"""
    return _CANARY_PERSON.fullmatch(person) is not None


_DECIMAL = re.compile(r"[+-]?[0-9]+(\.[0-9]+)?")


@dataclass
class People:
    """Records grouped by person: ``members[p]`` are the record indices of person ``ids[p]``
    (in record order); ``of_record[i]`` is record ``i``'s person index."""

    ids: list[str]
    members: list[np.ndarray]
    of_record: np.ndarray

    @classmethod
    def from_record_persons(cls, persons: list[str]) -> People:
        index: dict[str, int] = {}
        of_record = np.empty(len(persons), dtype=np.int64)
        for i, person in enumerate(persons):
            of_record[i] = index.setdefault(person, len(index))
        order = np.argsort(of_record, kind="stable")
        bounds = np.cumsum(np.bincount(of_record, minlength=len(index)))[:-1]
        return cls(list(index), np.split(order, bounds), of_record)

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def counts(self) -> np.ndarray:
        return np.array([len(m) for m in self.members], dtype=np.int64)

    @property
    def max_records(self) -> int:
        return int(self.counts.max()) if len(self) else 0


def unit_name(field: str) -> str:
    """The person a field identifies, for reports: ``patient_id`` -> ``patient``."""
    name = re.sub(r"(_id|id|_key)$", "", field.strip(), flags=re.IGNORECASE).strip("_- ")
    return name.replace("_", " ") if name else "person"


def person_ids(
    path: str,
    field: str,
    *,
    text_field: str = "text",
    format: str | None = None,
    task: TaskSection | None = None,
    canaries: bool = False,
) -> dict[str, str]:
    """``{record id: person id}`` for every record of ``path`` (a file, a dataset folder or
    ``bundled:NAME[:train|:validation]``), read by :func:`~dptrain.data.loading.load_field`:
    the records and ids of :func:`~dptrain.data.loading.load_texts`, in any format with fields
    (JSONL, a JSON array, CSV, TSV, Parquet, a ``datasets`` save); for a structured ``task``
    (instruction, chat, classification), the records and ids of
    :func:`~dptrain.tasks.records.load_records`, by its ``load_record_field``.  Each person id
    is the canonical text of :func:`~dptrain.data.loading.canonical_id`; a record without one,
    or two ids that are the same number written two ways (:func:`same_number`), are refused
    naming the records' places; with ``canaries`` (the recipe plants audit canaries) so is a
    person id of a canary person's form (:func:`is_canary_person`)."""
    try:
        if task is not None and task.kind != "text":
            from ..tasks.records import load_record_field

            ds, values = load_record_field(path, task, field, text_field=text_field, format=format)
        else:
            ds, values = load_field(path, field, text_field=text_field, format=format)
    except NoFieldsError as e:
        raise NoFieldsError(f"data.privacy_unit.field: {e}") from None
    persons, numbers = [], {}
    for where, value in values:
        person = canonical_id(value, where, field)
        if person is None:
            raise DataError(
                f"{where}: the record has no {field!r} (data.privacy_unit.field; missing, null "
                "or empty): every record must name its person, or that person's other records "
                "would not be bounded together. Fix: give every record a non-empty "
                f"{field!r}, or drop the record"
            )
        if canaries and is_canary_person(person):
            raise DataError(
                f"{where}: {field!r} {person!r} has the form of an audit canary's person id "
                "(canary-<number>), and this recipe plants canaries (data.canaries): the "
                "record would be bounded together with, or counted as, a canary. Fix: rename "
                "that person in the data (e.g. a prefix such as 'p-'), or remove data.canaries"
            )
        number = same_number(person)
        if number is not None:
            first = numbers.setdefault(number, (person, where))
            if first[0] != person:
                raise DataError(
                    f"{where}: {field!r} {person!r} and {first[1]}: {first[0]!r} are the same "
                    "number written two ways; read as text they would be two people, and if "
                    "they are one person, their records would be bounded apart. Fix: write "
                    "every id of a person the same way (e.g. without leading zeros or a sign), "
                    "or, if they are two people, give them ids that are not the same number"
                )
        persons.append(person)
    return dict(zip(ds.ids, persons, strict=True))


def recipe_person_ids(
    recipe: Recipe, field: str | None = None, path: str | None = None
) -> dict[str, str]:
    """:func:`person_ids` of a recipe's data (or of ``path``, e.g. its validation file) as
    training reads them: its format, text field and task (so the ids are the training
    records' own), by ``field`` (default ``data.privacy_unit.field``); with ``data.canaries``,
    a person id of a canary person's form is refused."""
    d = recipe.data
    if field is None:
        if d.privacy_unit is None:
            raise ValueError("recipe_person_ids: the recipe has no data.privacy_unit")
        field = d.privacy_unit.field
    return person_ids(
        path or d.path,
        field,
        text_field=d.text_field,
        format=d.format,
        task=recipe.task,
        canaries=d.canaries is not None,
    )


def same_number(person: str) -> Decimal | None:
    """The number a canonical person id writes in decimal (``"007"``, ``"+7"`` and ``"7"``
    are all 7), or None for an id that is not a plain decimal number: ids with the same
    number are one person written two ways, refused by :func:`person_ids`."""
    return Decimal(person) if _DECIMAL.fullmatch(person) else None


def read_people(ds: TextDataset, persons: dict[str, str]) -> People:
    """The people of ``ds``: each record's person from ``persons`` (canaries: their own)."""
    out = []
    for rid in ds.ids:
        person = persons.get(rid)
        if person is None:
            m = _CANARY.match(rid)
            if m is None:
                raise DataError(f"record {rid!r} has no person id (data.privacy_unit.field)")
            person = m.group(1)
        out.append(person)
    return People.from_record_persons(out)
