"""The bundled instruction records: a pure function of the notes' ids and texts."""

import json

from dptrain.data import instructions
from dptrain.data.loading import bundled_path, load_texts
from dptrain.tasks.records import load_records
from dptrain.tasks.schema import TaskSection


def test_committed_file_is_regenerated_byte_for_byte() -> None:
    fresh = instructions.render(load_texts("bundled:clinic_notes")).encode("utf-8")
    assert bundled_path("clinic_instructions").read_bytes() == fresh


def test_one_record_per_note_with_its_id_and_text() -> None:
    notes = load_texts("bundled:clinic_notes")
    rows = [json.loads(line) for line in bundled_path("clinic_instructions").open()]
    assert [r["id"] for r in rows] == notes.ids
    for r, text in zip(rows, notes.texts, strict=True):
        head, _, note = r["prompt"].partition("\n\n")
        assert head in (instructions.MEDICATIONS, instructions.SUMMARY) and note == text
    meds = [r for r in rows if r["prompt"].startswith(instructions.MEDICATIONS)]
    assert 0.2 < len(meds) / len(rows) < 0.5  # both instructions are well represented


def test_rules_on_a_note() -> None:
    note = (
        "CLINIC NOTE (2022-05-10)\nName: Ann Lee | DOB: 1975\nLDL 168 mg/dL.\n"
        "Assessment: essential hypertension.\nRx: Start lisinopril 10 mg daily; albuterol "
        "inhaler 90 mcg as needed.\nPlan: sodium under 2 g per day."
    )
    assert instructions.medications(note) == ["lisinopril 10 mg", "albuterol inhaler 90 mcg"]
    assert (
        instructions.summary(note)
        == "Clinic note for Ann Lee, assessed with essential hypertension."
    )


def test_bundled_split_follows_the_notes_split() -> None:
    task = TaskSection(kind="instruction")
    val = load_records("bundled:clinic_instructions:validation", task)
    assert val.ids == load_texts("bundled:clinic_notes:validation").ids
