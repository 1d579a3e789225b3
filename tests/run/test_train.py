"""Whole runs of the tiny recipe: run directory, resume after SIGKILL, budget stop, bad input."""

from __future__ import annotations

import json
import math
import shutil
import stat
from pathlib import Path

import pytest
import torch
import yaml

from accountants import Ledger, get_accountant
from dptrain.cli import main
from dptrain.recipe import load_recipe
from dptrain.rundir import RunDir
from dptrain.secret import RunKey

ROOT = Path(__file__).resolve().parents[2]


def tiny(tmp_path: Path, name: str = "r", **sections) -> Path:
    d = yaml.safe_load((ROOT / "recipes" / "tiny.yaml").read_text())
    d["lora"] = {"r": 2, "alpha": 4, "target_modules": ["c_attn"]}
    d["output_dir"] = str(tmp_path / name)
    for section, values in sections.items():
        d[section].update(values)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(d))
    return path


def test_train_writes_a_complete_run_dir(tmp_path, capsys):
    recipe = tiny(tmp_path)
    assert main(["train", str(recipe), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert (
        "privacy guarantee" in out and "accountant          rdp" in out and "val perplexity" in out
    )
    run = RunDir(tmp_path / "r")
    meta = run.read_meta()
    assert meta["status"] == "finished" and meta["steps"] == 8
    assert 0 < meta["epsilon"] <= 8.0
    assert meta["guarantee_accountant"] == "rdp"
    assert meta["epsilon_composition"] == "exact composition of the ledger"
    assert "AES-256" in meta["noise_generator"] and meta["insecure_seed"] is None
    assert meta["delta_total"] == meta["delta"] + meta["delta_noise_truncation"]
    assert 0 < meta["delta_noise_truncation"] < 1e-30 and meta["noise_pairs"] > 0
    # data.max_records keeps a count (400 of the corpus): file-level neighbours may differ by 2
    # training records, so the file-level guarantee is group privacy over 2
    eps, level = meta["epsilon"], meta["file_level"]
    assert level["epsilon"] == 2 * eps
    assert level["delta"] == pytest.approx((1 + math.exp(eps)) * meta["delta_total"])
    assert f"file-level          ({2 * eps:.4f}," in out
    vacuous = level["delta"] * meta["dataset_size"] >= 1  # the summary says when it is
    assert ("WARNING: that delta is at least 1/N" in out) is vacuous
    assert level["validation_probability"] == 0.05 and "private/" in level["why"]
    # run.json holds no un-noised statistic of private records: they are in private/
    private = {"perplexity_before", "perplexity_after", "validation_size", "truncated_records"}
    private |= {"validation_before", "validation_after"}
    assert not private & set(meta) and "nonfinite_samples" not in meta
    stats = run.read_stats()
    assert "train_seconds" not in meta and stats["train_seconds"] > 0  # follows batch sizes
    assert set(stats) == private | {
        "nonfinite_samples",
        "train_seconds",
        "per_sample_gradients_errors",
    }
    assert stats["per_sample_gradients_errors"] == []  # no batching fallback on tiny GPT-2
    assert stats["validation_size"] == 32
    assert math.isfinite(stats["perplexity_before"]) and math.isfinite(stats["perplexity_after"])
    assert f"{stats['perplexity_before']:.3f} -> {stats['perplexity_after']:.3f} (private" in out
    assert run.metrics == run.path / "private" / "metrics.jsonl"
    assert stat.S_IMODE(run.private.stat().st_mode) == 0o700
    readme = run.readme.read_text()
    for name in ("run.json", "ledger.json", "final/", "secret.key", "private/", "checkpoints/"):
        assert name in readme
    assert "publishable         recipe.yaml, run.json, ledger.json, final/" in out
    # the figures (matplotlib is installed here): public from the ledger, private from metrics
    assert f"figures             {run.path / 'report' / 'privacy.png'} (public), " in out
    assert (run.path / "report" / "privacy.png").stat().st_size > 0
    assert (run.private / "training.png").stat().st_size > 0
    assert RunKey.read(run.key).used  # marked before the first step drew from it
    ledger = Ledger.load(run.ledger)
    assert ledger.total_steps == 8
    assert get_accountant("rdp").epsilon(ledger.events, meta["delta"]) == pytest.approx(
        meta["epsilon"]
    )
    assert len(run.read_metrics()) == 8
    assert run.checkpoint_files()
    # the final adapter loads with peft
    from peft import PeftModel

    from dptrain.models import load_model_and_tokenizer

    base, _ = load_model_and_tokenizer("tiny-gpt2")
    model = PeftModel.from_pretrained(base, run.final)
    state = torch.load(run.checkpoint_files()[-1], weights_only=True)["model"]
    loaded = dict(model.named_parameters())
    for name, value in state.items():
        assert torch.equal(loaded[name].detach(), value), name
    # dptrain epsilon --run reads the ledger
    assert main(["epsilon", "--run", str(run.path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["epsilon"] == pytest.approx(meta["epsilon"])
    assert report["delta_total"] == pytest.approx(meta["delta_total"]) and report["guarantee"]


def test_budget_stops_the_run_cleanly(tmp_path, capsys):
    recipe = tiny(
        tmp_path,
        policy={"noise_multiplier": 1.0},
        privacy={"epsilon": 2.0},
        training={"steps": 500},
    )
    assert main(["train", str(recipe), "--no-progress"]) == 0
    meta = RunDir(tmp_path / "r").read_meta()
    assert meta["stopped_by_budget"] and meta["steps"] < 500
    assert meta["epsilon"] <= 2.0
    assert "the budget fits" in capsys.readouterr().err
    # resuming a spent run is refused before the model is loaded
    assert main(["train", str(recipe), "--resume", str(tmp_path / "r")]) == 2
    assert "already spent" in capsys.readouterr().err


def test_resuming_a_complete_run_says_so_and_does_nothing(tmp_path, capsys):
    from dptrain.train import train

    # calibrated noise: the budget is spent at the last step; no cross-check (seconds of PRV)
    recipe = tiny(tmp_path, training={"steps": 1}, data={"max_records": 100})
    train(load_recipe(recipe), progress=False, cross_check=False)
    run = RunDir(tmp_path / "r")
    files = {f: f.read_bytes() for f in (run.path / "run.json", run.ledger)}
    capsys.readouterr()
    assert main(["train", str(recipe), "--resume", str(run.path), "--no-progress"]) == 0
    out, err = capsys.readouterr()
    assert (
        "run complete" in out
        and "1 steps taken (1 planned)" in out
        and f"final model in {run.final}" in out
    )
    assert "already spent" not in err and "loading model" not in err  # no model, no work
    assert all(f.read_bytes() == b for f, b in files.items())
    # every step taken but final/ never written (a crash): the resume writes it, takes no step
    shutil.rmtree(run.final)
    run.update_meta(status="running")
    assert main(["train", str(recipe), "--resume", str(run.path), "--no-progress"]) == 0
    assert (run.final / "adapter_config.json").exists() and run.read_meta()["steps"] == 1
    assert run.ledger.read_bytes() == files[run.ledger]
    assert "already spent" not in capsys.readouterr().err


def test_existing_run_and_different_recipe_are_refused(tmp_path, capsys):
    recipe = tiny(tmp_path, training={"steps": 2})
    assert main(["train", str(recipe), "--no-progress"]) == 0
    assert main(["train", str(recipe), "--no-progress"]) == 2
    assert "--resume" in capsys.readouterr().err
    other = tiny(tmp_path, "other", training={"lr": 0.5, "steps": 5})  # steps may differ
    assert main(["train", str(other), "--resume", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "these keys must match to resume: training.lr: 0.003 -> 0.5. Fix:" in err
    assert "training.steps:" not in err and "--resume" in err
    # the fix it names, the run's own recipe.yaml, is the run's recipe
    run = RunDir(tmp_path / "r")
    assert load_recipe(run.recipe).fingerprint() == run.read_meta()["fingerprint"]
    # the key has drawn two steps' coins and noise: never again from step 0 (without final/,
    # the run is not complete: a resume would need the checkpoint)
    shutil.rmtree(run.checkpoints)
    shutil.rmtree(run.final)
    assert main(["train", str(recipe), "--resume", str(run.path), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "has no checkpoint left" in err and "would repeat that noise" in err
    for f in run.path.iterdir():  # everything but the key deleted
        if f != run.key:
            shutil.rmtree(f) if f.is_dir() else f.unlink()
    assert main(["train", str(recipe), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "holds no run any more" in err and "start a new run in a fresh directory" in err
    # a key that never drew anything (a run stopped before its first step) is used as is
    fresh = tmp_path / "fresh"
    unused = RunKey.generate().write(fresh / "secret.key")
    assert main(["train", str(recipe), "--output", str(fresh), "--no-progress"]) == 0
    assert RunKey.read(unused).used


def test_corrupt_checkpoint_falls_back_or_fails_clearly(tmp_path, capsys):
    recipe = tiny(
        tmp_path, training={"steps": 8, "checkpoint_every": 2}, policy={"noise_multiplier": 1.0}
    )
    assert main(["train", str(recipe), "--no-progress"]) == 0
    run = RunDir(tmp_path / "r")
    files = run.checkpoint_files()
    files[-1].write_bytes(b"garbage")
    state = run.load_checkpoint()
    assert state["step"] == int(files[0].stem.split("-")[1])
    for f in files:
        f.write_bytes(b"garbage")
    assert (
        main(["train", str(recipe), "--resume", str(run.path), "--set", "training.steps=10"]) == 2
    )
    assert "corrupted or not a checkpoint" in capsys.readouterr().err
