"""Membership inference by person (attacks.people) against a tiny user-level run."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import yaml

from attacks.bounds import gaussian_epsilon
from attacks.metrics import roc_of
from attacks.people import audit_people, person_scores
from dptrain.cli import main
from dptrain.data import load_texts
from dptrain.data.canaries import read_manifest
from dptrain.errors import InputError

ROOT = Path(__file__).resolve().parents[2]


def _run(tmp_path: Path) -> Path:
    ds = load_texts("bundled:clinic_notes")
    lines = [
        json.dumps({"id": ds.ids[i], "patient_id": f"p{i // 3:03d}", "text": ds.texts[i]})
        for i in range(150)
    ]  # 50 patients with 3 notes each
    (tmp_path / "people.jsonl").write_text("\n".join(lines) + "\n")
    d = yaml.safe_load((ROOT / "recipes" / "tiny.yaml").read_text())
    d["lora"] = {"r": 2, "alpha": 4, "target_modules": ["c_attn"]}
    d["output_dir"] = str(tmp_path / "run")
    d["data"].pop("max_records")
    d["data"].update(
        path=str(tmp_path / "people.jsonl"),
        validation_fraction=0.3,
        max_validation_records=None,
        canaries={"repetitions": {1: 6, 3: 2}},
    )
    d["data"]["privacy_unit"] = {"field": "patient_id", "max_records_per_person": 2}
    d["training"].update(steps=2, batch_size=6)
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(d))
    assert main(["train", str(path), "--no-progress"]) == 0
    return tmp_path / "run"


def test_audit_by_person_of_a_user_level_run(tmp_path, capsys):
    run = _run(tmp_path)
    s = audit_people(run, people=16)
    assert s["unit"] == "patient" and s["claim"]["strategy"] == "user"
    assert s["members"] >= 4 and s["non_members"] >= 4
    assert s["records"] >= s["members"] + s["non_members"]  # people with several records
    for a in s["attacks"].values():
        assert 0.0 <= a["auc"] <= 1.0 and 0.0 <= a["tpr_at_1pct_fpr"] <= 1.0
    bound = s["clopper_pearson"]
    assert bound["attacks"] == 2 and 0.0 <= bound["epsilon"] <= s["claim"]["epsilon"]
    assert s["consistent"] and math.isfinite(s["claim"]["epsilon"])
    canaries = s["canary_people"]
    # the repetition counts of the canary people the run's coins included (fresh key: any)
    inserted = {str(c.repetitions) for c in read_manifest(run).canaries if c.included}
    assert set(canaries["drop_by_repetitions"]) == inserted
    # every canary person has an inclusion coin (person unit): the one-run bound is over all
    # 8 canary people, per patient, beside the per-patient claim
    one_run = canaries["one_run"]
    assert one_run["canaries"] == 8 and one_run["unit"] == "patient"
    assert "every canary patient" in one_run["over"]
    assert s["epsilon_lower_bounds"]["one_run"] == one_run["epsilon"] <= s["claim"]["epsilon"]
    assert s["empirical_epsilon_lower_bound"] == max(s["epsilon_lower_bounds"].values())
    meta = json.loads((run / "run.json").read_text())
    assert meta["privacy_unit"]["canaries"]["unit"] == "patient"
    assert meta["privacy_unit"]["canaries"]["people"] == 8

    # `dptrain audit` dispatches a person-level run to the audit by person
    assert main(["audit", str(run), "--members", "16", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "audit by patient" in printed and "8 canary people" in printed
    written = json.loads((run / "audit" / "people.json").read_text())
    assert written["attacks"] == s["attacks"] and written["unit"] == "patient"


def test_gaussian_epsilon_of_mu_zero_is_zero():
    # the ceiling of a handful of canaries (no plan can reject) is mu = 0, not a crash
    assert gaussian_epsilon(0.0, 1e-5) == 0.0 < gaussian_epsilon(0.5, 1e-5)


def test_a_record_level_run_is_refused(tmp_path):
    # a finished record-level run, as its run.json and final/ say (no training needed here)
    (tmp_path / "final").mkdir()
    (tmp_path / "run.json").write_text(json.dumps({"status": "finished", "privacy_unit": "record"}))
    with pytest.raises(InputError, match="protects records, not people"):
        audit_people(tmp_path)


def test_person_scores_do_not_rank_record_counts():
    """Members with 1 record, non-members with 8, every record's drop from one distribution
    with a positive mean (training on the domain helps non-members too): the old sum ranks
    the counts (AUC near 0), the per-person mean does not (AUC near 1/2)."""
    rng = np.random.default_rng(0)
    people, sizes = 400, np.r_[np.ones(200, int), np.full(200, 8)]
    owner = np.repeat(np.arange(people), sizes)
    values = rng.normal(1.0, 1.0, len(owner))
    values[::7] = np.nan  # an unscored record (responses cut off) is skipped
    scored = ~np.isnan(values)
    is_member = np.arange(people) < 200
    held = np.bincount(owner[scored], minlength=people) > 0
    total = np.bincount(owner[scored], values[scored], minlength=people)
    assert roc_of(total[held], is_member[held]).auc < 0.1
    mean = person_scores(owner, values, scored, people)
    assert np.isnan(mean[~held]).all() and not np.isnan(mean[held]).any()
    assert abs(roc_of(mean[held], is_member[held]).auc - 0.5) < 0.1
    first = owner == 201
    assert mean[201] == pytest.approx(np.nanmean(values[first]))


def test_canary_drops_are_counted_by_the_copies_an_example_run_trained_on(tmp_path):
    """Strategy example caps a canary person like any other: one repeated 16 times with a cap
    of 4 trained on 4 copies, so its drop is reported under 4 (with the cap), not 16."""
    from types import SimpleNamespace

    from attacks.people import _canary_people
    from dptrain.data.canaries import Canary, write_manifest
    from dptrain.recipe import CanarySection

    config = CanarySection(secret_digits=2, repetitions={1: 2, 4: 1, 16: 1})
    canaries = [
        Canary(0, "A b", "11", 1, True),
        Canary(1, "C d", "22", 1, False),
        Canary(2, "E f", "33", 4, True),
        Canary(3, "G h", "44", 16, True),
    ]
    write_manifest(tmp_path, config, canaries=canaries, person_level=True)
    drops = {"base": np.full(4, 10.0), "target": np.array([9.0, 10.0, 7.0, 5.0])}

    def score(model, texts, ids):
        return SimpleNamespace(sum_nll=drops[model])

    args = (tmp_path, "target", "base", score, 1e-5, 0.95, "patient")
    plain = _canary_people(*args)
    assert plain["drop_by_repetitions"] == {"1": 1.0, "4": 3.0, "16": 5.0}
    assert "repetitions_capped_at" not in plain
    capped = _canary_people(*args, 4)
    assert capped["drop_by_repetitions"] == {"1": 1.0, "4": 4.0}  # (3 + 5) / 2
    assert capped["repetitions_capped_at"] == 4
    assert capped["one_run"]["canaries"] == plain["one_run"]["canaries"] == 4
