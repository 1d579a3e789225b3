"""People: which person each record belongs to (``data.privacy_unit.field``), read from the file.

A record's person is the value of its ``field`` (a JSON field, or a CSV / Parquet / dataset
column), as a string.  A
record without one is an error naming the line: under a person-level guarantee every record
must be attributed, or a person's unattributed records would escape their bound.  Audit
canaries (:mod:`dptrain.data.canaries`) are people of their own: canary ``i``'s repetitions
are the records of person ``canary-<i>``.  A missing, null, NaN, empty or whitespace-only
value is refused alike in every format (:func:`person_ids`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from .loading import DataError, NoFieldsError, TextDataset, load_field

if TYPE_CHECKING:
    from ..tasks.schema import TaskSection

__all__ = ["People", "person_ids", "read_people", "unit_name"]

_CANARY = re.compile(r"^(canary-\d+)-\d+$")


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
) -> dict[str, str]:
    """``{record id: person id}`` for every record of ``path`` (a file, a dataset folder or
    ``bundled:NAME[:train|:validation]``), read by :func:`~dptrain.data.loading.load_field`:
    the records and ids of :func:`~dptrain.data.loading.load_texts`, in any format with fields
    (JSONL, a JSON array, CSV, TSV, Parquet, a ``datasets`` save); for a structured ``task``
    (instruction, chat, classification), the records and ids of
    :func:`~dptrain.tasks.records.load_records`, by its ``load_record_field``."""
    try:
        if task is not None and task.kind != "text":
            from ..tasks.records import load_record_field

            ds, values = load_record_field(path, task, field, text_field=text_field, format=format)
        else:
            ds, values = load_field(path, field, text_field=text_field, format=format)
    except NoFieldsError as e:
        raise NoFieldsError(f"data.privacy_unit.field: {e}") from None
    persons = []
    for where, value in values:
        person = _person(value)
        if person is None:
            raise DataError(
                f"{where}: the record has no {field!r} (data.privacy_unit.field; missing, null "
                "or empty): every record must name its person, or that person's other records "
                "would not be bounded together. Fix: give every record a non-empty "
                f"{field!r}, or drop the record"
            )
        persons.append(person)
    return dict(zip(ds.ids, persons, strict=True))


def _person(value: object) -> str | None:
    """A field value as a person id, or None where it names nobody: absent, null, a float NaN
    (a missing cell of a numeric column written by pandas) or a string that is empty or only
    whitespace.  The same rule for every format, so one record cannot be one person in a
    Parquet file and refused in a CSV file."""
    if value is None or (isinstance(value, float) and value != value):
        return None
    person = str(value)
    return person if person.strip() else None


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
