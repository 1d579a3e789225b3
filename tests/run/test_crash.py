"""Crash safety: SIGKILL at random points, over and over, never loses or under-reports privacy
state, never leaves a half-written checkpoint, and the resumed run equals an uninterrupted one."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

from accountants import Ledger
from dptrain.recipe import parse_recipe
from dptrain.rundir import RunDir, atomic_write, load_checkpoint_file
from dptrain.train import train
from tests._support import share_key

ROOT = Path(__file__).resolve().parents[2]
STEPS = 16


def recipe_file(tmp_path: Path, name: str) -> Path:
    d = yaml.safe_load(
        (ROOT / "recipes" / "tiny.yaml").read_text()
    )  # full fine-tuning: big checkpoints
    d["output_dir"] = str(tmp_path / name)
    d["training"].update(steps=STEPS, checkpoint_every=1)
    d["policy"]["noise_multiplier"] = 1.0
    d["privacy"]["epsilon"] = 100.0
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(d))
    return path


def check_invariants(run: RunDir) -> int:
    """Every checkpoint on disk is whole and covered by the ledger on disk; returns the newest step."""
    newest = 0
    for f in run.checkpoint_files():
        state = load_checkpoint_file(f)  # raises if half-written
        assert Ledger.from_dict(state["engine"]["ledger"]).total_steps == state["step"]
        newest = max(newest, state["step"])
    if run.ledger.exists():
        assert Ledger.load(run.ledger).total_steps >= newest, (
            "a saved model is not covered by the ledger"
        )
    return newest


def test_repeated_sigkill_at_random_points(tmp_path):
    rng = random.Random(7)
    path = recipe_file(tmp_path, "killed")
    run = RunDir(tmp_path / "killed")
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    kills = 0
    for _ in range(5):
        cmd = [sys.executable, "-m", "dptrain.cli", "train", str(path), "--no-progress"]
        if run.exists():
            cmd += ["--resume", str(run.path)]
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        seen = len(run.read_metrics())
        wait_for = rng.randint(2, 5)
        deadline = time.time() + 120
        while proc.poll() is None and time.time() < deadline:
            if len(run.read_metrics()) >= seen + wait_for:
                time.sleep(rng.uniform(0.0, 0.15))  # land anywhere: mid-step, mid-checkpoint
                proc.send_signal(signal.SIGKILL)
                kills += 1
                break
            time.sleep(0.005)
        proc.wait()
        check_invariants(run)
        if run.exists() and run.read_meta().get("status") == "finished":
            break
    assert kills >= 2
    if run.read_meta().get("status") != "finished":
        train(parse_recipe(yaml.safe_load(path.read_text())), run.path, resume=True, progress=False)
    check_invariants(run)
    assert not list(run.path.rglob(".*.tmp")), (
        "partial files of killed writes are cleaned on resume"
    )

    whole = recipe_file(tmp_path, "whole")
    share_key(run.path, tmp_path / "whole")  # an uninterrupted run with the same secret key
    train(parse_recipe(yaml.safe_load(whole.read_text())), progress=False)
    ref = RunDir(tmp_path / "whole")
    assert Ledger.load(run.ledger).to_dict() == Ledger.load(ref.ledger).to_dict()
    a = load_checkpoint_file(run.checkpoint_files()[-1])
    b = load_checkpoint_file(ref.checkpoint_files()[-1])
    assert a["step"] == b["step"] == STEPS
    assert all(
        torch.equal(a["model"][k], b["model"][k]) for k in b["model"]
    )  # same sampler and noise streams
    assert [m["step"] for m in run.read_metrics()] == list(range(1, STEPS + 1))


KILL_MID_WRITE = """
import os, signal, sys
from pathlib import Path
from dptrain.rundir import atomic_write
def write(f):
    f.write(b"x" * 1000)
    f.flush()
    os.kill(os.getpid(), signal.SIGKILL)   # dies half-way through the new content
atomic_write(Path(sys.argv[1]), write, binary=True)
"""


def test_kill_inside_an_atomic_write_keeps_the_old_file(tmp_path):
    target = tmp_path / "step-00000001.pt"
    atomic_write(target, lambda f: f.write(b"old content"), binary=True)
    proc = subprocess.run([sys.executable, "-c", KILL_MID_WRITE, str(target)], check=False)
    assert proc.returncode == -signal.SIGKILL
    assert target.read_bytes() == b"old content"
    assert [p.name for p in tmp_path.iterdir() if not p.name.startswith(".")] == [target.name]
