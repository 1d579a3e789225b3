"""Ledger and Event: merging, serialization, atomic save, errors on corrupt input."""

from __future__ import annotations

import json
import math
import os

import pytest

from accountants import Event, Ledger, LedgerError, LedgerNotFoundError


def test_event_validation() -> None:
    e = Event(0.01, 1, 3)
    assert (e.sample_rate, e.noise_multiplier, e.steps, e.kind) == (
        0.01,
        1.0,
        3,
        "poisson_gaussian",
    )
    assert isinstance(e.noise_multiplier, float)
    assert Event(1.0, math.inf).noise_multiplier == math.inf
    assert Event(1.0, 0.0).noise_multiplier == 0.0
    for bad in (0.0, -0.1, 1.5, math.nan):
        with pytest.raises(ValueError, match="sample_rate"):
            Event(bad, 1.0)
    for bad in (-1.0, math.nan):
        with pytest.raises(ValueError, match="noise_multiplier"):
            Event(0.1, bad)
    with pytest.raises(ValueError, match="steps"):
        Event(0.1, 1.0, 0)
    with pytest.raises(TypeError, match="steps"):
        Event(0.1, 1.0, 1.5)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="steps"):
        Event(0.1, 1.0, True)
    with pytest.raises(TypeError, match="sample_rate"):
        Event("0.1", 1.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="kind"):
        Event(0.1, 1.0, kind="")


def test_merge_consecutive_equal_events() -> None:
    ledger = Ledger()
    ledger.record(Event(0.01, 1.0))
    ledger.record(Event(0.01, 1.0, 4))
    ledger.record(Event(0.01, 2.0))
    ledger.record(Event(0.02, 2.0))
    ledger.record(Event(0.01, 1.0))
    ledger.record(Event(0.01, 1.0, kind="other"))
    assert ledger.events == [
        Event(0.01, 1.0, 5),
        Event(0.01, 2.0, 1),
        Event(0.02, 2.0, 1),
        Event(0.01, 1.0, 1),
        Event(0.01, 1.0, 1, kind="other"),
    ]
    assert ledger.total_steps == 9
    assert len(ledger) == 5
    # events is a copy: mutating it does not change the ledger
    ledger.events.clear()
    assert ledger.total_steps == 9
    with pytest.raises(TypeError):
        ledger.record((0.01, 1.0))  # type: ignore[arg-type]


def test_json_round_trip_with_infinite_noise() -> None:
    ledger = Ledger([Event(0.01, 1.0, 10), Event(1.0, math.inf, 2), Event(0.5, 0.0, 1)])
    d = ledger.to_dict()
    assert d["format"] == "dptrain.ledger" and d["version"] == 1
    text = json.dumps(d, allow_nan=False)  # strict JSON: no Infinity
    again = Ledger.from_dict(json.loads(text))
    assert again == ledger
    assert again.events[1].noise_multiplier == math.inf


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ([], "JSON object"),
        ({"events": []}, "not a dptrain ledger"),
        ({"format": "dptrain-checkpoint", "version": 1, "events": []}, "not a dptrain ledger"),
        ({"format": "dptrain.ledger", "version": 99, "events": []}, "newer"),
        ({"format": "dptrain.ledger", "version": "1", "events": []}, "version"),
        ({"format": "dptrain.ledger", "version": 1, "events": {}}, "must be a list"),
        ({"format": "dptrain.ledger", "version": 1, "events": [], "x": 1}, "unexpected"),
        ({"format": "dptrain.ledger", "version": 1, "events": [{"steps": 1}]}, "#0"),
        (
            {
                "format": "dptrain.ledger",
                "version": 1,
                "events": [
                    {
                        "kind": "poisson_gaussian",
                        "sample_rate": 2,
                        "noise_multiplier": 1,
                        "steps": 1,
                    }
                ],
            },
            "sample_rate",
        ),
        (
            {
                "format": "dptrain.ledger",
                "version": 1,
                "events": [
                    {
                        "kind": "poisson_gaussian",
                        "sample_rate": 0.1,
                        "noise_multiplier": 1,
                        "steps": 1.0,
                    }
                ],
            },
            "integer",
        ),
    ],
)
def test_from_dict_rejects_foreign_or_corrupt(content: object, match: str) -> None:
    with pytest.raises(LedgerError, match=match):
        Ledger.from_dict(content)  # type: ignore[arg-type]


def test_save_load_round_trip(tmp_path) -> None:
    path = tmp_path / "ledger.json"
    ledger = Ledger([Event(0.01, 1.0, 100), Event(0.01, 2.0, 50)])
    ledger.save(path)
    assert Ledger.load(path) == ledger
    assert os.listdir(tmp_path) == ["ledger.json"]  # no temp files left behind


def test_crash_between_write_and_rename_keeps_old_file(tmp_path, monkeypatch) -> None:
    path = tmp_path / "ledger.json"
    old = Ledger([Event(0.01, 1.0, 100)])
    old.save(path)
    before = path.read_bytes()

    def crash(src, dst):  # the process dies after writing the temp file, before the rename
        raise KeyboardInterrupt("simulated crash")

    monkeypatch.setattr(os, "replace", crash)
    new = Ledger([Event(0.01, 1.0, 200)])
    with pytest.raises(KeyboardInterrupt):
        new.save(path)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert Ledger.load(path) == old
    assert os.listdir(tmp_path) == ["ledger.json"]


def test_load_errors_name_the_path(tmp_path) -> None:
    missing = tmp_path / "nope" / "ledger.json"
    with pytest.raises(LedgerNotFoundError, match="nope") as info:
        Ledger.load(missing)
    assert isinstance(info.value, FileNotFoundError) and isinstance(info.value, LedgerError)

    truncated = tmp_path / "truncated.json"
    Ledger([Event(0.01, 1.0, 100)]).save(truncated)
    truncated.write_text(truncated.read_text()[:40])
    with pytest.raises(LedgerError, match=r"truncated\.json.*not valid JSON"):
        Ledger.load(truncated)

    foreign = tmp_path / "foreign.json"
    foreign.write_text(json.dumps({"name": "some other file"}))
    with pytest.raises(LedgerError, match=r"foreign\.json.*not a dptrain ledger"):
        Ledger.load(foreign)

    binary = tmp_path / "binary.json"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(LedgerError, match=r"binary\.json"):
        Ledger.load(binary)
