"""The stable-baselines3 SAC agent, driven transition by transition, with checkpointable state.

The agent never calls ``learn()``: the policy hands it one transition per decision
(:meth:`SacAgent.add`), asks for ``gradient_steps`` SAC updates (:meth:`SacAgent.update`) and
for the next action (:meth:`SacAgent.act`).  Its randomness (SB3 samples with torch's and
numpy's global generators) runs on the agent's own generator states, swapped in around each
call, so it neither perturbs nor depends on the training's randomness, and a resumed run
continues the same random streams.  :meth:`SacAgent.state_dict` holds tensors and plain
containers only (``torch.load(weights_only=True)`` reads it): networks, optimizers, entropy
coefficient, replay buffer and generator states.

Device.  The agent computes on the CPU (:data:`AGENT_DEVICE`) whatever ``training.device`` the
run uses, on purpose: (1) it is tiny -- an MLP of ``rl.net_arch`` updated on ``rl.batch_size``
transitions once every ``rl.every`` private steps, fed numpy observations -- so on a GPU its
kernel launches and host-device copies would cost more than its arithmetic; (2) its random
streams are CPU generator states swapped in around each call, and on a GPU stable-baselines3
would also draw from the CUDA generator, which they do not cover: its actions, hence the noise
multipliers in the ledger, would then depend on the device, and a run resumed on another
device would not continue the same agent.  On the CPU they are the same on every device.

Threads.  The agent computes on one CPU thread (:data:`AGENT_THREADS`, set around each call
and restored after it): its matrices are 32 x 32, far too small to split, and splitting them
costs synchronization instead -- an update round took 0.4 s on one thread and 10-12 s on two
on a loaded 2-core machine (``benchmarks/README.md``, RL policy cost).  The count is fixed,
not the machine's, so the agent's arithmetic (hence its actions and the ledger's noise) does
not depend on the thread count a run, or its resume, is given.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import gymnasium as gym
import numpy as np
import torch

from ... import rng
from .options import RLConfig

AGENT_DEVICE = torch.device("cpu")  # see the module docstring: not the run's device
AGENT_THREADS = 1  # intra-op threads of the agent's calls (module docstring)
_BUFFER_FIELDS = ("observations", "next_observations", "actions", "rewards", "dones", "timeouts")


class SacAgent:
    """A small SAC (MLP ``cfg.net_arch``) over ``env``'s spaces."""

    def __init__(self, env: gym.Env, cfg: RLConfig, seed: int) -> None:
        from stable_baselines3 import SAC
        from stable_baselines3.common.logger import Logger

        self.cfg = cfg
        self._torch_rng = torch.Generator().manual_seed(seed).get_state()
        self._numpy_rng = np.random.RandomState(seed % 2**32).get_state()
        with self._own_threads(), self._own_rng():
            self.sac = SAC(
                "MlpPolicy",
                env,
                learning_rate=cfg.learning_rate,
                buffer_size=cfg.buffer_size,
                learning_starts=0,
                batch_size=cfg.batch_size,
                tau=cfg.tau,
                gamma=cfg.gamma,
                ent_coef=cfg.ent_coef if cfg.ent_coef is not None else "auto_0.05",
                policy_kwargs={"net_arch": list(cfg.net_arch)},
                device=AGENT_DEVICE,
                verbose=0,
            )
            self._start_near_zero(cfg.explore_std)
        self.sac.set_logger(Logger(folder=None, output_formats=[]))

    def _start_near_zero(self, std: float) -> None:
        """An untrained actor acts around a = 0 (the paced, static-like setting) with
        exploration std about ``std``, instead of SB3's default of std ~1 over [-1, 1]."""
        actor = self.sac.actor
        with torch.no_grad():
            actor.mu.weight.mul_(0.01)
            actor.mu.bias.zero_()
            actor.log_std.weight.mul_(0.01)
            actor.log_std.bias.fill_(math.log(std))

    @contextmanager
    def _own_threads(self) -> Iterator[None]:
        saved = torch.get_num_threads()
        torch.set_num_threads(AGENT_THREADS)
        try:
            yield
        finally:
            torch.set_num_threads(saved)

    @contextmanager
    def _own_rng(self) -> Iterator[None]:
        with rng.GLOBAL_RNG, torch.random.fork_rng(devices=[]):
            saved = np.random.get_state()
            torch.set_rng_state(self._torch_rng)
            np.random.set_state(self._numpy_rng)
            try:
                yield
            finally:
                self._torch_rng = torch.get_rng_state()
                self._numpy_rng = np.random.get_state()
                np.random.set_state(saved)

    # -- acting and learning ---------------------------------------------------------------

    def act(self, obs: np.ndarray) -> np.ndarray:
        with self._own_threads(), self._own_rng():
            action, _ = self.sac.predict(obs, deterministic=self.cfg.deterministic)
        return np.asarray(action, dtype=np.float32)

    def add(
        self, obs: np.ndarray, action: np.ndarray, reward: float, next_obs: np.ndarray, done: bool
    ) -> None:
        self.sac.replay_buffer.add(
            obs[None], next_obs[None], action[None], np.array([reward]), np.array([done]), [{}]
        )
        self.sac.num_timesteps += 1

    @property
    def transitions(self) -> int:
        buf = self.sac.replay_buffer
        return buf.buffer_size if buf.full else buf.pos

    def update(self) -> bool:
        """``gradient_steps`` SAC updates once ``learning_starts`` transitions are stored, after
        every ``learn_every``-th transition (counted by ``num_timesteps``, which checkpoints
        keep: a resumed agent updates at the same transitions)."""
        n = self.transitions
        if n == 0 or n < self.cfg.learning_starts or self.cfg.gradient_steps == 0:
            return False
        if self.sac.num_timesteps % self.cfg.learn_every:
            return False
        with self._own_threads(), self._own_rng():
            self.sac.train(gradient_steps=self.cfg.gradient_steps, batch_size=self.cfg.batch_size)
        return True

    def ent_coef(self) -> float:
        if self.sac.log_ent_coef is not None:
            return float(torch.exp(self.sac.log_ent_coef.detach()))
        return float(self.sac.ent_coef_tensor)

    # -- state -----------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        sac, buf = self.sac, self.sac.replay_buffer
        n = self.transitions
        keys, pos, has_gauss, cached = self._numpy_rng[1:]
        return {
            "networks": sac.policy.state_dict(),
            "actor_optimizer": sac.actor.optimizer.state_dict(),
            "critic_optimizer": sac.critic.optimizer.state_dict(),
            "log_ent_coef": None if sac.log_ent_coef is None else sac.log_ent_coef.detach().clone(),
            "ent_coef_optimizer": None
            if sac.ent_coef_optimizer is None
            else sac.ent_coef_optimizer.state_dict(),
            "n_updates": sac._n_updates,
            "num_timesteps": sac.num_timesteps,
            "buffer": {f: torch.from_numpy(getattr(buf, f)[:n].copy()) for f in _BUFFER_FIELDS}
            | {"pos": buf.pos, "full": buf.full},
            "rng": {
                "torch": self._torch_rng.clone(),
                "numpy_keys": torch.from_numpy(keys.astype(np.int64)),
                "numpy_pos": int(pos),
                "numpy_has_gauss": int(has_gauss),
                "numpy_cached": float(cached),
            },
        }

    def load_state_dict(self, state: dict[str, Any], *, rng: bool = True) -> None:
        """Restore an agent; ``rng=False`` (a warm start) keeps this run's own random streams."""
        sac, buf = self.sac, self.sac.replay_buffer
        saved = state["buffer"]
        n = saved["observations"].shape[0]
        if saved["observations"].shape[1:] != buf.observations.shape[1:] or (
            saved["actions"].shape[1:] != buf.actions.shape[1:]
        ):
            raise ValueError(
                f"the saved agent observes {tuple(saved['observations'].shape[2:])} and acts in "
                f"{tuple(saved['actions'].shape[2:])}, this run's agent observes "
                f"{tuple(buf.observations.shape[2:])} and acts in {tuple(buf.actions.shape[2:])}: "
                "the runs differ in rl.bands or in the number of parameter groups"
            )
        if n > buf.buffer_size:
            raise ValueError(
                f"the saved replay buffer holds {n} transitions, more than rl.buffer_size="
                f"{buf.buffer_size}; raise rl.buffer_size"
            )
        sac.policy.load_state_dict(state["networks"])
        sac.actor.optimizer.load_state_dict(state["actor_optimizer"])
        sac.critic.optimizer.load_state_dict(state["critic_optimizer"])
        if sac.log_ent_coef is not None and state["log_ent_coef"] is not None:
            with torch.no_grad():
                sac.log_ent_coef.copy_(state["log_ent_coef"])
            sac.ent_coef_optimizer.load_state_dict(state["ent_coef_optimizer"])
        sac._n_updates = int(state["n_updates"])
        sac.num_timesteps = int(state["num_timesteps"])
        for f in _BUFFER_FIELDS:
            getattr(buf, f)[:n] = saved[f].numpy()
        if n == buf.buffer_size:  # a full buffer of the same size: keep its write position
            buf.pos, buf.full = int(saved["pos"]) % n, True
        else:
            buf.pos, buf.full = n, False
        if rng:
            r = state["rng"]
            self._torch_rng = r["torch"].clone()
            self._numpy_rng = (
                "MT19937",
                r["numpy_keys"].numpy().astype(np.uint32),
                r["numpy_pos"],
                r["numpy_has_gauss"],
                r["numpy_cached"],
            )
