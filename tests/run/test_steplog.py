"""Experiment logs: the metrics records reach TensorBoard and, for batch jobs, plain log lines,
with an estimate of the remaining time; nothing a logger sees is missing from metrics.jsonl."""

from __future__ import annotations

import json
import stat
import sys
from pathlib import Path

import pytest
import yaml

from dptrain.cli import main
from dptrain.rundir import RunDir
from dptrain.steplog import StepLog, format_seconds

ROOT = Path(__file__).resolve().parents[2]


def _scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_listeners_see_exactly_the_metrics_records(tmp_path):
    pytest.importorskip("tensorboard")
    run = RunDir(tmp_path)
    lines: list[str] = []
    log = StepLog(
        tmp_path, total=10, first=0, report_to=["tensorboard"], plain=True, echo=lines.append
    )
    run.listeners.append(log)
    for step in range(1, 5):
        run.log({"step": step, "loss": 1.0 / step, "epsilon": 0.1 * step, "batch_size": 3,
                 "applied": True})  # fmt: skip
    log.close()
    assert stat.S_IMODE(run.metrics.stat().st_mode) == 0o600  # statistics of private data
    assert stat.S_IMODE((tmp_path / "tensorboard").stat().st_mode) == 0o700
    scalars = _scalars(tmp_path / "tensorboard")
    records = run.read_metrics()
    assert set(scalars) == {"dptrain/loss", "dptrain/epsilon", "dptrain/batch_size"}
    assert [v for _, v in scalars["dptrain/loss"]] == pytest.approx([r["loss"] for r in records])
    assert lines[0].startswith("step 1/10  loss 1.0000  epsilon 0.1000  batch_size 3  remaining ~")
    assert lines[3].startswith("estimated time: ~") and "for the remaining 7 steps" in lines[3]
    assert len(lines) == 5  # one line per record, and the estimate once (after 3 steps)


def test_format_seconds():
    assert [format_seconds(s) for s in (4.4, 250, 11_100)] == ["4s", "4m10s", "3h05m"]


def test_a_batch_job_logs_plain_lines_and_tensorboard(tmp_path, capsys):
    pytest.importorskip("tensorboard")
    d = yaml.safe_load((ROOT / "recipes" / "tiny.yaml").read_text())
    d["training"].update(steps=5, log_every=2, report_to=["tensorboard"])
    d["lora"] = {"r": 2, "alpha": 4, "target_modules": ["c_attn"]}
    d["output_dir"] = str(tmp_path / "run")
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(d))
    assert main(["train", str(path), "--no-progress"]) == 0
    err = capsys.readouterr().err
    plain = [line for line in err.splitlines() if line.startswith("step ")]
    assert [line.split()[1] for line in plain] == ["2/5", "4/5", "5/5"]  # and the last step
    assert "estimated time: ~" in err and "for the remaining 1 steps" in err  # after 3 steps
    records = [
        json.loads(x)
        for x in (tmp_path / "run" / "private" / "metrics.jsonl").read_text().splitlines()
    ]
    scalars = _scalars(tmp_path / "run" / "private" / "tensorboard")
    assert [s for s, _ in scalars["dptrain/epsilon"]] == [r["step"] for r in records] == [2, 4, 5]


def test_a_missing_logger_names_its_extra_before_training(tmp_path, monkeypatch, capsys):
    d = yaml.safe_load((ROOT / "recipes" / "tiny.yaml").read_text())
    d["training"]["report_to"] = ["tensorboard"]
    d["output_dir"] = str(tmp_path / "run")
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(d))
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    assert main(["train", str(path)]) == 2
    assert "dptrain[tensorboard]" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
