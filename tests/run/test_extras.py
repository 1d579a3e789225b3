"""Lighter installs: optional features name their extra when it is missing, and
``dptrain epsilon`` starts without torch or transformers."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from dptrain.cli import main
from dptrain.extras import EXTRAS, MissingExtraError, require

ROOT = Path(__file__).resolve().parents[2]


def test_require_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "flwr", None)  # what an install without the extra sees
    with pytest.raises(MissingExtraError, match=r"needs flwr.*pip install 'dptrain\[federated\]'"):
        require("flwr", "federated", "dptrain federated")
    assert require("json", "plots", "x").__name__ == "json"
    assert set(EXTRAS) == {"federated", "rl", "plots", "datasets", "tensorboard"}


def test_pyproject_extras_match_and_dev_pulls_all():
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    assert set(EXTRAS) <= set(extras)
    assert extras["all"] == [f"dptrain[{','.join(EXTRAS)}]"]
    assert "dptrain[all]" in extras["dev"]
    core = " ".join(project["dependencies"])
    for heavy in ("flwr", "stable-baselines3", "gymnasium", "matplotlib", "faker"):
        assert heavy not in core


def test_federated_command_names_its_extra(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "flwr", None)
    assert main(["federated", str(ROOT / "recipes" / "federated_tiny.yaml")]) == 2
    assert "dptrain[federated]" in capsys.readouterr().err


def test_rl_policy_names_its_extra(monkeypatch):
    from dptrain.policies import make_policy

    monkeypatch.setitem(sys.modules, "stable_baselines3", None)
    with pytest.raises(MissingExtraError, match=r"policy 'rl'.*dptrain\[rl\]"):
        make_policy("rl", clip=1.0, noise_multiplier=None)


def test_audit_after_training_names_plots_before_training(tmp_path, monkeypatch, capsys):
    d = yaml.safe_load((ROOT / "recipes" / "tiny.yaml").read_text())
    d["audit"] = {"after_training": True}
    d["output_dir"] = str(tmp_path / "run")
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(d))
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert main(["train", str(path), "--no-progress"]) == 2
    assert "dptrain[plots]" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # refused before anything ran


def test_epsilon_starts_without_torch():
    """`dptrain epsilon` imports neither torch nor transformers (they took 5-8 s); what is left
    is numpy, scipy and dp-accounting."""
    code = (
        "import sys, time; t = time.perf_counter(); from dptrain.cli import main; "
        "rc = main(['epsilon', '--sample-rate', '0.01', '--noise-multiplier', '1', '--steps', "
        "'100', '--delta', '1e-5', '--json']); "
        "heavy = [m for m in ('torch', 'transformers', 'peft', 'flwr', 'matplotlib') "
        "if m in sys.modules]; print(rc, heavy, file=sys.stderr)"
    )
    t0 = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr.strip().splitlines()[-1] == "0 []"
    assert '"epsilon": 1.21' in done.stdout
    assert time.perf_counter() - t0 < 60  # a loose bound for a loaded test machine
