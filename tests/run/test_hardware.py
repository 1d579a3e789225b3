"""training.device on a machine without CUDA: resolution, refusals, moves, noise, checkpoints."""

from __future__ import annotations

import pytest
import torch

from dptrain.errors import RecipeError
from dptrain.hardware import module_device, resolve_device, to_device
from dptrain.noise import GaussianNoise
from dptrain.recipe import parse_recipe
from dptrain.rundir import RunDir, load_checkpoint_file
from dptrain.secret import RunKey
from tests.run.test_train import tiny


def _no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def _gpus(monkeypatch, count: int):
    """Pretend ``count`` GPUs exist, to test the index logic only (nothing is placed on them)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)


def test_cpu_and_auto_without_cuda(monkeypatch):
    _no_cuda(monkeypatch)
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device(" AUTO ") == torch.device("cpu")


@pytest.mark.parametrize("spec", ["cuda", "cuda:0", "cuda:1"])
def test_cuda_without_cuda_names_the_fix(monkeypatch, spec):
    _no_cuda(monkeypatch)
    with pytest.raises(RecipeError, match=r"training.device.*no usable CUDA.*Fix: set training"):
        resolve_device(spec)


def test_bad_spec_and_missing_gpu_index(monkeypatch):
    with pytest.raises(RecipeError, match="not a device"):
        resolve_device("gpu")
    _gpus(monkeypatch, 2)
    assert resolve_device("auto") == torch.device("cuda", 0)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(RecipeError, match=r"cuda:2 does not exist .*2 CUDA device"):
        resolve_device("cuda:2")


def test_each_rank_takes_its_local_gpu(monkeypatch):
    _gpus(monkeypatch, 2)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert resolve_device("cuda") == torch.device("cuda", 1)
    assert resolve_device("auto") == torch.device("cuda", 1)
    with pytest.raises(RecipeError, match="same GPU"):
        resolve_device("cuda:0")
    monkeypatch.setenv("LOCAL_RANK", "2")  # --nproc 3 on 2 GPUs
    with pytest.raises(RecipeError, match="fewer --nproc"):
        resolve_device("cuda")


def test_recipe_validates_device_and_keeps_fingerprints(tmp_path):
    import yaml

    d = yaml.safe_load(tiny(tmp_path).read_text())
    base = parse_recipe(d, "r")
    assert base.training.device == "auto" and base.training.precision == "fp32"
    d["training"]["device"] = "gpu"
    with pytest.raises(RecipeError, match=r"training\.device"):
        parse_recipe(d, "r")
    d["training"]["device"] = "cpu"  # a run resumes on another device
    assert parse_recipe(d, "r").fingerprint() == base.fingerprint()
    d["training"]["precision"] = "bf16"  # changes the computation: another run
    assert parse_recipe(d, "r").fingerprint() != base.fingerprint()
    d["training"]["precision"] = "fp16"
    d["training"]["loss_scale"] = 1000.0
    with pytest.raises(RecipeError, match="power of two"):
        parse_recipe(d, "r")


def test_to_device_moves_nested_batches():
    batch = {"a": torch.ones(2), "b": (torch.zeros(1), [torch.ones(3)]), "n": 3}
    moved = to_device(batch, torch.device("meta"))
    assert moved["a"].device.type == "meta" and moved["b"][1][0].device.type == "meta"
    assert moved["n"] == 3 and isinstance(moved["b"], tuple)
    same = to_device(batch, torch.device("cpu"))
    assert same["a"] is batch["a"]  # already there: no copy
    assert module_device(torch.nn.Linear(2, 2)) == torch.device("cpu")
    assert module_device(torch.nn.ReLU()) == torch.device("cpu")


def test_noise_values_do_not_depend_on_the_target_device():
    """The stream is computed on the CPU and moved: the same key and step give the same values
    wherever the parameter lives (here: a meta tensor consumes the same part of the stream)."""
    key = RunKey.from_insecure_seed(3)
    a, b = GaussianNoise(key), GaussianNoise(key)
    for n in (a, b):
        n.begin_step(5)
    like = torch.empty(1001)
    first = a(like, 2.0)
    moved = b(like.to("meta"), 2.0)
    assert moved.device.type == "meta" and moved.shape == first.shape
    assert a.state_dict() == b.state_dict()
    assert torch.equal(a(like, 1.0), b(like, 1.0))  # the next draws agree bit for bit
    c = GaussianNoise(key)
    c.begin_step(5)
    assert torch.equal(c(like, 2.0), first)
    half = GaussianNoise(key)
    half.begin_step(5)  # rounded to the parameter's dtype on the CPU, before the move
    assert torch.equal(half(like.to(torch.bfloat16), 2.0), first.to(torch.bfloat16))


def test_checkpoints_load_onto_the_cpu(tmp_path, monkeypatch):
    """A checkpoint is read with map_location='cpu' (whatever device wrote it) and copied into
    the model wherever it lives."""
    model = torch.nn.Linear(3, 2)
    state = {"model": {k: v.detach().clone() for k, v in model.state_dict().items()}}
    path = RunDir(tmp_path / "run").save_checkpoint(1, state)
    seen = {}
    real = torch.load

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    state = load_checkpoint_file(path)
    assert seen.get("map_location") == "cpu" and seen.get("weights_only") is True
    assert all(t.device.type == "cpu" for t in state["model"].values())
    on_meta = torch.nn.Linear(3, 2, device="meta")
    with torch.no_grad():  # a CPU checkpoint copies into parameters on another device
        for name, p in on_meta.named_parameters():
            p.copy_(state["model"][name])
    assert on_meta.weight.device.type == "meta"
    fresh = torch.nn.Linear(3, 2)
    fresh.load_state_dict(state["model"])
    assert torch.equal(fresh.weight, model.weight)


def test_run_json_records_the_device_of_each_segment(tmp_path, monkeypatch):
    """A resume from another ``training.device`` value (on CPU CI: ``auto`` -> ``cpu``) starts a
    segment in run.json's ``devices``; ``device`` and the resumable ``planned_steps`` are the
    current session's."""
    from dptrain.recipe import load_recipe
    from dptrain.train import train

    _no_cuda(monkeypatch)
    recipe = tiny(
        tmp_path,
        data={"max_validation_records": 4},
        training={"steps": 4, "checkpoint_every": 1},
        policy={"noise_multiplier": 1.0},
    )
    train(load_recipe(recipe), progress=False, max_steps_this_session=1)
    run = RunDir(tmp_path / "r")
    meta = run.read_meta()
    first = {"from_step": 0, "device": "cpu", "requested": "auto", "world_size": 1}
    assert meta["device"] == "cpu" and meta["devices"] == [first]
    cpu = load_recipe(recipe, ["training.device=cpu", "training.steps=2"])
    train(cpu, run.path, resume=True, progress=False)
    meta = run.read_meta()
    second = {"from_step": 1, "device": "cpu", "requested": "cpu", "world_size": 1}
    assert meta["devices"] == [first, second] and meta["status"] == "finished"
    assert meta["steps"] == meta["planned_steps"] == 2


def test_resumed_segments_of_old_runs_and_recomputed_steps():
    from dptrain.train import resumed_segments

    here = {"from_step": 4, "device": "cuda:0", "requested": "cuda", "world_size": 1}
    old = resumed_segments({"device": "cpu", "world_size": 1}, here)  # before `devices`
    assert old["devices"] == [{"from_step": 0, "device": "cpu", "world_size": 1}, here]
    assert old["device"] == "cuda:0" and old["world_size"] == 1
    # a session that computed steps 6.. on cuda died before its checkpoint: resumed at 4 on
    # the CPU, those steps are recomputed there and the cuda segment is gone
    seen = [
        {"from_step": 0, "device": "cpu", "requested": "auto", "world_size": 1},
        {"from_step": 6, "device": "cuda:0", "requested": "cuda", "world_size": 1},
    ]
    back = {"from_step": 4, "device": "cpu", "requested": "auto", "world_size": 1}
    assert resumed_segments({"devices": seen}, back)["devices"] == seen[:1]
    two = {**back, "world_size": 2}  # --nproc 2 from step 4
    assert resumed_segments({"devices": seen}, two)["devices"] == [seen[0], two]
    same = {**seen[0], "from_step": 4}  # nothing changed: the first segment goes on
    assert resumed_segments({"devices": seen}, same)["devices"] == seen[:1]


def test_a_gpu_with_slow_float64_says_the_ghost_norms_cost_more_there():
    from dptrain.hardware import float64_note

    for full in ((8, 0), (9, 0), (7, 0)):  # A100, H100/H200, V100
        assert float64_note(*full) == ""
    for slow in ((8, 9), (8, 6), (7, 5), (12, 0)):  # L4/L40S/RTX 4090, A10/RTX 3090, T4, RTX 50xx
        assert "float64 at 1/32-1/64" in float64_note(*slow) and "ghost norms" in float64_note(
            *slow
        )
