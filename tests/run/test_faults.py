"""Faults at exact points of a run, in-process and deterministic: the disk fills up (ENOSPC)
in the middle of a checkpoint's or the ledger's atomic write, or the process crashes between
the ledger and the checkpoint, or between a checkpoint and the resume's metrics truncation.
Each fault leaves what was on disk whole (the ledger covering every saved model, no temporary
file after the resume), and the resumed run ends exactly where an uninterrupted run with the
same key does."""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

import accountants
import accountants.ledger
from accountants import Ledger
from dptrain.cli import main
from dptrain.errors import USER_ERROR_EXIT
from dptrain.recipe import parse_recipe
from dptrain.rundir import RunDir, load_checkpoint_file
from dptrain.secret import KEY_FILE, RunKey
from dptrain.train import train
from tests._support import share_key
from tests.run.test_crash import check_invariants

ROOT = Path(__file__).resolve().parents[2]
STEPS = 3


def recipe_file(root: Path, name: str, log_every: int = 1) -> Path:
    """The smallest run with a checkpoint after every step (a second per run)."""
    d = yaml.safe_load((ROOT / "recipes" / "tiny.yaml").read_text())
    d["model"]["name"] = "tiny-gpt2:n_layer=1,n_embd=16,n_head=2"
    d["lora"] = {"r": 2, "alpha": 4, "target_modules": ["c_attn"]}
    d["output_dir"] = str(root / name)
    d["data"].update(max_length=16, max_records=64, max_validation_records=4)
    d["training"].update(
        steps=STEPS, checkpoint_every=1, log_every=log_every, batch_size=4, physical_batch_size=4
    )
    d["policy"]["noise_multiplier"] = 1.0
    d["generation"] = {"samples": 0}
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(d))
    return path


def run_recipe(path: Path, *, resume: bool = False) -> Any:
    recipe = parse_recipe(yaml.safe_load(path.read_text()))
    run_dir = recipe.output_dir if resume else None
    return train(recipe, run_dir, resume=resume, progress=False, cross_check=False)


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Any:
    """The runs here are tiny: on one torch thread they take a fraction of the time they take
    on two threads of a busy machine."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, RunDir]:
    """An unused run key (in ``key/``) and the uninterrupted run drawn with it."""
    root = tmp_path_factory.mktemp("reference")
    (root / "key").mkdir()
    RunKey.generate().write(root / "key" / KEY_FILE)
    share_key(root / "key", root / "whole")
    run_recipe(recipe_file(root, "whole"))
    return root / "key", RunDir(root / "whole")


def fresh_run(tmp_path: Path, key: Path, log_every: int = 1) -> tuple[Path, RunDir]:
    path = recipe_file(tmp_path, "run", log_every)
    share_key(key, tmp_path / "run")
    return path, RunDir(tmp_path / "run")


def assert_same_as_uninterrupted(run: RunDir, ref: RunDir, log_every: int = 1) -> None:
    check_invariants(run)
    assert not list(run.path.rglob(".*.tmp")), "no temporary file is left after the resume"
    assert run.read_meta()["status"] == "finished"
    assert Ledger.load(run.ledger).to_dict() == Ledger.load(ref.ledger).to_dict()
    a = load_checkpoint_file(run.checkpoint_files()[-1])
    b = load_checkpoint_file(ref.checkpoint_files()[-1])
    assert a["step"] == b["step"] == STEPS
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in b["model"])
    logged = {m["step"]: m["loss"] for m in ref.read_metrics()}  # every step
    steps = [m["step"] for m in run.read_metrics()]
    assert steps == [s for s in logged if s % log_every == 0 or s == STEPS]  # each once
    assert [m["loss"] for m in run.read_metrics()] == [logged[s] for s in steps]


# -- a full disk ---------------------------------------------------------------------------


class _Filling:
    """A file on a disk with ``room`` bytes left: the write that does not fit stores what
    fits, then fails with ENOSPC (as ``write(2)`` does)."""

    def __init__(self, f: Any, room: int) -> None:
        self.f, self.room = f, room

    def write(self, data: Any) -> int:
        if len(data) > self.room:
            self.f.write(data[: self.room])
            self.room = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(data)
        return self.f.write(data)

    def __enter__(self) -> _Filling:
        return self

    def __exit__(self, *exc: object) -> None:
        self.f.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.f, name)


class FullDisk:
    """``os`` as :func:`accountants.ledger.atomic_write` (every run-directory writer) sees it:
    the disk fills up during the ``nth`` atomic write of a file named ``name``, after ``room``
    bytes of its temporary file."""

    def __init__(self, name: str, nth: int, room: int = 100) -> None:
        self.name, self.nth, self.room, self.seen = name, nth, room, 0

    def __getattr__(self, attr: str) -> Any:
        return getattr(os, attr)

    def fdopen(self, fd: int, *args: Any, **kw: Any) -> Any:
        f = os.fdopen(fd, *args, **kw)
        if Path(os.readlink(f"/proc/self/fd/{fd}")).name.startswith(f".{self.name}."):
            self.seen += 1
            if self.seen == self.nth:
                return _Filling(f, self.room)
        return f


# ledger.json is written by begin_meta (1), then at each logged step and each checkpoint:
# logging every step, step 1's are writes 2 and 3, step 2's 4 and 5; logging only the last
# step, step 2's checkpoint writes the 3rd (the only write of a ledger covering step 2)
@pytest.mark.parametrize(
    ("name", "nth", "log_every", "what"),
    [
        ("step-00000002.pt", 1, 1, "checkpoint step 2"),
        ("ledger.json", 4, 1, "the ledger (ledger.json)"),  # step 2's log line
        ("ledger.json", 5, 1, "the ledger (ledger.json)"),  # step 2's checkpoint
        ("ledger.json", 3, 10, "the ledger (ledger.json)"),  # step 2's checkpoint, unlogged
    ],
    ids=["checkpoint", "ledger-at-log", "ledger-at-checkpoint", "ledger-at-checkpoint-only"],
)
def test_a_full_disk_mid_write_loses_nothing_and_resumes_to_the_same_run(
    tmp_path, capsys, monkeypatch, reference, name, nth, log_every, what
):
    key, ref = reference
    path, run = fresh_run(tmp_path, key, log_every)
    disk = FullDisk(name, nth)
    with monkeypatch.context() as m:
        m.setattr(accountants.ledger, "os", disk)
        code = main(["train", str(path), "--no-progress"])
    err = capsys.readouterr().err
    assert disk.seen == nth, "the fault was injected"
    assert code == USER_ERROR_EXIT, err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]  # one line: what failed, why, and the fix
    assert last.startswith(f"error: could not write {what} in {run.path} (OSError: [Errno 28]")
    assert "Fix: free disk space" in last
    assert last.endswith(f"`dptrain train {path} --resume {run.path}`")
    assert check_invariants(run) == 1  # step 1's checkpoint, loadable, under the ledger
    assert not list(run.path.rglob(".*.tmp")), "the failed write removed its temporary file"

    run_recipe(path, resume=True)
    assert_same_as_uninterrupted(run, ref, log_every)


def test_a_full_disk_before_the_first_checkpoint_says_to_start_anew(
    tmp_path, capsys, monkeypatch, reference
):
    """The key has drawn step 1's noise but no checkpoint holds it: a resume would start over
    with a used key (refused), so the error says to start a new run instead."""
    key, _ = reference
    path, run = fresh_run(tmp_path, key)
    with monkeypatch.context() as m:
        m.setattr(accountants.ledger, "os", FullDisk("step-00000001.pt", 1))
        code = main(["train", str(path), "--no-progress"])
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == USER_ERROR_EXIT
    assert "no checkpoint was written yet" in last and "--resume" not in last
    assert "start a new run in another output_dir" in last
    resume = ["train", str(path), "--no-progress", "--resume", str(run.path)]
    assert main(resume) == USER_ERROR_EXIT
    assert "has already drawn coins and noise" in capsys.readouterr().err


# -- a crash between two writes -------------------------------------------------------------


class Crash(Exception):
    """The process dies here (any exception that is not a user error)."""


def crash_once(
    monkeypatch: pytest.MonkeyPatch,
    method: str,
    *,
    after: bool,
    at_call: int,
    error: type[BaseException] = Crash,
) -> list[int]:
    """Make ``RunDir.<method>``'s ``at_call``-th call raise ``error``, before it does its work
    or ``after``; returns the calls seen."""
    real = getattr(RunDir, method)
    calls: list[int] = []

    def faulty(self: RunDir, *args: Any, **kw: Any) -> Any:
        calls.append(1)
        if len(calls) == at_call and not after:
            raise error(method)
        out = real(self, *args, **kw)
        if len(calls) == at_call:
            raise error(method)
        return out

    monkeypatch.setattr(RunDir, method, faulty)
    return calls


@pytest.mark.parametrize("error", [Crash, KeyboardInterrupt], ids=["crash", "ctrl-c"])
def test_a_crash_between_the_ledger_and_the_checkpoint(tmp_path, monkeypatch, reference, error):
    """Step 2's ledger is on disk, its checkpoint is not: the ledger covers more steps than
    any model (never fewer), and the resume replays step 2 with the same coins and noise."""
    key, ref = reference
    path, run = fresh_run(tmp_path, key)
    with monkeypatch.context() as m:
        calls = crash_once(m, "save_checkpoint", after=False, at_call=2, error=error)
        with pytest.raises(error):
            run_recipe(path)
    assert len(calls) == 2
    assert check_invariants(run) == 1
    assert Ledger.load(run.ledger).total_steps == 2
    assert [m["step"] for m in run.read_metrics()] == [1, 2]
    if error is KeyboardInterrupt:
        assert run.read_meta()["status"] == "interrupted"
    run_recipe(path, resume=True)
    assert_same_as_uninterrupted(run, ref)


def test_a_crash_after_a_checkpoint_and_before_the_resume_truncates_the_metrics(
    tmp_path, monkeypatch, reference
):
    """Step 2 is logged and its checkpoint fails (crash); the first resume crashes after
    restoring checkpoint 1 but before dropping step 2's metrics line; a second resume
    still logs each step once, and ends as the uninterrupted run."""
    key, ref = reference
    path, run = fresh_run(tmp_path, key)
    with monkeypatch.context() as m:
        crash_once(m, "save_checkpoint", after=False, at_call=2)
        with pytest.raises(Crash):
            run_recipe(path)
    with monkeypatch.context() as m:
        calls = crash_once(m, "truncate_metrics", after=False, at_call=1)
        with pytest.raises(Crash):
            run_recipe(path, resume=True)
    assert len(calls) == 1
    assert check_invariants(run) == 1
    assert [m["step"] for m in run.read_metrics()] == [1, 2]  # step 2: beyond the checkpoint
    with monkeypatch.context() as m:  # and right after a checkpoint is written (step 2's)
        calls = crash_once(m, "save_checkpoint", after=True, at_call=1)
        with pytest.raises(Crash):
            run_recipe(path, resume=True)
    assert check_invariants(run) == 2
    assert [m["step"] for m in run.read_metrics()] == [1, 2]
    run_recipe(path, resume=True)
    assert_same_as_uninterrupted(run, ref)


def test_a_resume_restores_the_noise_and_never_calibrates(tmp_path, capsys, reference, monkeypatch):
    """The resume takes run.json's sigma as is: no calibration runs (counted through
    ``accountants.calibrate_noise``, which the static policy's ``calibrate`` calls), none is
    logged, and the resumed steps are charged at that sigma."""
    key, _ = reference
    path, run = fresh_run(tmp_path, key)
    d = yaml.safe_load(path.read_text())
    d["policy"]["noise_multiplier"] = None  # calibrated for the budget
    path.write_text(yaml.safe_dump(d))
    calls: list[tuple] = []
    real = accountants.calibrate_noise

    def counted(*args: Any, **kw: Any) -> float:
        calls.append(args)
        return real(*args, **kw)

    monkeypatch.setattr(accountants, "calibrate_noise", counted)
    train(parse_recipe(d), progress=False, cross_check=False, max_steps_this_session=1)
    first = capsys.readouterr().err
    sigma = run.read_meta()["calibrated_noise_multiplier"]
    assert len(calls) == 1 and f"calibrated noise multiplier {sigma:.4f}" in first
    train(
        parse_recipe(d),
        run.path,
        resume=True,
        progress=False,
        cross_check=False,
        max_steps_this_session=1,
    )
    again = capsys.readouterr().err
    assert len(calls) == 1, "the resume calibrated the noise again"
    assert "calibrated noise multiplier" not in again
    assert not [line for line in again.splitlines() if line.startswith("calibrat")]
    assert f"restored noise multiplier {sigma:.4f} (from run.json" in again
    events = Ledger.load(run.ledger).events
    assert sum(e.steps for e in events) == 2
    # both sessions charge one mechanism: sigma's noise std over the clip (sigma C / C, to
    # the last bit of that division)
    (charged,) = {e.noise_multiplier for e in events}
    assert charged == pytest.approx(sigma, rel=1e-15)
    assert run.read_meta()["calibrated_noise_multiplier"] == sigma
