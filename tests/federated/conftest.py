"""Shared helpers: the tiny federated recipe as a dict, written where a test wants it; the
task identity Flower stamps messages with, for tests that build messages themselves."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from flwr.supercore.task_identity import TaskIdentity

ROOT = Path(__file__).resolve().parents[2]


def tiny_recipe(tmp_path: Path, name: str = "run", **sections: dict[str, Any]) -> dict[str, Any]:
    """recipes/federated_tiny.yaml with its output in ``tmp_path/name``, client state in
    ``tmp_path/clients`` and ``sections`` merged in (``federated={"rounds": 3}`` updates that
    section)."""
    d = yaml.safe_load((ROOT / "recipes" / "federated_tiny.yaml").read_text())
    d["output_dir"] = str(tmp_path / name)
    d["federated"]["state_dir"] = str(tmp_path / "clients")  # the clients' own, across runs
    for section, values in sections.items():
        d[section] = {**(d.get(section) or {}), **values}
    return d


def write_recipe(tmp_path: Path, d: dict[str, Any], name: str = "recipe") -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(d))
    return path


@pytest.fixture
def task_identity():
    """Flower stamps message metadata with the process's task identity."""
    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
    yield
    TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved
