"""``dptrain epsilon --run`` on a federated server run: it reports run.json's
``client_guarantee`` (every client's bound for this run), or refuses clearly."""

from __future__ import annotations

import json
from pathlib import Path

from dptrain.cli import main
from dptrain.federated.recipe import FederatedRecipe
from dptrain.federated.server import client_guarantee
from dptrain.recipe import parse_recipe

from .conftest import tiny_recipe


def federated_run(path: Path, recipe: FederatedRecipe, **extra) -> Path:
    """A finished server run's run.json, as start_run and run_server write it."""
    path.mkdir(parents=True)
    meta = {
        "kind": "federated",
        "accountant": recipe.privacy.accountant,
        "client_dp": None,
        "insecure_seed": None,
        "client_guarantee": client_guarantee(recipe, pairs_per_step=10),
        **extra,
    }
    (path / "run.json").write_text(json.dumps(meta))
    return path


def test_epsilon_of_a_federated_run_is_its_client_guarantee(tmp_path, capsys):
    recipe = parse_recipe(tiny_recipe(tmp_path, privacy={"delta": 1e-5}))
    run = federated_run(tmp_path / "run", recipe)  # no ledger.json: the clients keep theirs
    assert main(["epsilon", "--run", str(run), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    g = client_guarantee(recipe, pairs_per_step=10)
    assert out["kind"] == "federated" and out["basis"] == "calibrated" and out["guarantee"]
    assert out["epsilon"] == g["epsilon"] == 8.0 and out["noise_pairs"] == 2 * 3 * 10
    assert out["delta_total"] == 1e-5 + g["delta_noise_truncation"]
    assert main(["epsilon", "--run", str(run)]) == 0
    assert "8.0000 (each record of each client)" in capsys.readouterr().out
    # its bound is stated at the recipe's accountant and delta: no recomputation
    assert main(["epsilon", "--run", str(run), "--delta", "1e-3"]) == 2
    assert "federated server run" in capsys.readouterr().err


def test_epsilon_of_a_federated_run_without_a_bound_refuses_with_the_reason(tmp_path, capsys):
    fixed = {"policy": {"noise_multiplier": 1.0}}  # q = B / N_k: each client's own
    recipe = parse_recipe(tiny_recipe(tmp_path, **fixed))
    run = federated_run(tmp_path / "run", recipe)
    assert main(["epsilon", "--run", str(run), "--json"]) == 2
    err = capsys.readouterr().err
    assert "states no record-level bound" in err and "client filters" in err
    assert "--run STATE_DIR/client-K" in err
    older = tmp_path / "older"
    older.mkdir()
    (older / "run.json").write_text(json.dumps({"kind": "federated"}))
    assert main(["epsilon", "--run", str(older)]) == 2
    assert "has no client_guarantee" in capsys.readouterr().err
