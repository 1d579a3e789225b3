"""Load user text records (one record = one privacy unit) from JSONL, CSV or plain text.

Formats (``format=None`` infers it from the file suffix):

- ``"jsonl"`` (``.jsonl``, ``.ndjson``, ``.json``): one JSON object per line; the text is in
  ``text_field`` and the record id in ``id_field`` (default ``"id"``). Blank lines are ignored.
- ``"csv"`` (``.csv``) / ``"tsv"`` (``.tsv``): a header row, then one record per row; the
  text is in column ``text_field``, the id in column ``id_field`` if that column exists.
- ``"txt"`` (``.txt``, ``.text``): one record per non-empty line (lines are stripped of
  trailing whitespace; blank lines are skipped).
- ``"paragraphs"``: records separated by one or more blank lines, so a record may span lines.

Record ids.  A record's id is its ``id_field`` value where the file gives one; otherwise it
is derived from its content: ``text-<first 16 hex digits of sha256(text)>``, and the k-th
further record with identical text gets the suffix ``~k``.  So inserting or deleting a line
never changes another record's id (line numbers would), and duplicates still get distinct ids
(hence independent Poisson coins, see :mod:`dptrain.sampling`).  Ids must be unique.

``"bundled:clinic_notes"`` names the synthetic corpus shipped with dptrain;
``"bundled:clinic_notes:train"`` and ``"bundled:clinic_notes:validation"`` name its fixed
public split: each record is in validation iff a PRF with the public key
:data:`BUNDLED_SPLIT_KEY` maps its id below :data:`BUNDLED_VALIDATION_FRACTION`.

All files are read as UTF-8 (a leading byte-order mark is ignored). Problems raise
:class:`DataError` (a ``ValueError``) naming the file and line, or
:class:`DataFileNotFoundError` (also a ``FileNotFoundError``).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import UserError
from ..secret import RunKey, below, record_keys

__all__ = [
    "BUNDLED",
    "BUNDLED_SPLIT_KEY",
    "BUNDLED_VALIDATION_FRACTION",
    "FORMATS",
    "DataError",
    "TextDataset",
    "bundled_path",
    "load_texts",
    "split",
]

FORMATS = ("jsonl", "csv", "tsv", "txt", "paragraphs")
_SUFFIXES = {
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "jsonl",
    ".csv": "csv",
    ".tsv": "tsv",
    ".txt": "txt",
    ".text": "txt",
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
) -> TextDataset:
    """Load records from ``path`` (a file or ``"bundled:NAME[:train|:validation]"``).

    ``text_field`` is the JSONL field or CSV column holding the text; ``id_field`` the one
    holding the record id (``None``: always derive ids from content). Ids must be unique.
    """
    if isinstance(path, str) and path.startswith("bundled:"):
        return _load_bundled(path)
    p = Path(path).expanduser()
    if not p.exists():
        raise DataFileNotFoundError(f"data file not found: {p}")
    if p.is_dir():
        raise DataError(f"{p} is a directory; expected a .jsonl, .csv, .tsv or .txt file")
    fmt = _infer_format(p, format)
    text = _read_utf8(p)
    if fmt == "jsonl":
        texts, ids = _parse_jsonl(text, p, text_field, id_field)
    elif fmt in ("csv", "tsv"):
        texts, ids = _parse_csv(text, p, text_field, id_field, "\t" if fmt == "tsv" else ",")
    elif fmt == "txt":
        texts, ids = _parse_lines(text)
    else:
        texts, ids = _parse_paragraphs(text)
    if not texts:
        raise DataError(f"{p}: no records found (format {fmt!r})")
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


def _load_bundled(spec: str) -> TextDataset:
    parts = spec.split(":")
    if len(parts) not in (2, 3) or (len(parts) == 3 and parts[2] not in ("train", "validation")):
        raise DataError(
            f"bad bundled dataset spec {spec!r}; use 'bundled:NAME', 'bundled:NAME:train' or "
            f"'bundled:NAME:validation' with NAME in: {', '.join(sorted(BUNDLED))}"
        )
    ds = load_texts(bundled_path(parts[1]))
    if len(parts) == 2:
        return ds
    train, val = split(ds, BUNDLED_VALIDATION_FRACTION, BUNDLED_SPLIT_KEY)
    return train if parts[2] == "train" else val


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


def _parse_jsonl(
    text: str, p: Path, text_field: str, id_field: str | None
) -> tuple[list[str], list[str | None]]:
    texts: list[str] = []
    ids: list[str | None] = []
    for lineno, line in enumerate(_lines(text), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{p}:{lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(obj, dict):
            raise DataError(
                f"{p}:{lineno}: expected a JSON object per line, got {type(obj).__name__}"
            )
        if text_field not in obj:
            raise DataError(
                f"{p}:{lineno}: no field {text_field!r}; available fields: "
                f"{', '.join(map(str, obj)) or '(none)'} (choose one with text_field=)"
            )
        value = obj[text_field]
        if not isinstance(value, str):
            raise DataError(
                f"{p}:{lineno}: field {text_field!r} is {type(value).__name__}, expected a string"
            )
        texts.append(value)
        rid = obj.get(id_field) if id_field is not None else None
        ids.append(str(rid) if rid is not None else None)
    return texts, ids


def _parse_csv(
    text: str, p: Path, text_field: str, id_field: str | None, delimiter: str
) -> tuple[list[str], list[str | None]]:
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    try:
        header = next(reader)
    except StopIteration:
        raise DataError(f"{p}: empty file (expected a header row)") from None
    except csv.Error as e:
        raise DataError(f"{p}:1: malformed header row ({e})") from None
    if text_field not in header:
        raise DataError(
            f"{p}: no column {text_field!r}; available columns: {', '.join(header)} "
            "(choose one with text_field=)"
        )
    ti = header.index(text_field)
    ii = header.index(id_field) if id_field is not None and id_field in header else None
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
        texts.append(row[ti])
        ids.append(row[ii] if ii is not None and row[ii] != "" else None)
    return texts, ids


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
                "identify privacy units and must be unique (pass id_field=None to derive ids from content)"
            )
        seen[rid] = i
