"""The deployment path: a Flower SuperLink and two SuperNodes as separate processes on
127.0.0.1, the app submitted with ``flwr run``, two rounds; every process is stopped after."""

from __future__ import annotations

import os
import sys
import tomllib

import pytest
import torch
import yaml
from flwr.common.config import validate_config

from accountants import Ledger
from dptrain.cli import main
from dptrain.federated import simulate
from dptrain.federated.deploy import LoopbackFederation, write_app
from dptrain.federated.holder import ClientConfigError, simulated
from dptrain.recipe import parse_recipe
from dptrain.rundir import RunDir

from .conftest import tiny_recipe, write_recipe


@pytest.mark.slow
def test_superlink_and_two_supernodes_on_loopback_complete_two_rounds(tmp_path):
    d = tiny_recipe(tmp_path, federated={"clients": 2, "min_clients": 2, "round_timeout": 240})
    d["privacy"]["insecure_seed"] = 11  # reproducible, to compare with the simulation below
    recipe = parse_recipe(d)
    run = RunDir(tmp_path / "run")
    configs = [simulated(recipe, k, tmp_path / "states") for k in range(2)]
    states = [c.state_dir for c in configs]
    app = write_app(recipe, tmp_path / "app", run.path)
    with LoopbackFederation(2, tmp_path / "flower", configs) as federation:
        groups = [federation.superlink.pid, *(p.pid for p in federation.supernodes.values())]
        done = federation.run(app, timeout=420)
    logs = "\n".join(p.read_text(errors="replace")[-2000:] for p in federation.logs.glob("*.log"))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:] + logs
    assert "round 2/2: global validation perplexity" in done.stdout
    for pgid in groups:  # the SuperLink, the SuperNodes and their app processes are gone
        with pytest.raises(ProcessLookupError):
            os.killpg(pgid, 0)

    meta = run.read_meta()
    assert meta["status"] == "finished" and "client_epsilon" not in meta
    assert set(run.read_stats()["client_epsilon"]) == {"0", "1"}  # reported spends: private
    assert meta["client_guarantee"]["epsilon"] == 8.0
    rounds = run.read_metrics()
    assert [m["round"] for m in rounds] == [1, 2] and all(m["updates"] == 2 for m in rounds)
    for k, state in enumerate(states):  # each client kept its own ledger in its state-dir
        assert Ledger.load(state / "ledger.json").total_steps == 2 * 3
        assert rounds[-1]["clients"][str(k)]["status"] == "trained"
    assert (run.final / "adapter_model.safetensors").exists()
    # the same recipe simulated in-process ends with the same global adapter
    simulate(parse_recipe({**d, "output_dir": str(tmp_path / "sim")}))
    final = torch.load(run.checkpoint_files()[-1], weights_only=True)["adapters"]
    in_process = RunDir(tmp_path / "sim")
    same = torch.load(in_process.checkpoint_files()[-1], weights_only=True)["adapters"]
    for name, value in final.items():
        torch.testing.assert_close(same[name], value, rtol=1e-4, atol=1e-6)


def test_app_dir_is_a_valid_flower_app_carrying_the_recipe(tmp_path, capsys):
    path = write_recipe(tmp_path, tiny_recipe(tmp_path))
    assert main(["federated", str(path), "--app-dir", str(tmp_path / "app")]) == 0
    assert "flower-supernode" in capsys.readouterr().out
    config = tomllib.loads((tmp_path / "app" / "pyproject.toml").read_text())
    ok, errors, _ = validate_config(config, check_module=True, project_dir=tmp_path / "app")
    assert ok, errors
    settings = config["tool"]["flwr"]["app"]["config"]
    assert settings["output-dir"] == str((tmp_path / "run").resolve())
    assert parse_recipe(yaml.safe_load(settings["recipe"])) == parse_recipe(tiny_recipe(tmp_path))


def test_a_second_supernode_on_a_running_partition_is_refused(tmp_path):
    """start_client(k) while client k's SuperNode runs would put two nodes on partition-id
    k (its records trained twice per round): refused; after stop_client(k) it may restart."""
    recipe = parse_recipe(tiny_recipe(tmp_path, federated={"clients": 2, "min_clients": 1}))
    configs = [simulated(recipe, k, tmp_path / "states") for k in range(2)]
    federation = LoopbackFederation(2, tmp_path / "flower", configs)
    try:  # a process standing in for client 0's SuperNode (no SuperLink is started)
        sleeper = [sys.executable, "-c", "import time; time.sleep(60)"]
        federation.supernodes[0] = federation._spawn("supernode-0", sleeper)
        with pytest.raises(ClientConfigError, match=r"client 0's SuperNode is running"):
            federation.start_client(0)
        federation.stop_client(0)
        assert 0 not in federation.supernodes
    finally:
        federation.close()
