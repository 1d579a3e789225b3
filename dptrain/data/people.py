"""People: which person each record belongs to (``data.privacy_unit.field``), read from the file.

A record's person is the value of its ``field`` (JSONL field or CSV column), as a string.  A
record without one is an error naming the line: under a person-level guarantee every record
must be attributed, or a person's unattributed records would escape their bound.  Audit
canaries (:mod:`dptrain.data.canaries`) are people of their own: canary ``i``'s repetitions
are the records of person ``canary-<i>``.
"""

from __future__ import annotations

import csv
import io
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .loading import (
    BUNDLED,
    DataError,
    TextDataset,
    _infer_format,
    _read_utf8,
    bundled_path,
    content_ids,
    jsonl_objects,
)

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
) -> dict[str, str]:
    """``{record id: person id}`` for every record of ``path`` (a file or ``bundled:NAME``,
    with or without a ``:train`` / ``:validation`` suffix), record ids as
    :func:`~dptrain.data.loading.load_texts` gives them."""
    if path.startswith("bundled:"):
        name = path.split(":")[1]
        if name not in BUNDLED:
            raise DataError(f"unknown bundled dataset {name!r}")
        p, fmt = bundled_path(name), "jsonl"
    else:
        p = Path(path).expanduser()
        fmt = _infer_format(p, format)
    if fmt not in ("jsonl", "csv", "tsv"):
        raise DataError(
            f"data.privacy_unit.field: {p} is a {fmt} file, which has no fields. Fix: give the "
            f"data as JSONL or CSV with a {field!r} field on every record"
        )
    text = _read_utf8(p)
    rows = _jsonl_rows(text, p) if fmt == "jsonl" else _csv_rows(text, p, fmt)
    texts, ids, persons = [], [], []
    for lineno, row in rows:
        if text_field not in row:
            continue  # load_texts reports it
        value = row.get(field)
        if value is None or value == "":
            raise DataError(
                f"{p}:{lineno}: the record has no {field!r} (data.privacy_unit.field): every "
                "record must name its person, or that person's other records would not be "
                "bounded together. Fix: add the field to every record, or drop the record"
            )
        texts.append(row[text_field])
        raw = row.get("id")
        ids.append(None if raw is None or raw == "" else str(raw))
        persons.append(str(value))
    return dict(zip(content_ids(texts, ids), persons, strict=True))


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


def _jsonl_rows(text: str, p: Path) -> list[tuple[int, dict]]:
    return [(lineno, obj) for lineno, obj in jsonl_objects(text, p) if isinstance(obj, dict)]


def _csv_rows(text: str, p: Path, fmt: str) -> list[tuple[int, dict]]:
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter="\t" if fmt == "tsv" else ",")
    rows = []
    for row in reader:
        if not any((v or "").strip() for v in row.values()):
            continue
        rows.append((reader.line_num, row))
    return rows
