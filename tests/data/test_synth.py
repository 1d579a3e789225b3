import json
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

from dptrain.data import synth
from dptrain.data.loading import bundled_path

REPO = Path(__file__).resolve().parents[2]


def test_same_seed_same_bytes(tmp_path: Path) -> None:
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    synth.write_jsonl(a, n=200, seed=7)
    synth.write_jsonl(b, n=200, seed=7)
    assert a.read_bytes() == b.read_bytes()


def test_different_seed_differs() -> None:
    a = [r["text"] for r in synth.generate(50, seed=1)]
    b = [r["text"] for r in synth.generate(50, seed=2)]
    assert sum(x != y for x, y in zip(a, b, strict=True)) > 45


def test_prefix_stable_in_n() -> None:
    assert list(synth.generate(30, seed=3)) == list(synth.generate(60, seed=3))[:30]


def test_cli_matches_in_process_across_python_runs(tmp_path: Path) -> None:
    out = tmp_path / "cli.jsonl"
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONHASHSEED": "123"}
    cmd = [
        sys.executable,
        "-m",
        "dptrain.data.synth",
        "--out",
        str(out),
        "--n",
        "40",
        "--seed",
        "5",
    ]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    assert "wrote 40 records" in res.stderr
    expected = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in synth.generate(40, 5))
    assert out.read_text(encoding="utf-8") == expected


def test_bundled_file_equals_fresh_regeneration(tmp_path: Path) -> None:
    fresh = tmp_path / "fresh.jsonl"
    synth.write_jsonl(fresh, n=synth.DEFAULT_N, seed=synth.DEFAULT_SEED)
    committed = bundled_path("clinic_notes").read_bytes()
    assert committed == fresh.read_bytes(), (
        "bundled clinic_notes.jsonl differs from a regeneration; if synth.py or Faker changed, "
        "run: python -m dptrain.data.synth --out dptrain/data/bundled/clinic_notes.jsonl "
        f"--n {synth.DEFAULT_N} --seed {synth.DEFAULT_SEED}"
    )


def test_records_look_like_person_records() -> None:
    recs = list(synth.generate(400, seed=0))
    assert len({r["id"] for r in recs}) == 400
    assert len({r["text"] for r in recs}) == 400
    kinds = Counter(r["kind"] for r in recs)
    assert set(kinds) == set(synth.KINDS)
    assert kinds["clinic_note"] > 150
    for r in recs:
        assert set(r) == {"id", "patient_id", "kind", "text"}
        assert 250 < len(r["text"]) < 1600, r
        assert re.search(r"DOB|MRN", r["text"]), r  # every record identifies a person
    notes = [r["text"] for r in recs if r["kind"] == "clinic_note"]
    for field in ("Vitals:", "Assessment:", "Plan:", "BP "):
        assert all(field in t for t in notes), field
    assert all("Medications: " in t or "Rx: " in t for t in notes)


def test_negative_n_rejected() -> None:
    import pytest

    with pytest.raises(ValueError):
        list(synth.generate(-1))


def test_patients_have_heavy_tailed_counts_and_one_identity() -> None:
    """Every record names its patient; counts are 1..30, heavy-tailed; a patient's notes name
    one person (the first note's name and MRN appear in every later note that states them)."""
    recs = [json.loads(line) for line in bundled_path("clinic_notes").read_text().splitlines()]
    counts = Counter(r["patient_id"] for r in recs)
    sizes = sorted(counts.values())
    assert sizes[0] == 1 and sizes[-1] == synth.MAX_RECORDS_PER_PATIENT
    assert sizes[len(sizes) // 2] <= 3 and sum(s >= 10 for s in sizes) >= 50  # heavy tail
    first: dict[str, str] = {}
    for r in recs:
        m = re.search(
            r"(?:Name: |Patient: |Re: |From: |Customer: |notice for )([A-Z][^,(<|\n]+)", r["text"]
        )
        if m is None:
            continue
        name = m.group(1).strip()
        assert first.setdefault(r["patient_id"], name) == name, r["id"]
    assert len(first) > 0.8 * len(counts)
