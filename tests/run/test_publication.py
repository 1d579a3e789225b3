"""What a run publishes: run.json holds classified public fields only, and no public file
depends on the run key's coins (dptrain.publication)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import yaml

from dptrain.cli import main
from dptrain.publication import PUBLIC_RUN_FIELDS, UnclassifiedFieldError, check_public
from dptrain.rundir import RunDir

ROOT = Path(__file__).resolve().parents[2]


def test_run_json_refuses_a_field_nobody_classified(tmp_path):
    run = RunDir(tmp_path)
    with pytest.raises(UnclassifiedFieldError, match=r"'loss_mean'.*private/stats\.json"):
        run.write_meta({"name": "x", "loss_mean": 2.3})
    assert not run.meta.exists()
    check_public(["epsilon", "dataset_size"])
    assert "train_seconds" not in PUBLIC_RUN_FIELDS and "canary_check" not in PUBLIC_RUN_FIELDS


def test_an_earlier_run_json_s_private_fields_move_to_private_stats(tmp_path):
    """A run written before they moved (resumed, or marked interrupted) keeps them private."""
    run = RunDir(tmp_path)
    old = {"name": "x", "status": "paused", "train_seconds": 12.5, "canary_check": {"trained": 3}}
    run.meta.write_text(json.dumps(old))
    run.update_stats(train_seconds=20.0)  # a newer value is kept
    run.update_meta(status="interrupted")
    assert run.read_meta() == {"name": "x", "status": "interrupted"}
    assert run.read_stats() == {"train_seconds": 20.0, "canary_check": {"trained": 3}}


def _recipe(tmp_path: Path, name: str) -> Path:
    d = yaml.safe_load((ROOT / "recipes" / "tiny.yaml").read_text())
    d["output_dir"] = str(tmp_path / name)
    d["lora"] = {"r": 2, "alpha": 4, "target_modules": ["c_attn"]}  # seconds per run
    d["training"].update(steps=2, checkpoint_every=2)
    d["generation"] = {"samples": 0}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(d))
    return path


def test_public_files_do_not_depend_on_the_coins(tmp_path):
    """Two runs of one recipe under two fresh secret keys draw different batches, splits and
    noise; everything they publish but the final model (which the guarantee covers) must be
    the same but for the key's public id: whatever followed the coins (batch sizes, timings,
    the validation split) would differ."""
    runs = []
    for name in ("a", "b"):
        assert main(["train", str(_recipe(tmp_path, name)), "--no-progress"]) == 0
        runs.append(RunDir(tmp_path / name))
    a, b = (run.read_meta() for run in runs)
    assert set(a) <= PUBLIC_RUN_FIELDS.keys()
    assert a["key_id"] != b["key_id"]
    differ = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
    assert differ == ["key_id"], differ
    assert runs[0].ledger.read_text() == runs[1].ledger.read_text()
    if importlib.util.find_spec("matplotlib") is not None:  # drawn from the ledger, run.json
        figures = [(r.path / "report" / "privacy.png").read_bytes() for r in runs]
        assert figures[0] == figures[1]
    first, second = ({**yaml.safe_load(r.recipe.read_text()), "output_dir": None} for r in runs)
    assert first == second
    # the coins did differ: the private step log of the two runs is not the same
    sizes = [[m["batch_size"] for m in run.read_metrics()] for run in runs]
    losses = [[m["loss"] for m in run.read_metrics()] for run in runs]
    assert sizes[0] != sizes[1] or losses[0] != losses[1]
