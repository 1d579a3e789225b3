"""The attacker of issue 12: knows the code, recipe.yaml and run.json -- everything but the run
key -- and retrains on D and on D + z to match the released model.  These tests check that the
key is the only secret needed, that it is kept, and that a run stays resumable."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest
import torch
import yaml

from dptrain.cli import main
from dptrain.data import load_texts
from dptrain.data.splits import read_public, split_data
from dptrain.recipe import parse_recipe
from dptrain.rundir import CheckpointError, RunDir
from dptrain.secret import KEY_FILE, RunKey
from dptrain.train import train
from tests._support import share_key

ROOT = Path(__file__).resolve().parents[2]


def data_file(tmp_path: Path, name: str, n: int, extra: str | None = None) -> Path:
    """``n`` records of the bundled corpus (with their ids), plus ``extra`` in the middle."""
    full = load_texts("bundled:clinic_notes")
    rows = [{"id": full.ids[i], "text": full.texts[i]} for i in range(n)]
    if extra is not None:
        rows.insert(n // 2, {"id": "added-z", "text": extra})
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def recipe(tmp_path: Path, out: str, data: Path, **privacy) -> dict:
    d = yaml.safe_load((ROOT / "recipes" / "tiny.yaml").read_text())
    d["lora"] = {"r": 2, "alpha": 4, "target_modules": ["c_attn"]}
    d["output_dir"] = str(tmp_path / out)
    d["data"] = {"path": str(data), "max_length": 32, "validation_fraction": 0.2}
    d["training"].update(steps=3, sample_rate=1.0, batch_size=None, checkpoint_every=3)
    d["policy"]["noise_multiplier"] = 1.0
    d["privacy"].update(epsilon=1e3, delta=1e-3, **privacy)
    return d


def released(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(RunDir(run).checkpoint_files()[-1], weights_only=True)["model"]


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


def test_retraining_with_the_public_recipe_does_not_reproduce_the_model(tmp_path, capsys):
    """With every record in each batch (q = 1: no coins), two runs of one recipe on one dataset
    differ only by their noise; without the key, neither D nor D + z reproduces the release.
    The control shows the check has power: with privacy.insecure_seed, replay is exact."""
    d = data_file(tmp_path, "d.jsonl", 40)
    dz = data_file(tmp_path, "dz.jsonl", 40, extra="The secret code of Z is 123456.")
    train(parse_recipe(recipe(tmp_path, "victim", d)), progress=False)
    model = released(tmp_path / "victim")
    # the attacker's input: the released run's own recipe.yaml and run.json
    public = yaml.safe_load((tmp_path / "victim" / "recipe.yaml").read_text())
    meta = json.loads((tmp_path / "victim" / "run.json").read_text())
    assert meta["insecure_seed"] is None and "secret run key" in meta["randomness"]
    for name, path in (("on-d", d), ("on-dz", dz)):
        public.update(output_dir=str(tmp_path / name))
        public["data"]["path"] = str(path)
        train(parse_recipe(public), progress=False)
    assert not same(model, released(tmp_path / "on-d"))  # two runs: different noise
    assert not same(model, released(tmp_path / "on-dz"))
    noise = torch.cat([(model[k] - released(tmp_path / "on-d")[k]).flatten() for k in model])
    assert noise.abs().mean() > 1e-4  # noise-sized, not float rounding

    # control: a reproducible run is replayed bit for bit (and says it is not private)
    for name in ("seeded-a", "seeded-b"):
        train(parse_recipe(recipe(tmp_path, name, d, insecure_seed=5)), progress=False)
    assert same(released(tmp_path / "seeded-a"), released(tmp_path / "seeded-b"))
    seeded = RunDir(tmp_path / "seeded-a").read_meta()
    assert seeded["insecure_seed"] == 5 and "NO privacy guarantee" in seeded["randomness"]
    assert "NO guarantee" in seeded["guarantee"]
    assert not (tmp_path / "seeded-a" / KEY_FILE).exists()
    capsys.readouterr()
    assert main(["epsilon", "--run", str(tmp_path / "seeded-a"), "--json"]) == 0
    out = capsys.readouterr()
    report = json.loads(out.out)
    assert report["insecure_seed"] == 5 and report["guarantee"] is False
    assert "NO privacy guarantee" in out.err


def test_key_is_0600_and_in_no_other_file_of_the_run(tmp_path, capsys, monkeypatch):
    import dptrain.data.canaries as canaries
    import dptrain.train as train_module

    drawn = []
    make = canaries.make_canaries

    def counting(config, key, **unit):
        drawn.append(key.key_id)
        return make(config, key, **unit)

    for module in (canaries, train_module):
        monkeypatch.setattr(module, "make_canaries", counting)
    d = recipe(tmp_path, "run", data_file(tmp_path, "d.jsonl", 40))
    d["data"]["canaries"] = {"repetitions": {1: 4, 2: 1}}
    d["training"]["checkpoint_every"] = 1
    train(parse_recipe(d), progress=True)
    assert len(drawn) == 1  # inserted and written to the manifest from one draw
    out = capsys.readouterr()
    run = tmp_path / "run"
    path = run / KEY_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    raw = bytes.fromhex(path.read_bytes().split(b"\n")[1].decode())
    needles = [raw, raw.hex().encode(), raw.hex().upper().encode()]
    needles += [RunKey.read(path).derive(p) for p in ("coins", "noise", "canaries")]
    files = [f for f in run.rglob("*") if f.is_file() and f != path]
    assert len(files) >= 8 and any("checkpoints" in str(f) for f in files)
    for f in files:
        content = f.read_bytes()
        assert not any(n in content for n in needles), f"key material in {f}"
    logs = (out.out + out.err).encode()
    assert not any(n in logs for n in needles)
    manifest = run / "canaries.secret.json"
    assert stat.S_IMODE(manifest.stat().st_mode) == 0o600


def test_resume_restores_the_key_and_equals_an_uninterrupted_run(tmp_path):
    d = recipe(tmp_path, "cut", data_file(tmp_path, "d.jsonl", 40))
    d["training"].update(steps=4, checkpoint_every=1, sample_rate=0.3)
    train(parse_recipe(d), progress=False, max_steps_this_session=2)
    train(parse_recipe(d), tmp_path / "cut", resume=True, progress=False)
    share_key(tmp_path / "cut", tmp_path / "whole")
    d["output_dir"] = str(tmp_path / "whole")
    train(parse_recipe(d), progress=False)
    assert same(released(tmp_path / "cut"), released(tmp_path / "whole"))
    a, b = RunDir(tmp_path / "cut").read_meta(), RunDir(tmp_path / "whole").read_meta()
    assert a["noise_pairs"] == b["noise_pairs"] and a["delta_total"] == b["delta_total"]
    # the private statistics continue across the resume as well
    a, b = RunDir(tmp_path / "cut").read_stats(), RunDir(tmp_path / "whole").read_stats()
    assert a.pop("train_seconds") > 0 and b.pop("train_seconds") > 0  # wall clock: differs
    assert a == b and set(a) >= {"perplexity_before", "perplexity_after", "nonfinite_samples"}
    # without its key a run cannot continue, and says how to fix it
    d["training"]["steps"] = 6
    d["output_dir"] = str(tmp_path / "cut")
    (tmp_path / "cut" / KEY_FILE).unlink()
    with pytest.raises(CheckpointError, match="restore the file"):
        train(parse_recipe(d), tmp_path / "cut", resume=True, progress=False)


def test_a_record_added_to_the_file_changes_the_training_set_by_that_record_only(tmp_path):
    """Validation and public splits are per-record keyed decisions: neighbouring files give
    private training sets (and validation sets) that differ by at most the added record."""
    d = data_file(tmp_path, "d.jsonl", 300)
    dz = data_file(tmp_path, "dz.jsonl", 300, extra="one more note")
    key = RunKey.generate()
    for public in (None, 0.1):
        parts = []
        for path in (d, dz):
            r = recipe(tmp_path, "x", path)
            r["data"]["public_fraction"] = public
            r = parse_recipe(r)
            train_set, val, _ = split_data(r, key)
            private, pub = read_public(r, train_set, key)
            parts.append((set(private.ids), set(val.ids), set(pub.ids) if pub else set()))
        for a, b in zip(*parts, strict=True):
            assert b - {"added-z"} == a
