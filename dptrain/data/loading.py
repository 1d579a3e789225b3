"""Load user text records (one record = one privacy unit) from JSONL, JSON, CSV, plain text,
Parquet or a ``datasets`` dataset saved to disk.

Formats (``format=None`` infers it from the file suffix, or from a folder's contents):

- ``"jsonl"`` (``.jsonl``, ``.ndjson``, ``.json``): one JSON object per line; the text is in
  ``text_field`` and the record id in ``id_field`` (default ``"id"``). Blank lines are ignored.
  A file holding one JSON array of such objects is read as well.
- ``"csv"`` (``.csv``) / ``"tsv"`` (``.tsv``): a header row, then one record per row; the
  text is in column ``text_field``, the id in column ``id_field`` if that column exists.
- ``"txt"`` (``.txt``, ``.text``): ``text_records="line"``: one record per non-empty line
  (stripped of trailing whitespace); ``"paragraph"``: records separated by one or more blank
  lines, so a record may span lines (also ``format="paragraphs"``).  Without ``text_records``
  a file whose blank-line-separated blocks span several lines is refused: reading a multi-line
  note as several records would silently shrink the privacy unit to a part of it.
- ``"parquet"`` (``.parquet``, or a folder of ``.parquet`` files read in name order) and
  ``"arrow"`` (a folder written by ``datasets.Dataset.save_to_disk``, or an ``.arrow`` file):
  columns ``text_field`` and ``id_field`` as for CSV.  They need the ``datasets`` extra
  (``pyarrow``; ``datasets`` for Arrow); a missing one is an error naming it.

Records whose text is empty or whitespace only are dropped, with an :class:`InputWarning`
giving their number (a statistic of the data: it goes to the console, never to a run file).

Record ids.  A record's id is its ``id_field`` value where the file gives one (in the
canonical form of :func:`canonical_id`, the same in every format; a blank value gives no id,
as an empty CSV cell does); otherwise it is derived from its content: ``text-<first 16 hex digits of sha256(text)>``, and the k-th
further record with identical text gets the suffix ``~k``.  So inserting or deleting a line
never changes another record's id (line numbers would), and duplicates still get distinct ids
(hence independent Poisson coins, see :mod:`dptrain.sampling`).  Ids must be unique.

``"bundled:clinic_notes"`` names the synthetic corpus shipped with dptrain;
``"bundled:clinic_notes:train"`` and ``"bundled:clinic_notes:validation"`` name its fixed
public split: each record is in validation iff a PRF with the public key
:data:`BUNDLED_SPLIT_KEY` maps its id below :data:`BUNDLED_VALIDATION_FRACTION`.

All text files are read as UTF-8 (a leading byte-order mark is ignored). Problems raise
:class:`DataError` (a ``ValueError``) naming the file and line, or
:class:`DataFileNotFoundError` (also a ``FileNotFoundError``).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import numbers
import re
import warnings
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputWarning, UserError
from ..secret import RunKey, below, record_keys

__all__ = [
    "BUNDLED",
    "BUNDLED_SPLIT_KEY",
    "BUNDLED_VALIDATION_FRACTION",
    "FORMATS",
    "DataError",
    "TextDataset",
    "bundled_path",
    "canonical_id",
    "load_field",
    "load_texts",
    "split",
]

FORMATS = ("jsonl", "csv", "tsv", "txt", "paragraphs", "parquet", "arrow")
TEXT_RECORDS = ("line", "paragraph")
_SUFFIXES = {
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "jsonl",
    ".csv": "csv",
    ".tsv": "tsv",
    ".txt": "txt",
    ".text": "txt",
    ".parquet": "parquet",
    ".arrow": "arrow",
}
_BUNDLED_DIR = Path(__file__).resolve().parent / "bundled"
BUNDLED: dict[str, str] = {
    "clinic_notes": "clinic_notes.jsonl",
    "clinic_instructions": "clinic_instructions.jsonl",  # derived: dptrain.data.instructions
}
BUNDLED_VALIDATION_FRACTION = 0.1
BUNDLED_SPLIT_KEY = RunKey(hashlib.sha256(b"dptrain bundled split (public)").digest())
"""A public key: the bundled corpus's split is fixed and known (the corpus is synthetic)."""


class DataError(UserError, ValueError):
    """A data file that cannot be turned into a :class:`TextDataset`."""


class DataFileNotFoundError(DataError, FileNotFoundError):
    """A data path that does not exist."""


class NoFieldsError(DataError):
    """A field asked of a format that has none (plain text)."""


def missing_field(
    where: str,
    name: str,
    available: Iterable[Any] | None,
    *,
    key: str,
    holds: str,
    kind: str = "field",
    other_fix: str = "",
) -> DataError:
    """The one wording of a record (or file) without the field or column a recipe key names:
    ``{where}: no {kind} {name!r}; available {kind}s: ... Fix: set {key} in the recipe to the
    {kind} that holds {holds}``, then ``other_fix`` (", or ...") when there is another way out;
    ``available`` None: the names are not known here (no list)."""
    names = (
        ""
        if available is None
        else f"; available {kind}s: " + (", ".join(map(str, available)) or "(none)")
    )
    return DataError(
        f"{where}: no {kind} {name!r}{names}. Fix: set {key} in the recipe to the {kind} that "
        f"holds {holds}{other_fix}"
    )


_EXACT_INTEGERS = 2**53  # every integer up to this magnitude is exactly a float64
_ZERO_FRACTION = re.compile(r"[+-]?[0-9]+\.0+")  # "12.0": how a float column writes 12 as text


def canonical_id(value: Any, where: str, field: str) -> str | None:
    """The canonical text of an id (a record id, or a person id under ``data.privacy_unit``)
    read from any format, or None where the value names nothing.

    One value is one text whatever wrote it, so that a person written as ``1`` (a JSON or
    int64 Parquet number), ``1.0`` (a float column, e.g. int64 promoted after a null) or
    ``"1"`` (CSV text) is one person, not three:

    - absent, null, a float NaN (a missing cell of a numeric column), or a string that is
      empty or only whitespace: ``None`` (no id);
    - a string: stripped of surrounding whitespace; a decimal integer with a zero fraction
      (``"12.0"``, ``"12.00"``) is the integer's text (``"12"``);
    - an integer: its decimal text;
    - a float x with ``x == int(x)`` and ``|x| <= 2^53``: the integer's text (``1.0`` ->
      ``"1"``).

    Refused (:class:`DataError` naming ``where`` and the fix), since no text of them is
    exact: a fractional or infinite float, a float above ``2^53`` (a float64 column cannot
    hold such an integer id exactly: two ids may have become one), a boolean, and any other
    type (lists, objects, bytes, dates).  0-dimensional tensors and numpy scalars are read as
    their value."""
    if value is not None and getattr(value, "ndim", None) == 0 and hasattr(value, "item"):
        value = value.item()  # a numpy scalar or a 0-dim tensor
    if value is None:
        return None
    if isinstance(value, str):
        text = value.strip()
        if _ZERO_FRACTION.fullmatch(text):
            text = str(int(text.split(".")[0]))
        return text or None
    if isinstance(value, bool):
        raise DataError(
            f"{where}: {field!r} is the boolean {value}, which names no record or person. "
            f"Fix: give {field!r} as a string or a whole number"
        )
    if isinstance(value, numbers.Integral):
        return str(int(value))
    if isinstance(value, Decimal) and value.is_finite() and value == value.to_integral_value():
        return str(int(value))  # a decimal column's whole number
    if isinstance(value, (numbers.Real, Decimal)):
        x = float(value)
        if math.isnan(x):
            return None
        if math.isfinite(x) and x == int(x) and abs(x) <= _EXACT_INTEGERS:
            return str(int(x))
        why = (
            "is beyond 2^53, where a float64 column no longer holds every integer exactly (ids "
            "may have merged when the column was stored as floats)"
            if math.isfinite(x) and x == int(x)
            else "is not a whole number, and a fractional number has no one exact text"
        )
        raise DataError(
            f"{where}: {field!r} is the float {x!r}, which {why}. Fix: store the ids as strings "
            "(or as integers, e.g. a nullable Int64 column instead of float64)"
        )
    raise DataError(
        f"{where}: {field!r} is {type(value).__name__}, not an id. Fix: give {field!r} as a "
        "string or a whole number"
    )


@dataclass
class TextDataset:
    """Parallel lists of record texts and their (unique) ids."""

    texts: list[str]
    ids: list[str]

    def __post_init__(self) -> None:
        if len(self.texts) != len(self.ids):
            raise ValueError(f"{len(self.texts)} texts but {len(self.ids)} ids")

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, indices: list[int]) -> TextDataset:
        """The records at ``indices``, in that order."""
        return TextDataset([self.texts[i] for i in indices], [self.ids[i] for i in indices])


def bundled_path(name: str) -> Path:
    """Path of a bundled corpus file, e.g. ``bundled_path("clinic_notes")``."""
    if name not in BUNDLED:
        raise DataError(
            f"unknown bundled dataset {name!r}; available: {', '.join(sorted(BUNDLED))}"
        )
    return _BUNDLED_DIR / BUNDLED[name]


def load_texts(
    path: str | Path,
    *,
    text_field: str = "text",
    format: str | None = None,
    id_field: str | None = "id",
    text_records: str | None = None,
) -> TextDataset:
    """Load records from ``path`` (a file, a dataset folder, or ``"bundled:NAME[:train|:validation]"``).

    ``text_field`` is the JSONL field or CSV/table column holding the text; ``id_field`` the
    one holding the record id (``None``: always derive ids from content). Ids must be unique.
    ``text_records`` (``"line"`` or ``"paragraph"``) says what one record of a plain-text file
    is (see the module docstring).
    """
    return _load(path, text_field, format, id_field, text_records, None)


def load_field(
    path: str | Path,
    name: str,
    *,
    text_field: str = "text",
    format: str | None = None,
    id_field: str | None = "id",
) -> tuple[TextDataset, list[tuple[str, Any]]]:
    """The records of :func:`load_texts` (same arguments, same ids) and, for each, ``(where,
    value)``: its place in the file (``path:line``, ``array element i``, ``row i``) and the
    value of its field or column ``name`` as the file holds it (``None`` where absent or null;
    :func:`canonical_id` gives an id's canonical text).

    Every format with fields is read: JSONL, a JSON array, CSV, TSV, Parquet and ``datasets``
    saves.  Plain text has no fields: :class:`NoFieldsError`.  Dropped empty records are not
    warned about again (:func:`load_texts` of the same path does)."""
    extra = _Field(name)
    return _load(path, text_field, format, id_field, None, extra), list(
        zip(extra.where, extra.values, strict=True)
    )


@dataclass
class _Field:
    """One more field read beside the text (:func:`load_field`): per record, where it is and
    the field's value."""

    name: str
    where: list[str] = field(default_factory=list)
    values: list[Any] = field(default_factory=list)

    def add(self, where: str, value: Any) -> None:
        self.where.append(where)
        self.values.append(value)

    def keep(self, indices: list[int]) -> None:
        self.where = [self.where[i] for i in indices]
        self.values = [self.values[i] for i in indices]


def _load(
    path: str | Path,
    text_field: str,
    format: str | None,
    id_field: str | None,
    text_records: str | None,
    extra: _Field | None,
) -> TextDataset:
    """:func:`load_texts`, filling ``extra`` (if given) in step with the records kept."""
    if isinstance(path, str) and path.startswith("bundled:"):
        return _load_bundled(path, extra)
    if text_records is not None and text_records not in TEXT_RECORDS:
        raise DataError(f"text_records must be one of {TEXT_RECORDS}, got {text_records!r}")
    p = Path(path).expanduser()
    if not p.exists():
        raise DataFileNotFoundError(f"data file not found: {p}")
    fmt = _infer_dir_format(p, format) if p.is_dir() else _infer_format(p, format)
    if extra is not None and fmt in ("txt", "paragraphs"):
        raise NoFieldsError(
            f"{p} is a plain-text file ({fmt}), which has no fields to give each record's "
            f"{extra.name!r}. Fix: give the data as JSONL, JSON, CSV, TSV, Parquet or a saved "
            f"dataset with a {extra.name!r} field on every record"
        )
    if fmt in ("parquet", "arrow"):
        texts, ids = _load_table(p, fmt, text_field, id_field, extra)
    else:
        text = _read_utf8(p)
        if fmt == "jsonl":
            texts, ids = _parse_json(text, p, text_field, id_field, extra)
        elif fmt in ("csv", "tsv"):
            delimiter = "\t" if fmt == "tsv" else ","
            texts, ids = _parse_csv(text, p, text_field, id_field, delimiter, extra)
        elif fmt == "paragraphs" or (fmt == "txt" and text_records == "paragraph"):
            texts, ids = _parse_paragraphs(text)
        else:
            _check_lines_are_records(text, p, text_records)
            texts, ids = _parse_lines(text)
    texts, ids = _drop_empty(texts, ids, p, extra)
    if not texts:
        raise DataError(f"{p}: no records found (format {fmt!r})")
    if extra is None:  # load_field re-reads the records of a load_texts that warned
        _warn_duplicates(texts, p)
    ids = content_ids(texts, ids)
    _check_unique(ids, p)
    return TextDataset(texts, ids)


def split(
    ds: TextDataset, fraction: float, key: RunKey, purpose: str = "validation"
) -> tuple[TextDataset, TextDataset]:
    """``(rest, chosen)``: record ``r`` is chosen iff ``PRF_k(id64(r)) < floor(fraction 2^64)``
    (``k``: the ``split/<purpose>`` sub-key of ``key``).

    Each record is decided alone, from its id: adding a record to ``ds`` changes the parts by
    at most that record, whatever the file order.  Both parts keep the original order; either
    may be empty.
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"{purpose} fraction must be in [0, 1), got {fraction}")
    if not len(ds):
        return ds, TextDataset([], [])
    words = key.prf(f"split/{purpose}").at(0, record_keys(ds.ids))[:, 0]
    chosen = below(words, fraction)
    return (
        ds.subset([i for i in range(len(ds)) if not chosen[i]]),
        ds.subset([i for i in range(len(ds)) if chosen[i]]),
    )


def cap(ds: TextDataset, count: int, key: RunKey, purpose: str) -> tuple[TextDataset, TextDataset]:
    """``(kept, cut)``: the ``count`` records with the lowest keyed hashes of their ids, in the
    original order.  Not a per-record decision: adding a record can push another one out."""
    if len(ds) <= count:
        return ds, TextDataset([], [])
    words = key.prf(f"cap/{purpose}").at(0, record_keys(ds.ids))[:, 0]
    keep = set(np.argsort(words, kind="stable")[:count].tolist())
    return (
        ds.subset([i for i in range(len(ds)) if i in keep]),
        ds.subset([i for i in range(len(ds)) if i not in keep]),
    )


# -- helpers -----------------------------------------------------------------------------


def _load_bundled(spec: str, extra: _Field | None = None) -> TextDataset:
    parts = spec.split(":")
    if len(parts) not in (2, 3) or (len(parts) == 3 and parts[2] not in ("train", "validation")):
        raise DataError(
            f"bad bundled dataset spec {spec!r}; use 'bundled:NAME', 'bundled:NAME:train' or "
            f"'bundled:NAME:validation' with NAME in: {', '.join(sorted(BUNDLED))}"
        )
    ds = _load(bundled_path(parts[1]), "text", None, "id", None, extra)
    if len(parts) == 2:
        return ds
    train, val = split(ds, BUNDLED_VALIDATION_FRACTION, BUNDLED_SPLIT_KEY)
    part = train if parts[2] == "train" else val
    if extra is not None:
        wanted = set(part.ids)
        extra.keep([i for i, rid in enumerate(ds.ids) if rid in wanted])
    return part


def _infer_format(p: Path, format: str | None) -> str:
    if format is not None:
        if format not in FORMATS:
            raise DataError(f"unknown format {format!r}; choose one of: {', '.join(FORMATS)}")
        return format
    fmt = _SUFFIXES.get(p.suffix.lower())
    if fmt is None:
        raise DataError(
            f"cannot infer the format of {p} from its suffix {p.suffix!r}; pass format= one of: "
            f"{', '.join(FORMATS)}"
        )
    return fmt


def _infer_dir_format(p: Path, format: str | None) -> str:
    """A folder is a ``datasets`` save (``state.json`` / ``dataset_dict.json``) or a folder of
    Parquet files."""
    if format not in (None, "arrow", "parquet"):
        raise DataError(
            f"{p} is a directory; format {format!r} reads a file. Fix: point data.path at the "
            "file, or at a folder written by datasets' save_to_disk or holding .parquet files"
        )
    saved = any((p / f).exists() for f in ("state.json", "dataset_dict.json", "dataset_info.json"))
    if saved and format in (None, "arrow"):
        return "arrow"
    if any(p.glob("*.parquet")) and format in (None, "parquet"):
        return "parquet"
    raise DataError(
        f"{p} is a directory, neither a dataset saved by datasets' save_to_disk (no "
        "state.json) nor a folder of .parquet files. Fix: point data.path at a .jsonl, .json, "
        ".csv, .tsv, .txt or .parquet file, or at such a folder"
    )


def _load_table(
    p: Path, fmt: str, text_field: str, id_field: str | None, extra: _Field | None = None
) -> tuple[list[str], list[str | None]]:
    from ..extras import require

    wanted = (text_field, id_field, extra.name if extra is not None else None)
    where: list[str] = []
    if fmt == "parquet":
        pq = require("pyarrow.parquet", "datasets", "reading Parquet data files")
        files = sorted(p.glob("*.parquet")) if p.is_dir() else [p]
        try:
            tables = [pq.read_table(f) for f in files]
        except Exception as err:  # pyarrow's errors have no common public base
            raise DataError(f"{p}: not a readable Parquet file ({err})") from None
        names = tables[0].column_names
        data = {
            n: [
                v
                for t in tables
                for v in (t.column(n).to_pylist() if n in t.column_names else [None] * t.num_rows)
            ]
            for n in names
            if n in wanted
        }
        where = [
            f"{f}: row {j + 1}"
            for f, t in zip(files, tables, strict=True)
            for j in range(t.num_rows)
        ]
    else:
        datasets = require("datasets", "datasets", "reading a dataset saved with save_to_disk")
        try:
            ds = (
                datasets.Dataset.from_file(str(p))
                if p.is_file()
                else datasets.load_from_disk(str(p))
            )
        except Exception as err:  # datasets raises FileNotFoundError, ValueError, pyarrow errors
            raise DataError(f"{p}: cannot be read as a saved dataset ({err})") from None
        if isinstance(ds, datasets.DatasetDict):
            splits = ", ".join(sorted(ds))
            raise DataError(
                f"{p} holds a DatasetDict with splits {splits}; one data path is one split. Fix: "
                f"point data.path at one of them, e.g. {p / sorted(ds)[0]}"
            )
        names = ds.column_names
        data = {n: ds[n] for n in names if n in wanted}
        where = [f"{p}: row {j + 1}" for j in range(ds.num_rows)]
    if text_field not in names:
        raise missing_field(
            str(p),
            text_field,
            names,
            key="data.text_field",
            holds="each record's text",
            kind="column",
        )
    texts: list[str] = []
    for i, value in enumerate(data[text_field]):
        if not isinstance(value, str):
            raise DataError(
                f"{p}: row {i + 1}: column {text_field!r} is {type(value).__name__}, expected a "
                "string"
            )
        texts.append(value)
    raw_ids = data.get(id_field) if id_field is not None else None
    ids = (
        [canonical_id(v, w, id_field) for w, v in zip(where, raw_ids, strict=True)]  # type: ignore[arg-type]
        if raw_ids
        else [None] * len(texts)
    )
    if extra is not None:
        values = data.get(extra.name) or [None] * len(texts)
        for w, v in zip(where, values, strict=True):
            extra.add(w, v)
    return texts, ids


def _read_utf8(p: Path) -> str:
    raw = p.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DataError(
            f"{p}:{line}: not valid UTF-8 (byte {raw[e.start]:#04x} at offset {e.start}); "
            "convert the file to UTF-8"
        ) from None
    return text.removeprefix("\ufeff")


def _lines(text: str) -> list[str]:
    # Only "\n" (and "\r\n") end a line: str.splitlines() would also split on U+2028 etc.,
    # which may legally appear inside JSON strings and ordinary text.
    return [line.removesuffix("\r") for line in text.split("\n")]


def _parse_json(
    text: str, p: Path, text_field: str, id_field: str | None, extra: _Field | None = None
) -> tuple[list[str], list[str | None]]:
    """JSONL, or one JSON array of objects (what ``json.dump(records, f)`` writes)."""
    if text.lstrip().startswith("["):
        try:
            array = json.loads(text)
        except json.JSONDecodeError as e:
            if p.suffix.lower() == ".json":
                raise DataError(
                    f"{p}:{e.lineno}: invalid JSON array ({e.msg} at column {e.colno}); expected "
                    "a JSON array of objects or JSONL (one JSON object per line)"
                ) from None
        else:
            if isinstance(array, list):
                texts: list[str] = []
                ids: list[str | None] = []
                for i, obj in enumerate(array):
                    where = f"{p}: array element {i + 1}"
                    _add_record(obj, where, text_field, id_field, texts, ids, extra)
                return texts, ids
    return _parse_jsonl(text, p, text_field, id_field, extra)


def jsonl_objects(text: str, p: Path) -> list[tuple[int, Any]]:
    """``(line number, parsed value)`` for every non-blank line of the JSONL ``text`` of ``p``."""
    out = []
    for lineno, line in enumerate(_lines(text), start=1):
        if not line.strip():
            continue
        try:
            out.append((lineno, json.loads(line)))
        except json.JSONDecodeError as e:
            raise DataError(
                f"{p}:{lineno}: invalid JSON ({e.msg} at column {e.colno}); JSONL expected: one "
                "JSON object per line (or one JSON array of objects)"
            ) from None
    return out


def _parse_jsonl(
    text: str, p: Path, text_field: str, id_field: str | None, extra: _Field | None = None
) -> tuple[list[str], list[str | None]]:
    texts: list[str] = []
    ids: list[str | None] = []
    for lineno, obj in jsonl_objects(text, p):
        _add_record(obj, f"{p}:{lineno}", text_field, id_field, texts, ids, extra)
    return texts, ids


def _add_record(
    obj: Any,
    where: str,
    text_field: str,
    id_field: str | None,
    texts: list[str],
    ids: list[str | None],
    extra: _Field | None = None,
) -> None:
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object per record, got {type(obj).__name__}")
    if text_field not in obj:
        raise missing_field(
            where, text_field, obj, key="data.text_field", holds="each record's text"
        )
    value = obj[text_field]
    if not isinstance(value, str):
        raise DataError(
            f"{where}: field {text_field!r} is {type(value).__name__}, expected a string"
        )
    texts.append(value)
    ids.append(canonical_id(obj.get(id_field), where, id_field) if id_field is not None else None)
    if extra is not None:
        extra.add(where, obj.get(extra.name))


def _parse_csv(
    text: str,
    p: Path,
    text_field: str,
    id_field: str | None,
    delimiter: str,
    extra: _Field | None = None,
) -> tuple[list[str], list[str | None]]:
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    try:
        header = next(reader)
    except StopIteration:
        raise DataError(f"{p}: empty file (expected a header row)") from None
    except csv.Error as e:
        raise DataError(f"{p}:1: malformed header row ({e})") from None
    if text_field not in header:
        raise missing_field(
            str(p),
            text_field,
            header,
            key="data.text_field",
            holds="each record's text",
            kind="column",
        )
    ti = header.index(text_field)
    ii = header.index(id_field) if id_field is not None and id_field in header else None
    ei = header.index(extra.name) if extra is not None and extra.name in header else None
    texts: list[str] = []
    ids: list[str | None] = []
    while True:
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as e:
            raise DataError(f"{p}:{reader.line_num}: malformed CSV ({e})") from None
        if not row or all(not c.strip() for c in row):
            continue
        if len(row) != len(header):
            raise DataError(f"{p}:{reader.line_num}: {len(row)} columns, header has {len(header)}")
        where = f"{p}:{reader.line_num}"
        texts.append(row[ti])
        ids.append(canonical_id(row[ii], where, header[ii]) if ii is not None else None)
        if extra is not None:
            extra.add(where, row[ei] if ei is not None else None)
    return texts, ids


def _check_lines_are_records(text: str, p: Path, text_records: str | None) -> None:
    """A .txt file of blank-line-separated blocks of several lines reads as paragraphs, not
    lines: refuse to guess (or warn, when ``text_records="line"`` was chosen)."""
    paragraphs, _ = _parse_paragraphs(text)
    lines, _ = _parse_lines(text)
    if not (1 < len(paragraphs) < len(lines)):
        return
    if text_records is None:
        raise DataError(
            f"{p}: this text file has paragraphs of several lines separated by blank lines. One "
            "record is one privacy unit: read line by line, each note would be split into "
            "records protected one line at a time. Fix: set data.text_records: paragraph "
            "(one record per paragraph) or data.text_records: line (one record per line)"
        )
    warnings.warn(
        InputWarning(
            f"{p}: data.text_records is 'line' but the file has multi-line paragraphs separated "
            "by blank lines; each line is a record (a privacy unit) of its own, so a paragraph "
            "is protected only as a group of its lines (use data.text_records: paragraph if a "
            "paragraph is one person's note)"
        ),
        stacklevel=3,
    )


def _drop_empty(
    texts: list[str], ids: list[str | None], p: Path, extra: _Field | None = None
) -> tuple[list[str], list[str | None]]:
    """Records whose text is empty or whitespace only carry nothing to train on: dropped,
    with a console warning of how many (a statistic of the data, kept out of run files)."""
    keep = [i for i, t in enumerate(texts) if t.strip()]
    dropped = len(texts) - len(keep)
    if not dropped:
        return texts, ids
    if extra is None:
        warnings.warn(
            InputWarning(
                f"{p}: dropped {dropped} empty or whitespace-only record(s) (this count is a "
                "statistic of your data: it is shown here, not written to the run directory)"
            ),
            stacklevel=4,  # the caller of load_texts
        )
    else:  # load_field re-reads the records of a load_texts that warned
        extra.keep(keep)
    return [texts[i] for i in keep], [ids[i] for i in keep]


def _warn_duplicates(texts: list[str], p: Path) -> None:
    """Records with identical text stay separate privacy units (distinct ids and coins), so a
    text present k times is protected only by group privacy over k records: warn, with the
    counts on the console only (statistics of the data)."""
    copies = Counter(texts)
    repeated = len(texts) - len(copies)
    if not repeated:
        return
    largest = max(copies.values())
    warnings.warn(
        InputWarning(
            f"{p}: {repeated} record(s) repeat the text of an earlier one (up to {largest} "
            f"copies of one text); each copy is its own privacy unit, so a text present k times "
            "is protected only as a group of k records (epsilon grows about k-fold). Fix: "
            "deduplicate the file if the copies hold the same person's data (these counts are "
            "shown here, not written to the run directory)"
        ),
        stacklevel=4,  # the caller of load_texts
    )


def _parse_lines(text: str) -> tuple[list[str], list[str | None]]:
    texts: list[str] = []
    ids: list[str | None] = []
    for line in _lines(text):
        line = line.rstrip()
        if line.strip():
            texts.append(line)
            ids.append(None)
    return texts, ids


def _parse_paragraphs(text: str) -> tuple[list[str], list[str | None]]:
    texts: list[str] = []
    ids: list[str | None] = []
    current: list[str] = []
    for line in [*_lines(text), ""]:
        if line.strip():
            current.append(line.rstrip())
        elif current:
            texts.append("\n".join(current))
            ids.append(None)
            current = []
    return texts, ids


def content_ids(texts: list[str], ids: list[str | None]) -> list[str]:
    """``ids`` with every missing one derived from the record's content (see the module
    docstring): ``text-<sha256 prefix>``, then ``~1``, ``~2``, ... for further duplicates."""
    seen: Counter[str] = Counter()
    out = []
    for text, rid in zip(texts, ids, strict=True):
        if rid is None:
            base = "text-" + hashlib.sha256(text.encode()).hexdigest()[:16]
            k = seen[base]
            seen[base] += 1
            rid = base if k == 0 else f"{base}~{k}"
        out.append(rid)
    return out


def _check_unique(ids: list[str], p: Path) -> None:
    seen: dict[str, int] = {}
    for i, rid in enumerate(ids):
        if rid in seen:
            raise DataError(
                f"{p}: duplicate record id {rid!r} (records {seen[rid] + 1} and {i + 1}); ids "
                "identify privacy units and must be unique. Fix: give each record its own id, "
                "or remove the id field from every record: ids are then derived from the "
                "content (in load_texts: id_field=None)"
            )
        seen[rid] = i
