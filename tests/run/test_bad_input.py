"""Bad input gets a clear error naming the cause and the fix, and loses nothing."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from accountants import Ledger
from dptrain import PrivacyEngine, StaticPolicy, UnsupportedLayerError
from dptrain.cli import main
from dptrain.losses import classification_loss
from dptrain.recipe import RecipeError, parse_recipe
from dptrain.rundir import RunDir

ROOT = Path(__file__).resolve().parents[2]


def recipe(tmp_path: Path, **sections) -> Path:
    d = yaml.safe_load((ROOT / "recipes" / "tiny.yaml").read_text())
    d["lora"] = {"r": 2, "alpha": 4, "target_modules": ["c_attn"]}
    d["output_dir"] = str(tmp_path / "run")
    for section, values in sections.items():
        d[section].update(values)
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(d))
    return path


def fails(capsys, *argv: str) -> str:
    assert main(list(argv)) == 2
    return capsys.readouterr().err


def test_empty_dataset(tmp_path, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    err = fails(capsys, "train", str(recipe(tmp_path, data={"path": str(empty)})), "--no-progress")
    assert "empty" in err.lower() and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_tiny_dataset(tmp_path, capsys):
    one = tmp_path / "one.jsonl"
    one.write_text('{"id": "a", "text": "only record"}\n')
    path = recipe(tmp_path, data={"path": str(one), "validation_path": str(one)})
    assert "needs a dataset" in fails(capsys, "train", str(path), "--no-progress")


def test_sequences_longer_than_the_context(tmp_path, capsys):
    err = fails(
        capsys, "train", str(recipe(tmp_path, data={"max_length": 100_000})), "--no-progress"
    )
    assert "data.max_length" in err and "context" in err


def test_missing_data_file(tmp_path, capsys):
    err = fails(capsys, "train", str(recipe(tmp_path, data={"path": str(tmp_path / "nope.jsonl")})))
    assert "nope.jsonl" in err


def test_foreign_checkpoint(tmp_path, capsys):
    path = recipe(tmp_path, training={"steps": 2}, policy={"noise_multiplier": 1.0})
    assert main(["train", str(path), "--no-progress"]) == 0
    run = RunDir(tmp_path / "run")
    for f in run.checkpoint_files():
        torch.save({"weights": torch.zeros(2)}, f)  # someone else's file
    err = fails(capsys, "train", str(path), "--resume", str(run.path), "--set", "training.steps=4")
    assert "not a dptrain checkpoint" in err
    assert Ledger.load(run.ledger).total_steps == 2  # nothing lost


class Mixer(nn.Module):
    """A custom layer that mixes samples: no per-sample gradient exists."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(3))

    def forward(self, x):
        return x * self.w + (x * self.w).mean(0, keepdim=True)


def _engine(model):
    return PrivacyEngine(
        model,
        torch.optim.SGD(model.parameters(), lr=0.1),
        policy=StaticPolicy(noise_multiplier=1.0),
        sample_rate=0.5,
        dataset_size=10,
        loss_fn=classification_loss,
    )


def test_layers_without_per_sample_gradients_are_named():
    batch = (torch.randn(4, 3), torch.tensor([0, 1, 2, 0]))
    for frozen in (False, True):  # a frozen BatchNorm in train mode mixes samples just the same
        bn = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))
        bn[1].requires_grad_(not frozen)
        engine = _engine(bn)
        with pytest.raises(UnsupportedLayerError, match=r"'1' \(BatchNorm1d\).*Fix.*eval mode"):
            engine.step(batch)
        assert engine.ledger.total_steps == 0
    engine = _engine(nn.Sequential(nn.Linear(3, 3), Mixer()))  # a layer with no rule
    with pytest.raises(
        UnsupportedLayerError, match=r"'1' \(Mixer\).*depends on other samples.*Fix"
    ):
        engine.step(batch)
    assert engine.ledger.total_steps == 0


def test_nan_losses_are_counted_charged_and_contained():
    """A sample whose loss is NaN contributes nothing; the step still adds noise and is charged.

    Skipping the whole step instead would let one record decide whether the step happens,
    which no sensitivity bound covers."""
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    engine = PrivacyEngine(
        model,
        torch.optim.SGD(model.parameters(), lr=0.1),
        policy=StaticPolicy(clip=1.0, noise_multiplier=1.0),
        sample_rate=0.5,
        dataset_size=8,
        loss_fn=classification_loss,
    )
    x = torch.randn(4, 4)
    x[0] = float("inf")
    report = engine.step((x, torch.tensor([0, 1, 0, 1])))
    assert report.nonfinite == 1
    assert engine.ledger.total_steps == 1
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("value", [True, False])
def test_removed_secure_noise_names_its_replacement(value):
    """There is one noise source now (secret and full-tailed); an old recipe is told so."""
    d = yaml.safe_load((ROOT / "recipes" / "tiny.yaml").read_text())
    d["privacy"]["secure_noise"] = value
    with pytest.raises(RecipeError, match=r"secure_noise was removed.*insecure_seed"):
        parse_recipe(d)
    d = yaml.safe_load((ROOT / "recipes" / "tiny.yaml").read_text())
    d["data"]["canaries"] = {"seed": 3}
    with pytest.raises(RecipeError, match=r"canaries\.seed was removed"):
        parse_recipe(d)


def test_a_non_finite_released_update_is_skipped_but_charged():
    """Diverged parameters give a non-finite released update: it is not applied (a decision
    on released values only), the step is counted and its privacy charged."""
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    engine = PrivacyEngine(
        model,
        torch.optim.SGD(model.parameters(), lr=0.1),
        policy=StaticPolicy(clip=1.0, noise_multiplier=float("inf")),
        sample_rate=0.5,
        dataset_size=8,
        loss_fn=classification_loss,
    )
    before = [p.detach().clone() for p in model.parameters()]
    report = engine.step((torch.randn(4, 4), torch.tensor([0, 1, 0, 1])))
    assert not report.applied and engine.ledger.total_steps == 1 and engine.steps_taken == 1
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))


def test_only_user_errors_print_as_user_errors(monkeypatch, capsys):
    """A UserError prints one ``error:`` line; any other exception (a bug) propagates with
    its traceback, even a ValueError."""
    import dptrain.commands.train as command
    from dptrain.errors import UserError

    def raising(err):
        def run(args):
            raise err

        return run

    monkeypatch.setattr(command, "run", raising(UserError("bad input. Fix: this")))
    assert main(["train", "r.yaml"]) == 2
    assert capsys.readouterr().err == "error: bad input. Fix: this\n"
    monkeypatch.setattr(command, "run", raising(ValueError("an internal bug")))
    with pytest.raises(ValueError, match="an internal bug"):
        main(["train", "r.yaml"])
