"""Structured records (instruction, chat, classification) as one canonical text each.

The splits, caps, ids and Poisson coins of :mod:`dptrain.data` work on a
:class:`~dptrain.data.TextDataset`; a structured record enters that pipeline as one string,
``json.dumps`` of its task fields with sorted keys (:func:`encode_record`), so every keyed
per-record decision sees the whole record -- a whole conversation is one privacy unit -- and
:func:`decode_record` recovers the fields.  Canonical keys are ``prompt``, ``response``,
``system`` (instruction), ``messages`` (chat), ``text``, ``label`` (classification), whatever
the file's field names.  Records whose id starts with ``canary-`` (reserved for the audit's
canaries, see :mod:`dptrain.data.canaries`) are plain text and are trained on every token.

Files: JSONL (every kind), CSV / TSV (instruction, classification), and ``bundled:NAME``
with the fixed public split of :mod:`dptrain.data.loading`.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

from ..data.loading import (
    BUNDLED_SPLIT_KEY,
    BUNDLED_VALIDATION_FRACTION,
    DataError,
    DataFileNotFoundError,
    TextDataset,
    _check_unique,
    _Field,
    _read_utf8,
    bundled_path,
    canonical_id,
    content_ids,
    jsonl_objects,
    missing_field,
    split,
)
from .schema import TaskSection

CANARY_PREFIX = "canary-"
ROLES = ("system", "user", "assistant")


def encode_record(fields: dict[str, Any]) -> str:
    """The canonical text of a record's task fields."""
    return json.dumps(fields, sort_keys=True, ensure_ascii=False)


def decode_record(text: str, rid: str) -> dict[str, Any] | None:
    """The fields of a canonical text, or None for a plain-text (canary) record."""
    if rid.startswith(CANARY_PREFIX):
        return None
    return json.loads(text)


def load_records(
    path: str, task: TaskSection, *, text_field: str = "text", format: str | None = None
) -> TextDataset:
    """Read ``path`` as records of ``task.kind``; each becomes one canonical text."""
    return _load(path, task, text_field, format, None)


def load_record_field(
    path: str, task: TaskSection, name: str, *, text_field: str = "text", format: str | None = None
) -> tuple[TextDataset, list[tuple[str, Any]]]:
    """The records of :func:`load_records` (same ids) and, for each, ``(where, value)``: its
    line (``path:line``) and the value of its field ``name`` (``None`` where absent), as
    :func:`~dptrain.data.loading.load_field` gives them for plain records (a person id under
    ``data.privacy_unit``, never part of the record's canonical text).  Record ids take the
    canonical form of :func:`~dptrain.data.loading.canonical_id`, as plain records' do."""
    extra = _Field(name)
    ds = _load(path, task, text_field, format, extra)
    return ds, list(zip(extra.where, extra.values, strict=True))


def _load(
    path: str, task: TaskSection, text_field: str, format: str | None, extra: _Field | None
) -> TextDataset:
    if path.startswith("bundled:"):
        return _bundled(path, task, text_field, extra)
    p = Path(path).expanduser()
    if not p.exists():
        raise DataFileNotFoundError(f"data file not found: {p}")
    fmt = format or {".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".tsv": "tsv"}.get(
        p.suffix.lower()
    )
    if fmt == "jsonl":
        rows = _jsonl_rows(_read_utf8(p), p)
    elif fmt in ("csv", "tsv") and task.kind != "chat":
        rows = _csv_rows(_read_utf8(p), p, "\t" if fmt == "tsv" else ",")
    else:
        allowed = ".jsonl" if task.kind == "chat" else ".jsonl, .csv or .tsv"
        raise DataError(
            f"{p}: task {task.kind} reads {allowed} records (got format {fmt or p.suffix!r}); "
            "plain-text files hold no fields"
        )
    return _dataset(rows, p, task, text_field, extra)


def _bundled(spec: str, task: TaskSection, text_field: str, extra: _Field | None) -> TextDataset:
    parts = spec.split(":")
    if len(parts) not in (2, 3) or (len(parts) == 3 and parts[2] not in ("train", "validation")):
        raise DataError(
            f"bad bundled dataset spec {spec!r}; use 'bundled:NAME', 'bundled:NAME:train' or "
            "'bundled:NAME:validation'"
        )
    p = bundled_path(parts[1])
    ds = _dataset(_jsonl_rows(_read_utf8(p), p), p, task, text_field, extra)
    if len(parts) == 2:
        return ds
    train, val = split(ds, BUNDLED_VALIDATION_FRACTION, BUNDLED_SPLIT_KEY)
    part = train if parts[2] == "train" else val
    if extra is not None:
        wanted = set(part.ids)
        extra.keep([i for i, rid in enumerate(ds.ids) if rid in wanted])
    return part


def _jsonl_rows(text: str, p: Path) -> list[tuple[int, dict[str, Any]]]:
    rows = jsonl_objects(text, p)
    for lineno, obj in rows:
        if not isinstance(obj, dict):
            raise DataError(
                f"{p}:{lineno}: expected a JSON object per line, got {type(obj).__name__}"
            )
    return rows


def _csv_rows(text: str, p: Path, delimiter: str) -> list[tuple[int, dict[str, Any]]]:
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter)
    try:
        return [
            (reader.line_num, dict(row))
            for row in reader
            if any((v or "").strip() for v in row.values())
        ]
    except csv.Error as e:
        raise DataError(f"{p}:{reader.line_num}: malformed CSV ({e})") from None


def _dataset(
    rows: list[tuple[int, dict[str, Any]]],
    p: Path,
    task: TaskSection,
    text_field: str,
    extra: _Field | None = None,
) -> TextDataset:
    if not rows:
        raise DataError(f"{p}: no records found")
    texts, ids = [], []
    for lineno, obj in rows:
        fields = _fields(obj, task, text_field, f"{p}:{lineno}")
        texts.append(encode_record(fields))
        if extra is not None:
            extra.add(f"{p}:{lineno}", obj.get(extra.name))
        rid = canonical_id(obj.get("id"), f"{p}:{lineno}", "id")
        if rid is not None and rid.startswith(CANARY_PREFIX):
            raise DataError(
                f"{p}:{lineno}: record id {rid!r} starts with {CANARY_PREFIX!r}, which is "
                "reserved for the audit's canaries (such a record is read as a plain-text "
                f"canary, not as its {task.kind} fields). Fix: rename the record's id"
            )
        ids.append(rid)
    out = content_ids(texts, ids)
    _check_unique(out, p)
    return TextDataset(texts, out)


def _string(
    obj: dict[str, Any],
    field: str,
    where: str,
    key: str,
    holds: str,
    *,
    empty_ok: bool = False,
) -> str:
    """``obj[field]``, a string; ``key`` is the recipe key that names ``field``, ``holds``
    what the field holds (for the error)."""
    if field not in obj:
        raise missing_field(where, field, obj, key=key, holds=holds)
    value = obj[field]
    if not isinstance(value, str):
        raise DataError(f"{where}: field {field!r} is {type(value).__name__}, expected a string")
    if not empty_ok and not value.strip():
        raise DataError(f"{where}: field {field!r} is empty")
    return value


def _fields(obj: dict[str, Any], task: TaskSection, text_field: str, where: str) -> dict[str, Any]:
    if task.kind == "instruction":
        out = {
            "prompt": _string(obj, task.prompt_field, where, "task.prompt_field", "the prompt"),
            "response": _string(
                obj, task.response_field, where, "task.response_field", "the response"
            ),
        }
        if task.system_field is not None:
            out["system"] = _string(
                obj,
                task.system_field,
                where,
                "task.system_field",
                "the system prompt",
                empty_ok=True,
            )
        return out
    if task.kind == "chat":
        return {"messages": _messages(obj, task.messages_field, where)}
    if task.kind == "classification":
        label = obj.get(task.label_field)
        if isinstance(label, (int, bool)) or isinstance(label, str):
            label = str(label)
        if label is None or task.labels is None or label not in task.labels:
            # the value itself is not echoed beyond this line of the data owner's own file
            raise DataError(
                f"{where}: label field {task.label_field!r} is {label!r}, not one of task.labels "
                f"({', '.join(task.labels or [])}). Fix: add it to task.labels or correct the record"
            )
        text = _string(obj, text_field, where, "data.text_field", "each record's text")
        return {"text": text, "label": label}
    raise ValueError(f"task {task.kind} has no structured records")


def _messages(obj: dict[str, Any], field: str, where: str) -> list[dict[str, str]]:
    if field not in obj:
        raise missing_field(where, field, obj, key="task.messages_field", holds="the messages")
    msgs = obj.get(field)
    if not isinstance(msgs, list) or not msgs:
        raise DataError(
            f"{where}: field {field!r} must be a non-empty list of {{'role', 'content'}} messages"
        )
    out = []
    for i, m in enumerate(msgs):
        if (
            not isinstance(m, dict)
            or m.get("role") not in ROLES
            or not isinstance(m.get("content"), str)
        ):
            raise DataError(
                f"{where}: message {i} must be {{'role': one of {', '.join(ROLES)}, 'content': "
                "a string}"
            )
        out.append({"role": m["role"], "content": m["content"]})
    if not any(m["role"] == "assistant" for m in out):
        raise DataError(f"{where}: the conversation has no assistant message to learn from")
    return out
