"""Data-parallel private training with 2 CPU processes (gloo) against one process."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import yaml

from dptrain import distributed
from dptrain.engine import PrivacyEngine
from dptrain.policies import StaticPolicy
from tests._support import assert_close_rel, lm_batch, seeded_noise, seeded_sampler, tiny_gpt2

ROOT = Path(__file__).resolve().parents[2]
N, Q, STEPS = 24, 0.5, 3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _model():
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(1)
    return get_peft_model(
        tiny_gpt2(), LoraConfig(r=2, target_modules=["c_attn"], init_lora_weights=False)
    )


def _train(sigma: float) -> tuple[dict[str, torch.Tensor], float, list[dict]]:
    """STEPS private steps on Poisson batches of a fixed dataset; this rank's shard only."""
    model = _model()
    params = [p for p in model.parameters() if p.requires_grad]
    engine = PrivacyEngine(
        model,
        torch.optim.SGD(params, lr=0.5),
        policy=StaticPolicy(clip=0.1, noise_multiplier=sigma),
        sample_rate=Q,
        dataset_size=N,
        noise=seeded_noise(5),
    )
    data = lm_batch(61, N, 6, seed=2)
    sampler = seeded_sampler(N, Q, seed=3)
    for t in range(STEPS):
        idx = distributed.shard(sampler.sample(t))
        engine.step({k: v[idx] for k, v in data.items()})
    state = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return state, engine.epsilon(1e-5), engine.ledger.to_dict()["events"]


SIGMAS = (0.0, 1.0)


def _worker(rank: int, world: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    try:
        static = {}
        for sigma in SIGMAS:
            state, eps, events = _train(sigma)
            static[str(sigma)] = {"state": state, "eps": eps, "events": events}
        torch.save(
            {"static": static, "rl": _train_rl(), "dtypes": _reduce_dtypes(rank)}, f"{out}.{rank}"
        )
    finally:
        dist.destroy_process_group()


def _mixed(rank: int) -> list[torch.Tensor]:
    """A float64 statistic needing float64 (1 + 2^-40 r), a float32 sum and a float32 update."""
    return [
        torch.tensor([1.0 + rank * 2.0**-40, 3.0], dtype=torch.float64),
        torch.tensor([0.1 + rank, 3e-8 * (rank + 1), -7.25], dtype=torch.float32),
        torch.tensor([[1 / 3 + rank]], dtype=torch.float32),
    ]


def _reduce_dtypes(rank: int) -> dict:
    """all_reduce_sum and broadcast_tensors of :func:`_mixed` on this rank, and the dtypes of
    the buffers the collectives were given."""
    sent = []
    real = dist.all_reduce

    def recording(tensor, *args, **kwargs):
        sent.append(str(tensor.dtype))
        return real(tensor, *args, **kwargs)

    dist.all_reduce = recording
    try:
        summed = distributed.all_reduce_sum(_mixed(rank))
    finally:
        dist.all_reduce = real
    return {
        "summed": summed,
        "sent": sent,
        "broadcast": distributed.broadcast_tensors(_mixed(rank)),
    }


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> list[dict]:
    """Every 2-rank job of this module (static at each sigma, rl), in one spawn of 2 gloo
    processes (their start-up, importing torch and transformers, is most of the cost)."""
    out = str(tmp_path_factory.mktemp("two-ranks") / "rank")
    mp.spawn(_worker, args=(2, _free_port(), out), nprocs=2, join=True)
    return [torch.load(f"{out}.{r}", weights_only=True) for r in range(2)]


@pytest.mark.parametrize("sigma", SIGMAS)
def test_two_ranks_match_one_process(two_ranks, sigma):
    ranks = [r["static"][str(sigma)] for r in two_ranks]
    single, eps, events = _train(sigma)
    for name, value in single.items():
        # every rank ends each step with identical parameters
        assert torch.equal(ranks[0]["state"][name], ranks[1]["state"][name]), name
        # equal to one process on the same global batches (up to summation order)
        assert_close_rel(ranks[0]["state"][name], value, rtol=1e-5, what=name)
    assert ranks[0]["events"] == ranks[1]["events"] == events
    assert ranks[0]["eps"] == ranks[1]["eps"] == eps


def _train_rl() -> list[list[float] | None]:
    """STEPS + 1 steps of the rl policy (fixed action, count release every 2 steps) on this
    rank's shards; the noisy within-clip fraction per band released after each step (rank 0)."""
    from accountants import Budget
    from dptrain.policies import RunContext
    from dptrain.policies.rl import RLPolicy

    torch.manual_seed(0)
    model = tiny_gpt2(vocab=61, layers=1, width=8)
    steps, eps, delta = STEPS + 1, 8.0, 1e-3
    policy = RLPolicy(clip=5.0, rl={"every": 2, "bands": 2, "clip_fraction_noise": 0.05})
    policy.driver = "env"  # the first plan takes action 0; no agent, no public-loss decisions
    policy.calibrate(eps, delta, sample_rate=Q, steps=steps, accountant="rdp")
    engine = PrivacyEngine(
        model,
        torch.optim.SGD(model.parameters(), lr=0.05),
        policy=policy,
        sample_rate=Q,
        dataset_size=N,
        grouping="per_layer",
        budget=Budget(eps, delta),
        noise=seeded_noise(5),
    )
    policy.attach(RunContext(model, steps, public_batches=[lm_batch(61, 4, 6, seed=9)]))
    data, sampler = lm_batch(61, N, 6, seed=2), seeded_sampler(N, Q, seed=3)
    released = []
    for t in range(steps):
        idx = distributed.shard(sampler.sample(t))
        engine.step({k: v[idx] for k, v in data.items()})
        fraction = policy._state.released.fraction
        released.append(None if fraction is None else fraction.tolist())
    return released


def test_rl_clip_fraction_counts_the_whole_batch_across_ranks(two_ranks):
    """The rl policy's noisy within-clip fraction under 2 ranks is one process's on the same
    global batches: each rank's counts are summed before rank 0 adds the (same) noise once
    (rank 0's shard alone would give about half).  Per-layer groups of a full model: the
    release draws the noise in the engine's parameter order on any number of ranks."""
    two = two_ranks[0]["rl"]
    one = _train_rl()
    counted = [i for i, f in enumerate(one) if f is not None and i % 2 == 1]
    assert counted == [1, 3] and len(one[1]) == 2  # count steps 2 and 4, two bands
    assert any(0.2 < f < 0.8 for i in counted for f in one[i])  # a band clipping some samples
    for i in counted:
        # the centred counts are sums of integers and halves: equal up to the float64 division
        np.testing.assert_allclose(two[i], one[i], rtol=0, atol=1e-12, err_msg=f"step {i + 1}")


def test_shard_partitions_the_global_batch(monkeypatch):
    idx = torch.tensor([0, 3, 4, 7, 9, 10])
    parts = []
    for r in range(3):
        monkeypatch.setattr(distributed, "world_size", lambda: 3)
        monkeypatch.setattr(distributed, "rank", lambda r=r: r)
        parts.append(distributed.shard(idx))
    assert sorted(torch.cat(parts).tolist()) == idx.tolist()
    assert all(
        set(a.tolist()).isdisjoint(b.tolist()) for i, a in enumerate(parts) for b in parts[i + 1 :]
    )


def test_cli_nproc_2_equals_single_process_epsilon(tmp_path):
    d = yaml.safe_load((ROOT / "recipes" / "tiny.yaml").read_text())
    d["lora"] = {"r": 2, "alpha": 4, "target_modules": ["c_attn"]}
    d["training"]["steps"] = 4
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(d))
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "dptrain.cli", "train", str(recipe), "--no-progress"]
    subprocess.run(
        [*cmd, "--nproc", "2", "--output", str(tmp_path / "two")],
        env=env,
        check=True,
        capture_output=True,
        timeout=300,
    )
    subprocess.run(
        [*cmd, "--output", str(tmp_path / "one")],
        env=env,
        check=True,
        capture_output=True,
        timeout=300,
    )
    two = json.loads((tmp_path / "two" / "run.json").read_text())
    one = json.loads((tmp_path / "one" / "run.json").read_text())
    assert two["world_size"] == 2 and one["world_size"] == 1
    assert two["epsilon"] == one["epsilon"] and two["steps"] == one["steps"] == 4
    assert (tmp_path / "two" / "ledger.json").read_text() == (
        tmp_path / "one" / "ledger.json"
    ).read_text()


def _key_worker(rank: int, world: int, port: int, run_dir: str, resume: bool, out: str) -> None:
    from dptrain import train
    from dptrain.recipe import load_recipe
    from dptrain.rundir import CheckpointError, RunDir

    if rank > 0:  # as on a node without the run directory: only rank 0 may touch secret.key

        def _no_file(*_: object, **__: object) -> None:
            raise AssertionError("a rank other than 0 touched secret.key")

        train.RunKey.read = _no_file  # type: ignore[method-assign]
        train.RunKey.generate = _no_file  # type: ignore[method-assign]
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    try:
        recipe = load_recipe(ROOT / "recipes" / "tiny.yaml")
        try:
            key = train.run_key_for(recipe, RunDir(run_dir), resume)
            Path(f"{out}.{rank}").write_text("key " + key.key_id)
        except CheckpointError as err:
            Path(f"{out}.{rank}").write_text("error " + str(err))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("case", ["resume", "resume-without-key"])  # fresh: the --nproc 2 test
def test_rank_zero_owns_the_key_and_its_errors_reach_every_rank(tmp_path, case):
    """Only rank 0 reads or draws the key; every rank receives it, and a key that cannot be
    read on ``--resume`` stops every rank with rank 0's message (no rank left waiting)."""
    from dptrain.secret import RunKey

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    saved = RunKey.generate().write(run_dir / "secret.key") if case == "resume" else None
    out = str(tmp_path / "key")
    mp.spawn(_key_worker, args=(2, _free_port(), str(run_dir), True, out), nprocs=2, join=True)
    got = [Path(f"{out}.{r}").read_text() for r in range(2)]
    assert got[0] == got[1], got
    if case == "resume":
        assert got[0] == "key " + RunKey.read(saved).key_id
    else:
        assert got[0].startswith("error ") and "secret.key is missing" in got[0]


def test_all_reduce_sends_each_dtype_in_its_own_buffer(two_ranks):
    """float32 sums travel as float32 beside float64 statistics (no widening), and every value
    is the rank sum in its own dtype: float64 keeps 2^-40, float32 the float32 sum bit for bit
    (a 2-term sum rounds once either way); a broadcast gives rank 0's tensors exactly."""
    a, b = _mixed(0), _mixed(1)
    for r in two_ranks:
        got = r["dtypes"]
        assert got["sent"] == ["torch.float64", "torch.float32"]
        assert [t.dtype for t in got["summed"]] == [t.dtype for t in a]
        for x, y, s in zip(a, b, got["summed"], strict=True):
            assert s.shape == x.shape and torch.equal(s, x + y)
        assert got["summed"][0][0].item() == 2.0 + 2.0**-40
        for x, s in zip(a, got["broadcast"], strict=True):
            assert s.dtype == x.dtype and torch.equal(s, x)
