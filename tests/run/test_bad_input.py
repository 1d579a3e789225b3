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


# -- issue 17: bad input found on the way ---------------------------------------------------


def _notes(tmp_path: Path, n: int = 12) -> Path:
    """A .txt of multi-line notes separated by blank lines (each note one person's record)."""
    notes = [f"Patient {i} seen today.\nComplains of cough {i}.\nPlan: rest." for i in range(n)]
    path = tmp_path / "notes.txt"
    path.write_text("\n\n".join(notes) + "\n")
    return path


def test_txt_paragraph_records_are_not_split_silently(tmp_path, capsys):
    from dptrain.data import load_texts
    from dptrain.data.loading import DataError
    from dptrain.errors import InputWarning

    notes = _notes(tmp_path)
    with pytest.raises(DataError, match=r"paragraphs of several lines.*data\.text_records"):
        load_texts(notes)
    assert len(load_texts(notes, text_records="paragraph")) == 12  # one record per note
    with pytest.warns(InputWarning, match="protected only as a group of its lines"):
        assert len(load_texts(notes, text_records="line")) == 36
    for unambiguous in ("first\nsecond\nthird\n", "first\n\nsecond\n\n\nthird\n"):
        (tmp_path / "lines.txt").write_text(unambiguous)  # no blank line, or no multi-line block
        assert len(load_texts(tmp_path / "lines.txt")) == 3
    err = fails(capsys, "train", str(recipe(tmp_path, data={"path": str(notes)})))
    assert "data.text_records: paragraph" in err and "Traceback" not in err
    d = parse_recipe({**yaml.safe_load(recipe(tmp_path).read_text())})
    assert d.data.text_records is None


@pytest.mark.parametrize(
    ("item", "expected"),
    [
        ("training.steps=[1,2", r"--set 'training.steps=\[1,2'.*not valid YAML"),
        ("=5", r"--set '=5': no key before '='"),
        ("training..steps=5", r"empty part in the key"),
        ("model.name.x=1", r"model\.name is 'tiny-gpt2', not a section"),
        ("training.stpes=5", r"invalid --set for recipe .*training\.stpes: unknown key.*"
         r"Did you mean 'steps'.*\[from --set training\.stpes=5\]"),
    ],
)  # fmt: skip
def test_set_errors_are_blamed_on_set(tmp_path, capsys, item, expected):
    import re

    err = fails(capsys, "train", str(recipe(tmp_path)), "--set", item)
    assert re.search(expected, err, re.S), err
    assert "Traceback" not in err and "ParserError" not in err


def test_no_step_fits_says_nothing_was_spent(tmp_path, capsys):
    path = recipe(tmp_path, policy={"noise_multiplier": 0.05}, privacy={"epsilon": 0.5})
    err = fails(capsys, "train", str(path))
    assert "not even one step fits" in err and "Nothing was spent" in err
    assert "policy.noise_multiplier" in err and "privacy.epsilon" in err
    assert "already spent" not in err and "fresh data" not in err
    assert not (tmp_path / "run").exists()


def test_relative_data_paths_resolve_against_the_recipe(tmp_path, monkeypatch, capsys):
    from dptrain.recipe import load_recipe

    folder = tmp_path / "project"
    folder.mkdir()
    (folder / "notes.jsonl").write_text('{"text": "a"}\n{"text": "b"}\n')
    d = yaml.safe_load(recipe(tmp_path).read_text())
    d["data"]["path"] = "notes.jsonl"
    (folder / "r.yaml").write_text(yaml.safe_dump(d))
    monkeypatch.chdir(tmp_path)  # elsewhere: the recipe's folder decides
    loaded = load_recipe(folder / "r.yaml")
    assert loaded.data.path == str(folder / "notes.jsonl")
    # --set paths are the shell's: relative to the working directory
    assert load_recipe(folder / "r.yaml", ["data.path=project/notes.jsonl"]).data.path == str(
        folder / "notes.jsonl"
    )
    (tmp_path / "other.jsonl").write_text('{"text": "c"}\n')
    d["data"]["path"] = "other.jsonl"  # in the working directory, not beside the recipe
    (folder / "r.yaml").write_text(yaml.safe_dump(d))
    err = fails(capsys, "train", str(folder / "r.yaml"))
    assert f"not found in the recipe's folder {folder}" in err
    assert "exists in the working directory" in err and str(tmp_path / "other.jsonl") in err


def test_json_arrays_are_read_and_bad_json_says_jsonl_expected(tmp_path):
    import json

    from dptrain.data import load_texts
    from dptrain.data.loading import DataError

    array = tmp_path / "records.json"
    array.write_text(json.dumps([{"id": "a", "text": "one"}, {"id": "b", "text": "two"}], indent=2))
    ds = load_texts(array)
    assert ds.texts == ["one", "two"] and ds.ids == ["a", "b"]
    array.write_text('[{"text": "one"},\n {"text": ')
    with pytest.raises(DataError, match=r"records\.json:2: invalid JSON array.*JSONL"):
        load_texts(array)
    lines = tmp_path / "records.jsonl"
    lines.write_text('{"text": "one"}\n{"text": "two",\n')
    with pytest.raises(DataError, match=r"records\.jsonl:2: invalid JSON.*JSONL expected"):
        load_texts(lines)


def test_empty_records_are_dropped_with_a_console_count(tmp_path):
    from dptrain.data import load_texts
    from dptrain.errors import InputWarning

    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "a"}\n{"text": ""}\n{"text": " \\n\\t"}\n{"text": "b"}\n')
    with pytest.warns(InputWarning, match=r"dropped 2 empty or whitespace-only record"):
        assert load_texts(path).texts == ["a", "b"]
    csv = tmp_path / "d.csv"
    csv.write_text("text,id\nhello,1\n   ,2\n")
    with pytest.warns(InputWarning, match="dropped 1"):
        assert load_texts(csv).ids == ["1"]


def test_a_full_disk_during_a_checkpoint_loses_nothing(tmp_path, capsys):
    """A real write failure: the file-size limit (RLIMIT_FSIZE) makes the checkpoint's write
    fail with EFBIG, as a full disk fails with ENOSPC."""
    import resource
    import signal

    path = recipe(
        tmp_path,
        training={"steps": 3, "checkpoint_every": 2},
        policy={"noise_multiplier": 1.0},
    )
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    old = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails instead
    resource.setrlimit(resource.RLIMIT_FSIZE, (16_000, hard))  # checkpoints are ~24 kB
    try:
        code = main(["train", str(path), "--no-progress"])
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "could not write checkpoint step 2" in err and "Nothing was lost" in err
    assert "Traceback" not in err
    # no checkpoint holds the steps the key drew noise for: a resume would start over
    assert "cannot resume" in err and "start a new run in another output_dir" in err
    assert "--resume" not in err
    run = RunDir(tmp_path / "run")
    assert Ledger.load(run.ledger).total_steps == 2  # the ledger covers every step taken
    assert not run.checkpoint_files() and not list(run.path.rglob("*.tmp"))


def test_ctrl_c_names_the_run_directory_and_marks_the_run(tmp_path, capsys):
    import json
    import os
    import signal
    import threading
    import time

    data = tmp_path / "d.jsonl"
    records = [{"text": f"note number {i} about a visit"} for i in range(60)]
    records += [{"text": "  "}, {"text": ""}]
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    path = recipe(
        tmp_path,
        data={"path": str(data), "max_records": None, "validation_fraction": 0.2},
        training={"steps": 500, "checkpoint_every": 1, "batch_size": 4},
        policy={"noise_multiplier": 1.0},
        privacy={"epsilon": float("inf")},
    )
    metrics = tmp_path / "run" / "private" / "metrics.jsonl"

    def interrupt() -> None:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not (
            metrics.exists() and metrics.read_text().count("\n") >= 2
        ):
            time.sleep(0.02)
        os.kill(os.getpid(), signal.SIGINT)

    threading.Thread(target=interrupt, daemon=True).start()
    assert main(["train", str(path), "--no-progress"]) == 130
    err = capsys.readouterr().err
    assert f"dptrain train {path} --resume {tmp_path / 'run'}" in err
    assert "RUN_DIR" not in err
    assert "warning: " in err and "dropped 2 empty" in err  # the console, never the run files
    meta = json.loads((tmp_path / "run" / "run.json").read_text())
    assert meta["status"] == "interrupted"
    assert "dropped" not in json.dumps(meta)


def test_ctrl_c_after_the_last_step_still_names_the_resume(tmp_path, capsys):
    """Ctrl-C while the final model, the samples or the figures are written (after the last
    step) is an interruption like any other: run.json says so and the resume command is given
    (the resume redoes the end of the run)."""
    import json
    import os
    import signal
    import threading
    import time

    path = recipe(
        tmp_path,
        data={"max_records": 64, "max_validation_records": 8},
        training={"steps": 1, "checkpoint_every": 1, "batch_size": 4},
        policy={"noise_multiplier": 1.0},
        privacy={"epsilon": float("inf")},
    )
    d = yaml.safe_load(path.read_text())
    d["generation"] = {"samples": 32, "max_new_tokens": 64}
    path.write_text(yaml.safe_dump(d))
    final = tmp_path / "run" / "final"

    def interrupt() -> None:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not final.exists():
            time.sleep(0.005)
        os.kill(os.getpid(), signal.SIGINT)

    threading.Thread(target=interrupt, daemon=True).start()
    assert main(["train", str(path), "--no-progress"]) == 130
    err = capsys.readouterr().err
    assert f"--resume {tmp_path / 'run'}" in err
    meta = json.loads((tmp_path / "run" / "run.json").read_text())
    assert meta["status"] == "interrupted"


def test_audit_of_a_federated_run_says_what_to_audit(tmp_path, capsys):
    run = tmp_path / "fed"
    run.mkdir()
    (run / "recipe.yaml").write_text((ROOT / "recipes" / "federated_tiny.yaml").read_text())
    (run / "run.json").write_text("{}")
    err = fails(capsys, "audit", str(run))
    assert "is a federated run, not a `dptrain train` run" in err
    assert "dptrain epsilon --run runs/federated_tiny-clients/client-K" in err
    assert "ledger file" not in err and "Traceback" not in err


def test_a_second_run_into_a_busy_directory_is_refused(tmp_path, capsys):
    import signal
    import subprocess
    import sys

    run = RunDir(tmp_path / "run")
    hold = "import sys, time; from dptrain.rundir import RunDir\n"
    hold += "with RunDir(sys.argv[1]).exclusive():\n    print('held', flush=True); time.sleep(60)"
    holder = subprocess.Popen(
        [sys.executable, "-c", hold, str(run.path)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        path = recipe(tmp_path)
        err = fails(capsys, "train", str(path), "--no-progress")
        assert f"in use by another dptrain process (pid {holder.pid})" in err
        assert "choose another output_dir" in err
        assert not run.started() and not run.key.exists()  # nothing written, nothing lost
        err = fails(capsys, "train", str(path), "--resume", str(run.path), "--no-progress")
        assert "in use by another dptrain process" in err
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with run.exclusive():  # the kernel dropped the killed holder's lock: .lock is not stale
        assert run.lock_file.read_text().strip() == str(__import__("os").getpid())


def test_duplicate_texts_are_kept_with_a_group_privacy_warning(tmp_path):
    from dptrain.data import load_texts
    from dptrain.errors import InputWarning

    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "a"}\n{"text": "b"}\n{"text": "a"}\n{"text": "a"}\n')
    with pytest.warns(InputWarning, match=r"2 record\(s\) repeat .*up to 3 copies"):
        ds = load_texts(path)
    assert ds.texts == ["a", "b", "a", "a"] and len(set(ds.ids)) == 4
