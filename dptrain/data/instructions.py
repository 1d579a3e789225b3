"""The bundled instruction dataset ``clinic_instructions.jsonl``, derived from the clinic notes.

Each note of ``clinic_notes.jsonl`` becomes exactly one instruction record (one note stays one
privacy unit), keeping the note's ``id``, with a ``prompt`` (an instruction followed by the
note) and a ``response`` computed from the note's text alone, by rules:

- *List the medications*: every ``<drug> <dose> <unit>`` of the text (``mg``, ``mcg``, ``g``,
  ``mL``, ``units``; a unit followed by ``/`` is a lab value, not a dose), in order of first
  appearance, or "No medications are mentioned." -- asked of a note when it names a medication
  and the first byte of ``sha256(text)`` is even;
- *Summarize*: the document type, the person, and what it is about (the assessment of a
  clinic note -- any note with an ``Assessment:`` line --, the reason for a referral, a ticket's category and status, a lab notice's
  tests, a portal message's subject) -- asked otherwise.

Only record texts are read (other fields of the corpus may change), no randomness and no
clock, so the file is a pure function of the notes' ids and texts:
``python -m dptrain.data.instructions`` regenerates it byte for byte (a test checks that).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
from pathlib import Path

from .loading import _BUNDLED_DIR, TextDataset, load_texts

OUTPUT = _BUNDLED_DIR / "clinic_instructions.jsonl"
MEDICATIONS = "List the medications mentioned in this note, one per line, with their doses."
SUMMARY = "Summarize this note in one sentence."

_DOSE = re.compile(
    r"\b([a-z][a-z-]{2,}(?: nasal)?(?: inhaler| spray| rinse| carbonate)?) (\d+(?:\.\d+)?) (mg|mcg|g|mL|units)\b(?!/)"
)
_NOT_DRUGS = {"under", "than", "about", "over", "and", "the", "of", "to", "is"}


def medications(text: str) -> list[str]:
    """The ``<drug> <dose> <unit>`` mentions of ``text``, first appearances in order."""
    seen: dict[str, None] = {}
    for m in _DOSE.finditer(text):
        if m.group(1) not in _NOT_DRUGS:
            seen.setdefault(f"{m.group(1)} {m.group(2)} {m.group(3)}")
    return list(seen)


def _first(pattern: str, text: str) -> str | None:
    m = re.search(pattern, text, flags=re.MULTILINE)
    return m.group(1).strip().rstrip(".") if m else None


def summary(text: str) -> str:
    """One sentence: document type, person, topic (each part only where the text has it)."""
    first = text.split("\n", 1)[0]
    if re.search(r"^Assessment: ", text, flags=re.MULTILINE):
        kind = "Clinic note"
        who = next(
            filter(
                None,
                (
                    _first(p, text)
                    for p in (r"^(.+?) \(MRN", r"^Name: (.+?) \|", r"^Patient: (.+?),")
                ),
            ),
            None,
        )
        about = _first(r"^Assessment: (.+)$", text)
        topic = f"assessed with {about}" if about else None
    elif first.startswith("Support ticket"):
        kind, who = "Support ticket", _first(r"^Customer: (.+?) <", text)
        cat, status = _first(r"Category: ([^|]+)", first), _first(r"^Status: (.+)$", text)
        parts = [
            f"about {cat.lower()}" if cat else None,
            f"status {status.lower()}" if status else None,
        ]
        topic = ", ".join(p for p in parts if p) or None
    elif first.startswith("Lab results notice"):
        kind, who = "Lab results notice", _first(r"notice for (.+?) \(", first)
        tests = re.findall(r"^- ([^:]+):", text, flags=re.MULTILINE)
        topic = f"reporting {', '.join(tests)}" if tests else None
    elif first.startswith("Patient portal message"):
        kind, who = "Patient portal message", _first(r"^From: (.+?) \(", text)
        subject = _first(r"^Subject: (.+)$", text)
        topic = f"about {subject.lower()}" if subject else None
    elif re.search(r"^Re: ", text, flags=re.MULTILINE):
        kind, who = "Referral letter", _first(r"^Re: (.+?),", text)
        to = _first(r"^To: .+?, (.+)$", text)
        reason = _first(r"patient of mine with (.+?)\.", text)
        parts = [f"to {to}" if to else None, f"for {reason}" if reason else None]
        topic = " ".join(p for p in parts if p) or None
    else:
        kind, who, topic = "Note", None, None
    sentence = kind + (f" for {who}" if who else "") + (f", {topic}" if topic else "")
    return sentence + "."


def instruction_record(rid: str, text: str) -> dict[str, str]:
    """The one instruction record of the note ``(rid, text)``."""
    meds = medications(text)
    if meds and hashlib.sha256(text.encode()).digest()[0] % 2 == 0:
        instruction, response = MEDICATIONS, "\n".join(f"- {m}" for m in meds)
    else:
        instruction, response = SUMMARY, summary(text)
    return {"id": rid, "prompt": f"{instruction}\n\n{text}", "response": response}


def render(notes: TextDataset) -> str:
    """The JSONL file of the instruction records of ``notes``, in their order."""
    return "".join(
        json.dumps(instruction_record(rid, text), ensure_ascii=False) + "\n"
        for rid, text in zip(notes.ids, notes.texts, strict=True)
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--out", type=Path, default=OUTPUT)
    args = ap.parse_args(argv)
    args.out.write_text(render(load_texts("bundled:clinic_notes")), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
