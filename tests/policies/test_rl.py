"""The rl policy: a real gymnasium env, no leak from private data into the agent's state, the
adaptive budget filter against an overspending agent, resume and warm start of the SAC agent."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from accountants import Budget, Event, Ledger, get_accountant
from dptrain.batching import batch_slice
from dptrain.cli import main
from dptrain.engine import BudgetExceeded, PrivacyEngine
from dptrain.policies import RunContext
from dptrain.policies.rl import PrivateTrainingEnv, RLPolicy
from dptrain.recipe import RecipeError, parse_recipe
from dptrain.rundir import RunDir
from dptrain.train import prepare, train
from tests._support import lm_batch, seeded_sampler, share_key, tiny_gpt2

ROOT = Path(__file__).resolve().parents[2]
VOCAB = 61


class Run:
    """A PrivacyEngine with an RLPolicy on a tiny GPT-2 and a Poisson-sampled private set."""

    def __init__(
        self, rl: dict, *, data_seed: int = 0, eps: float = 4.0, steps: int = 8, noise=None
    ):
        torch.manual_seed(0)
        self.model = tiny_gpt2(vocab=VOCAB, layers=1, width=8).train()  # float64
        self.data = lm_batch(VOCAB, 40, 8, seed=data_seed)
        self.policy = RLPolicy(clip=1.0, noise_multiplier=None, rl={"every": 2, **rl})
        q = 0.2
        self.policy.calibrate(eps, 1e-3, sample_rate=q, steps=steps, accountant="rdp")
        opt = torch.optim.AdamW(self.model.parameters(), lr=1e-2)
        self.engine = PrivacyEngine(
            self.model,
            opt,
            policy=self.policy,
            sample_rate=q,
            dataset_size=40,
            grouping="per_layer",
            budget=Budget(eps, 1e-3),
            noise=noise,
        )
        public = [lm_batch(VOCAB, 6, 8, seed=99)]
        self.policy.attach(RunContext(self.model, steps, seed=3, public_batches=public))
        self.sampler = seeded_sampler(40, q, seed=data_seed)

    def advance(self, n: int) -> int:
        for i in range(n):
            idx = self.sampler.sample(self.engine.steps_taken).tolist()
            batch = (
                batch_slice(self.data, 0, 0)
                if not idx
                else {k: v[idx] for k, v in self.data.items()}
            )
            try:
                self.engine.step(batch)
            except BudgetExceeded:
                return i
        return n


def test_env_passes_the_gymnasium_checker_and_sac_learn_drives_it():
    from gymnasium.utils.env_checker import check_env
    from stable_baselines3 import SAC

    run = Run({}, steps=60, eps=50.0)
    env = PrivateTrainingEnv(run.policy, run.advance)
    check_env(env, skip_close_check=True)  # that check re-makes the env by id: it wraps a live run
    before = run.engine.steps_taken
    SAC(
        "MlpPolicy",
        env,
        learning_starts=1,
        batch_size=4,
        policy_kwargs={"net_arch": [8]},
        device="cpu",
    ).learn(total_timesteps=2)
    assert run.engine.steps_taken == before + 2 * run.policy.cfg.every


def test_the_agent_computes_on_the_cpu_whatever_the_run_device():
    """The SAC agent is pinned to the CPU (dptrain.policies.rl.agent: tiny, and its random
    streams are CPU generators), so its networks, buffer and checkpointed state are CPU
    tensors and numpy arrays, and its decisions read the run's model through public losses."""
    from dptrain.policies.rl.agent import AGENT_DEVICE

    run = Run({}, steps=8, eps=20.0)
    run.advance(2)  # one decision: the agent exists and has acted
    sac = run.policy.agent.sac
    assert AGENT_DEVICE == torch.device("cpu") and sac.device == AGENT_DEVICE
    assert all(p.device == AGENT_DEVICE for p in sac.policy.parameters())
    state = run.policy.state_dict()["agent"]
    tensors = [t for t in state["networks"].values()] + list(state["buffer"].values())[:2]
    assert all(t.device.type == "cpu" for t in tensors if isinstance(t, torch.Tensor))


class ForcedRelease:
    """'Noise' that makes the k-th release equal a fixed vector whatever the data (up to
    float64 rounding of ``sum + (target - sum)``)."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, like: torch.Tensor, std: float) -> torch.Tensor:
        g = torch.Generator().manual_seed(1000 + self.calls)
        self.calls += 1
        target = torch.randn(like.shape, generator=g, dtype=torch.float64) * 0.3
        return (target - like.double()).to(like.dtype)

    def state_dict(self) -> dict:
        return {}


def test_agent_state_depends_on_private_data_only_through_released_outputs():
    """Two runs on different private data whose released outputs (noisy update, noisy counts)
    are forced equal: the agent sees the same states and rewards and takes the same actions."""
    runs = [Run({}, data_seed=s, noise=ForcedRelease(), eps=20.0) for s in (0, 1)]
    private = []
    for r in runs:
        seen = []
        release = r.policy.release

        def spy(sums, plan, noise, release=release, seen=seen):
            seen.append([s.clone() for s in sums.clipped.values()])
            return release(sums, plan, noise)

        r.policy.release = spy
        r.advance(6)
        private.append(seen)
    # the private inputs differ ...
    assert any(
        not torch.equal(a, b)
        for s0, s1 in zip(*private, strict=True)
        for a, b in zip(s0, s1, strict=True)
    )
    # ... the states, rewards and actions do not
    buf = [r.policy.agent.sac.replay_buffer for r in runs]
    assert buf[0].pos == buf[1].pos == 3  # decisions after steps 2, 4, 6
    for field in ("observations", "next_observations", "actions", "rewards"):
        np.testing.assert_allclose(getattr(buf[0], field), getattr(buf[1], field), atol=1e-6)
    np.testing.assert_allclose(runs[0].policy._last["obs"], runs[1].policy._last["obs"], atol=1e-6)
    sigmas = [[e.noise_multiplier for e in r.engine.ledger.events] for r in runs]
    np.testing.assert_allclose(*sigmas, rtol=1e-9)


def test_an_overspending_agent_is_stopped_at_the_budget_by_the_adaptive_filter():
    eps = 3.0
    run = Run({"pacing": False, "noise_range": 1.5}, eps=eps, steps=40)
    env = PrivateTrainingEnv(run.policy, run.advance)
    assert run.engine.filter.adaptive and run.engine.accountant.name == "rdp"
    env.reset(seed=0)
    greedy = np.ones(env.action_space.shape, dtype=np.float32)
    greedy[0] = -1.0  # least noise, largest clip
    terminated, steps = False, 0
    while not terminated:
        _, _, terminated, _, info = env.step(greedy)
        steps += info["private_steps"]
    assert info["stopped_by_budget"] and 0 < steps < 40
    spent = run.engine.epsilon()
    assert spent <= eps
    assert spent == pytest.approx(
        get_accountant("rdp").adaptive_epsilon(run.engine.ledger.events, 1e-3)
    )
    _, event = run.engine.next_plan()
    assert not run.engine.filter.allows(run.engine.ledger, event)  # the next step would exceed
    with pytest.raises(BudgetExceeded):
        run.engine.step(batch_slice(run.data, 0, 4))


def test_pacing_finishes_the_planned_steps_within_budget_whatever_the_agent_does():
    eps = 3.0
    run = Run({"noise_range": 2.0}, eps=eps, steps=8)
    env = PrivateTrainingEnv(run.policy, run.advance)
    env.reset()
    terminated = False
    while not terminated:
        _, _, terminated, _, info = env.step(-np.ones(env.action_space.shape, np.float32))
    assert not info["stopped_by_budget"] and run.engine.steps_taken == 8
    assert run.engine.epsilon() <= eps


# -- dptrain train: recipes, reports, resume, warm start ---------------------------------------


def recipe(tmp_path: Path, name: str, **changes) -> dict:
    d = yaml.safe_load((ROOT / "recipes" / "tiny.yaml").read_text())
    d["output_dir"] = str(tmp_path / name)
    d["data"].update(max_records=120, max_length=24, public_fraction=0.05, max_public_records=8)
    d["training"].update(steps=6, batch_size=8, checkpoint_every=3)
    d["policy"] = {"name": "rl", "grouping": "per_layer", "rl": {"every": 2, "batch_size": 8}}
    for section, values in changes.items():
        d[section].update(values)
    return d


def _agent_state(run_dir: Path) -> dict:
    state = torch.load(RunDir(run_dir).checkpoint_files()[-1], weights_only=True)
    return state["engine"]["policy"]["agent"], state["model"]


# public records from a separate file: a warm start from a run whose public split was carved
# out of its data file by its key is refused (warm.check_source)
PUBLIC_FILE = {
    "path": "bundled:clinic_notes:train",
    "public_path": "bundled:clinic_notes:validation",
    "public_fraction": None,
}


def test_resume_continues_the_same_agent_and_the_report_names_the_adaptive_filter(tmp_path, capsys):
    full = train(parse_recipe(recipe(tmp_path, "full", data=PUBLIC_FILE)), progress=False)
    out = capsys.readouterr().out
    assert "adaptive composition" in out and "records declared public" in out
    meta = RunDir(full.run_dir).read_meta()
    assert meta["adaptive"] and "adaptive composition" in meta["guarantee"]
    # the certified number is the filter's budget; the spend is an odometer reading, a note
    assert meta["epsilon"] == 8.0 and meta["epsilon_spent_adaptive"] <= 8.0 and meta["steps"] == 6
    assert "filter's budget" in out and "odometer reading, not a guarantee" in out
    ledger_events = json.loads((full.run_dir / "ledger.json").read_text())["events"]
    assert len({e["noise_multiplier"] for e in ledger_events}) > 1  # the agent varied the noise
    assert main(["epsilon", "--run", str(full.run_dir), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["adaptive"] and report["epsilon"] == pytest.approx(meta["epsilon"])

    d = recipe(tmp_path, "split", data=PUBLIC_FILE)
    share_key(full.run_dir, tmp_path / "split")  # the same secret coins and noise
    train(parse_recipe(d), progress=False, max_steps_this_session=3)
    sigma_ref = RunDir(tmp_path / "split").read_meta()["calibrated_noise_multiplier"]
    capsys.readouterr()
    train(parse_recipe(d), tmp_path / "split", resume=True, progress=False)
    err = capsys.readouterr().err  # sigma_ref is restored, not calibrated again
    assert "calibrated noise multiplier" not in err
    assert f"restored noise multiplier {sigma_ref:.4f} (from run.json" in err
    (a_agent, a_model), (b_agent, b_model) = (
        _agent_state(full.run_dir),
        _agent_state(tmp_path / "split"),
    )
    assert a_agent["num_timesteps"] == b_agent["num_timesteps"] == 3
    for k, v in a_agent["networks"].items():
        assert torch.equal(v, b_agent["networks"][k]), k
    for k, v in a_agent["buffer"].items():
        assert torch.equal(torch.as_tensor(v), torch.as_tensor(b_agent["buffer"][k])), k
    for k, v in a_model.items():
        assert torch.equal(v, b_model[k]), k

    # warm start: a new run's agent starts as the finished run's agent
    warm = recipe(
        tmp_path,
        "warm",
        data=PUBLIC_FILE,
        policy={"rl": {"every": 2, "init_from": str(full.run_dir)}},
    )
    prep = prepare(parse_recipe(warm))
    policy = prep.policy
    policy.bind(list("abcde"), sample_rate=0.1, expected_batch_size=8)
    policy.attach(RunContext(torch.nn.Linear(1, 1), 6, public_batches=[{}]))
    loaded = policy.agent.state_dict()
    for k, v in a_agent["networks"].items():
        assert torch.equal(v, loaded["networks"][k]), k
    assert loaded["buffer"]["observations"].shape[0] == 3
    note = policy.describe()["notes"][0]
    assert str(full.run_dir) in note and "composition" in note
    # for records both runs trained on, the composed guarantee is the headline
    capsys.readouterr()
    train(parse_recipe(warm), progress=False)
    warm_meta = RunDir(tmp_path / "warm").read_meta()
    shared = warm_meta["shared_with_warm_start"]
    assert shared["epsilon"] == 16.0
    assert shared["delta"] == pytest.approx(warm_meta["delta_total"] + meta["delta_total"])
    head = [line for line in capsys.readouterr().out.splitlines() if "privacy guarantee" in line]
    assert head and head[0].startswith("privacy guarantee   (16.0000,")


def test_a_run_stopped_at_the_budget_is_refused_on_resume_before_the_model_loads(tmp_path, capsys):
    """Unpaced low noise overspends: the filter stops the run.  A resume of the same plan would
    take the refused step again: it is refused from run.json and ledger.json, with the static
    policies' message, and neither the checkpoint nor the model is loaded."""
    d = recipe(
        tmp_path,
        "spent",
        model={"name": "tiny-gpt2:n_layer=1,n_embd=16,n_head=2"},
        data={"max_length": 16, "max_validation_records": 4},
        training={"steps": 40, "checkpoint_every": 40},
        policy={"noise_multiplier": 0.6, "rl": {"every": 2, "batch_size": 8, "pacing": False}},
        privacy={"epsilon": 2.0},
    )
    d["generation"] = {"samples": 0}
    path = tmp_path / "spent.yaml"
    path.write_text(yaml.safe_dump(d))
    assert main(["train", str(path), "--no-progress"]) == 0
    run = RunDir(tmp_path / "spent")
    meta = run.read_meta()
    assert meta["stopped_by_budget"] and meta["steps"] < 40
    files = {f: f.read_bytes() for f in (run.path / "run.json", run.ledger)}
    capsys.readouterr()
    assert main(["train", str(path), "--resume", str(run.path), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "privacy.epsilon: the budget (2.0," in err and "is already spent (epsilon" in err
    assert f"the adaptive privacy filter refused step {meta['steps'] + 1}" in err
    assert "loading model" not in err and "resumed" not in err
    assert all(f.read_bytes() == b for f, b in files.items())
    # another plan (more steps) is priced by the filter at its first step, as before
    more = ["--set", "training.steps=41"]
    assert main(["train", str(path), "--resume", str(run.path), "--no-progress", *more]) == 0
    assert "loading model" in capsys.readouterr().err
    assert Ledger.load(run.ledger).total_steps == meta["steps"]


def test_recipe_errors_name_the_key_and_the_fix(tmp_path):
    with pytest.raises(RecipeError, match=r"privacy\.accountant.*adaptive"):
        prepare(parse_recipe(recipe(tmp_path, "a", privacy={"accountant": "prv"})))
    no_public = recipe(tmp_path, "b")
    del no_public["data"]["public_fraction"]
    with pytest.raises(RecipeError, match="public_fraction"):
        prepare(parse_recipe(no_public))
    with pytest.raises(RecipeError, match=r"canaries.*Fix: give the public records"):
        parse_recipe(recipe(tmp_path, "e", data={"canaries": {}}))
    with pytest.raises(RecipeError, match=r"policy\.rl\.evry"):
        parse_recipe(recipe(tmp_path, "c", policy={"rl": {"evry": 3}}))
    with pytest.raises(RecipeError, match="init_from"):
        prepare(parse_recipe(recipe(tmp_path, "d", policy={"rl": {"init_from": str(tmp_path)}})))


def test_count_release_is_charged_as_one_gaussian_mechanism():
    run = Run({"clip_fraction_noise": 0.1}, eps=20.0)
    ctx = run.engine.context()
    plan = run.policy.plan(copy.copy(ctx))  # step 0 of every=2: no count release
    assert plan.noise_multiplier == pytest.approx(run.policy._setting.sigma)
    ctx.step = 1  # the interval's last step releases B counts of sensitivity 1/2
    counted = run.policy.plan(ctx)
    nb, s_c = len(run.policy.bands), 0.1 * run.engine.expected_batch_size
    sigma = run.policy._setting.sigma
    assert counted.noise_multiplier == pytest.approx((sigma**-2 + nb * (0.5 / s_c) ** 2) ** -0.5)
    assert run.policy.event(counted) == Event(0.2, counted.noise_multiplier)


def test_checkpoint_state_round_trips_and_keeps_the_plans_sigma_ref():
    """The decision state survives state_dict / load_state_dict; the noise is the run plan's:
    a checkpoint paced around another sigma_ref is refused, not adopted."""
    from dptrain.policies.rl.control import Released, Setting
    from dptrain.rundir import CheckpointError

    src = RLPolicy(noise_multiplier=2.0)
    src._state.step = 7
    src._state.action = np.array([0.5, -0.25], dtype=np.float32)
    src._state.setting = Setting(2.5, 1.5, {"all": 1.5})
    src._state.last = {"obs": np.arange(3.0, dtype=np.float32), "loss": 1.25, "spent": 0.5}
    src._state.released = Released(np.array([0.75]), 3, np.array([0.6]), 0.1)
    state = src.state_dict()
    same = RLPolicy(noise_multiplier=2.0)
    same.load_state_dict(copy.deepcopy(state))
    got, want = same._state, src._state
    assert (got.step, got.setting, got.last["loss"], got.released.steps) == (
        7,
        want.setting,
        1.25,
        3,
    )
    np.testing.assert_array_equal(got.action, want.action)
    np.testing.assert_array_equal(got.last["obs"], want.last["obs"])
    np.testing.assert_array_equal(got.released.fraction, want.released.fraction)
    fresh = RLPolicy()  # no noise resolved yet: the checkpoint's is taken
    fresh.load_state_dict(copy.deepcopy(state))
    assert fresh.noise_multiplier == 2.0
    with pytest.raises(CheckpointError, match=r"sigma_ref=2\.0.*sigma_ref=1\.0"):
        RLPolicy(noise_multiplier=1.0).load_state_dict(copy.deepcopy(state))


def test_pacer_names_a_spent_budget_with_its_own_error_and_passes_other_errors():
    """The pacing fallbacks catch only the expected condition (no sigma fits the rest of the
    budget); a malformed ledger event is a bug and must not be swallowed as "budget spent"."""
    from accountants.calibrate import EpsilonUnreachableError
    from dptrain.policies.rl.control import Pacer

    pacer = Pacer(sample_rate=0.1, epsilon=1.0, delta=1e-5, extra_cost=0.0)
    assert pacer.sigma([], 10, 0) > 0  # the budget fits a sigma
    spent = [Event(0.1, 0.5)] * 200  # epsilon far above 1 already
    with pytest.raises(EpsilonUnreachableError, match=r"already charged .* spend epsilon"):
        pacer.sigma(spent, 10, 0)
    tiny = Pacer(sample_rate=0.1, epsilon=0.001, delta=1e-5, extra_cost=0.0)
    with pytest.raises(EpsilonUnreachableError, match=r"no epsilon below .* budget is below it"):
        tiny.sigma([], 10, 0)  # below the adaptive conversion's floor at delta / 25
    with pytest.raises(ValueError) as err:
        pacer.sigma([Event(2.0, 1.0)], 10, 0)  # a sample rate above 1: a bug upstream
    assert not isinstance(err.value, EpsilonUnreachableError)


def test_pacer_on_a_ledger_is_bitwise_the_pacer_on_its_events_and_does_not_resum_it():
    """The pacer reads a ledger's adaptive RDP curve incrementally (accountants.rdp.ledger_rdp):
    the same sigma, bitwise, as summing the events, and a query on a long ledger adds only its
    newest entries' curves, not all of them."""
    from accountants import Ledger
    from accountants.rdp import RdpAccountant
    from dptrain.policies.rl.control import Pacer, grid_sigma

    acc = RdpAccountant()
    pacer = Pacer(sample_rate=0.05, epsilon=6.0, delta=1e-5, extra_cost=0.01, accountant=acc)
    ledger = Ledger()
    rng = np.random.default_rng(0)
    for t in range(120):
        ledger.record(Event(0.05, grid_sigma(int(rng.integers(90, 110)))))
        if t % 7 == 0:
            np.testing.assert_array_equal(
                pacer._spent_curve(ledger), RdpAccountant().rdp(ledger.events, adaptive=True)
            )
            args = (400 - t, (400 - t) // 5)
            assert pacer.sigma(ledger, *args, hint=2.0) == pacer.sigma(ledger.events, *args)
            tail = (300 - t, (300 - t) // 5, 1.3)
            assert pacer.sigma(ledger, 5, 1, tail=tail) == pacer.sigma(
                ledger.events, 5, 1, hint=3.0, tail=tail
            )
    calls = []
    step_rdp = acc.step_rdp
    acc.step_rdp = lambda e, **kw: calls.append(e) or step_rdp(e, **kw)
    ledger.record(Event(0.05, 1.7))
    pacer._spent_curve(ledger)
    assert len(calls) <= 2  # the entry closed by the new one, and the new one


def test_learn_every_spaces_the_sac_update_rounds_on_one_thread():
    """``rl.learn_every = n`` runs the ``gradient_steps`` SAC updates after every n-th
    transition only (counted by the checkpointed ``num_timesteps``); the agent computes on
    AGENT_THREADS threads and gives the run its own thread count back."""
    from dptrain.policies.rl.agent import AGENT_THREADS, SacAgent

    run_threads = torch.get_num_threads()
    updates, seen = {}, set()
    for n in (1, 3):
        policy = RLPolicy(noise_multiplier=1.0, rl={"learn_every": n, "gradient_steps": 1})
        policy.bind(["a", "b"], sample_rate=0.1, expected_batch_size=4)
        env = PrivateTrainingEnv(policy)
        agent = SacAgent(env, policy.cfg.model_copy(update={"batch_size": 2}), seed=0)
        train = agent.sac.train
        agent.sac.train = lambda train=train, **kw: seen.add(torch.get_num_threads()) or train(**kw)
        obs = np.zeros(env.observation_space.shape, np.float32)
        ran = []
        for _ in range(7):
            agent.add(obs, np.zeros(env.action_space.shape, np.float32), 0.0, obs, False)
            ran.append(agent.update())
        updates[n] = (agent.sac._n_updates, ran)
    assert updates[1] == (4, [False] * 3 + [True] * 4)  # from learning_starts = 4 on
    assert updates[3] == (1, [False] * 5 + [True, False])  # transitions 6 (not 3: < 4)
    assert seen == {AGENT_THREADS} and torch.get_num_threads() == run_threads


@pytest.mark.parametrize(
    ("kw", "key"),
    [
        ({"clip": float("inf")}, "policy.clip"),
        ({"clip": -1.0}, "policy.clip"),
        ({"noise_multiplier": 0.0}, "policy.noise_multiplier"),
        ({"noise_multiplier": float("nan")}, "policy.noise_multiplier"),
    ],
)
def test_bad_clip_or_sigma_ref_is_refused_with_the_key_and_the_fix(kw, key):
    # sigma_ref = 0 (recipe-legal with epsilon .inf) used to end in a ZeroDivisionError mid-step
    with pytest.raises(RecipeError, match=rf"{key}.*Fix"):
        RLPolicy(**{"clip": 1.0, **kw})


def _count_step_sums(run: Run, counts: torch.Tensor | None) -> tuple:
    """The plan of a count step (every=2: step 2) and zero clipped sums with ``counts``."""
    from dptrain.policies import StepSums

    run.policy.driver = "env"  # no agent: the release is tested, not the decisions
    ctx = run.engine.context()
    ctx.step = 1
    plan = run.policy.plan(ctx)
    assert plan.count_std is not None
    sums = StepSums(
        clipped={p: torch.zeros_like(p) for p in run.engine.params},
        raw=None,
        group_of=run.engine.group_of,
        expected_batch_size=run.engine.expected_batch_size,
        counts=counts,
    )
    return plan, sums


def test_counts_of_the_wrong_shape_are_refused_before_any_noise_is_drawn():
    from tests._support import seeded_noise

    noise = seeded_noise(5)
    run = Run({}, eps=20.0, noise=noise)
    nb = len(run.policy.bands)
    plan, sums = _count_step_sums(run, torch.zeros(nb + 1, dtype=torch.float64))
    with pytest.raises(ValueError, match=rf"StepSums.counts has shape \({nb + 1},\)"):
        run.policy.release(sums, plan, noise)
    assert noise.pairs == 0 and noise.block == 0  # nothing drawn, the counter where it was
    assert run.policy._state.released.steps == 0
    plan, sums = _count_step_sums(run, torch.zeros(nb, dtype=torch.float64))
    out = run.policy.release(sums, plan, noise)
    params = sum((p.numel() + 1) // 2 for p in run.engine.params)
    assert noise.pairs == params + (nb + 1) // 2  # the update's pairs, then the counts'
    # the released energy per band, read in one transfer: bitwise the per-parameter sums
    energy, expected = np.zeros(nb), np.zeros(nb)
    for p, u in out.items():
        energy[run.policy.band_of[run.engine.group_of[p]]] += float(u.double().pow(2).sum())
    for g, d in run.policy._dims.items():
        expected[run.policy.band_of[g]] += d * (plan.noise_std[g] / sums.expected_batch_size) ** 2
    assert run.policy._state.released.energy_ratio.tolist() == (energy / expected).tolist()


def test_private_counts_are_the_per_band_centred_counts_in_float64_on_the_cpu():
    run = Run({}, eps=20.0)
    plan, _ = _count_step_sums(run, None)
    bands = run.policy.bands
    flags = {
        g: torch.tensor([True, False, True, True, i % 2 == 0])
        for i, g in enumerate(run.policy.groups)
    }
    missing = bands[-1][0]
    del flags[missing]  # a group with no samples here: its band counts the others
    got = run.policy.private_counts(plan, flags)
    want = []
    for band in bands:
        present = [flags[g] for g in band if g in flags]
        inside = torch.stack(present).all(0) if present else None
        want.append(0.0 if inside is None else float(inside.sum()) - inside.numel() / 2)
    assert got.dtype == torch.float64 and got.device.type == "cpu"
    assert got.tolist() == want


def test_rl_steps_make_no_tensor_on_the_default_device():
    """As tests/engine/test_default_device.py: the default device is meta, the model and the
    batches on the CPU; two steps, the second releasing the noisy counts."""
    run = Run({}, eps=20.0, steps=4)
    run.policy.driver = "env"
    batches = []
    for t in range(2):
        idx = run.sampler.sample(t).tolist() or [0]
        batches.append({k: v[idx] for k, v in run.data.items()})
    with torch.device("meta"):
        for b in batches:
            run.engine.step(b)
    assert run.engine.steps_taken == 2
    fraction = run.policy._state.released.fraction
    assert fraction is not None and np.isfinite(fraction).all()


def test_a_warm_start_from_a_warm_started_run_composes_the_whole_chain(tmp_path):
    """Run B's agent started from run A's, so run C warm-started from B holds a function of
    A's and B's released outputs: records in all three are covered only by eps_A + eps_B +
    eps_C.  The source's composed claim (its shared_with_warm_start) is what C composes with,
    not B's own epsilon; a source that states no certified epsilon is refused."""
    from dptrain.policies.rl import warm

    run = RunDir(tmp_path / "b")
    run.path.mkdir()
    ledger = Ledger()
    ledger.record(Event(0.1, 1.0))
    run.save_ledger(ledger)
    own = {"epsilon": 8.0, "delta_total": 1e-5}
    run.write_meta({**own, "shared_with_warm_start": {"run": "a", "epsilon": 16.0, "delta": 2e-5}})
    info = warm.source_info(str(run.path))
    assert (info["epsilon"], info["delta"]) == (16.0, 2e-5)
    run.write_meta(own)  # B was not warm-started: its own claim
    assert (warm.source_info(str(run.path))["epsilon"]) == 8.0
    run.write_meta({"status": "running"})  # no session of B ended: nothing certified
    with pytest.raises(RecipeError, match=r"init_from.*no certified"):
        warm.source_info(str(run.path))


def test_a_warm_start_from_a_run_with_a_carved_public_split_is_refused(tmp_path):
    """A run's public_fraction split is chosen from its data file by its secret key and read
    without noise by its agent (the reward's public loss); another run of the same file holds
    most of those records as private, so its warm-started agent would carry them unaccounted.
    Refused for the source and for any run up its init_from chain; a public file is fine."""
    from dptrain.policies.rl import warm

    def run_dir(name: str, data: dict, init_from: str | None = None) -> str:
        d = recipe(tmp_path, name, data=data, policy={"rl": {"init_from": init_from}})
        run = RunDir(tmp_path / name)
        run.path.mkdir()
        run.recipe.write_text(yaml.safe_dump(d))
        run.write_meta({"epsilon": 8.0, "delta_total": 1e-5})
        return str(run.path)

    carved = run_dir("a", {})  # the helper's recipe: data.public_fraction 0.05
    separate = run_dir("b", PUBLIC_FILE)
    chained = run_dir("c", PUBLIC_FILE, init_from=carved)
    assert warm.carved_public_source(separate) is None
    assert warm.carved_public_source(carved) == carved
    assert warm.carved_public_source(chained) == carved
    warm.check_source(separate)
    for source in (carved, chained):
        with pytest.raises(RecipeError, match=r"init_from.*public_fraction.*data\.public_path"):
            warm.check_source(source)
