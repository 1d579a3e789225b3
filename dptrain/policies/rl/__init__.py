"""RL-controlled clipping and noise (after RLDP, Khadangi et al. 2025) with a sound contract.

A Soft Actor-Critic agent (stable-baselines3, MLP ``rl.net_arch``) is trained online while the
model trains.  Every ``k = rl.every`` private steps it observes the run and sets, for the next
``k`` steps, the noise multiplier and the clip threshold of every parameter group.

Action ``a in [-1, 1]^(2 + B)`` (``B = min(rl.bands, G)`` contiguous bands of the ``G`` groups,
in model order; one group per layer / LoRA module with ``grouping: per_layer``)::

    sigma = clamp(sigma_base * noise_range^a0, sigma_min, sigma_max)
    C     = policy.clip * clip_range^a1                  (total clip norm)
    C_g   = C w_b(g) / sqrt(sum_h w_h^2),  w_b = allocation_range^a_(2+b)
    s_g   = sigma C                                      (noise std of every group, sum units)

so ``sigma_eff = 1 / sqrt(sum_g (C_g / s_g)^2) = sigma`` whatever the allocation.  With
``rl.pacing`` (default) ``sigma_base`` is the constant sigma that would spend exactly the rest
of the budget over the remaining planned steps (a = 0 is "on pace", like static DP-SGD), and
an interval may spend no more than leaves the steps after it at noise <= noise_range times the
current pace (the last interval: no more than the rest), so a run always completes its planned
steps within budget whatever the agent does (grid: sigma is rounded up to powers of 1.01);
without pacing ``sigma_base = sigma_ref``, the calibrated constant, and an agent that spends
early is stopped by the budget filter.

State (float32, clipped to [-10, 10]), public or released quantities only::

    t / T, eps_t / eps_budget, eps_t / eps_budget - t / T    (steps and budget spent)
    L_t / L_0, 10 (L_(t-k) - L_t) / L_0                      (loss on the public split)
    log(sigma / sigma_ref), log(C / policy.clip)             (the setting in force)
    per band: log of the mean over the interval of ||u_b||^2 / E||noise_b||^2, where u is the
              released (noised) update: a signal-to-noise estimate, post-processing only
    per band: the released noisy fraction of samples within their clip thresholds
    the previous action

``L`` is the mean token loss on the split the recipe declares public (``data.public_fraction``
or ``data.public_path``), never on private records.  The fraction of unclipped samples is a
statistic of raw per-sample gradients, so it is *privatized*: on the last step of each
interval, band ``b``'s centred count ``sum_i (1[sample i within C_g for all g in b] - 1/2)``
(sensitivity 1/2) gets Gaussian noise of std ``rl.clip_fraction_noise * E[B]`` and is released
with the update as one Gaussian mechanism (below); ``clip_fraction_noise: null`` drops it.
Under ``--nproc`` each rank counts its shard, the engine sums the counts over ranks with the
clipped sums, and rank 0 adds the noise once: the fraction is of the whole batch, and the
contract (one sample moves a band's count by 1/2) does not depend on the number of ranks.

Reward of the action taken at ``t``, observed at ``t + k``::

    r = reward_scale * ((L_t - L_(t+k)) / L_0 - privacy_penalty * sum_steps (sigma_ref / sigma_eff)^2 / T)

The penalty measures spend in the additive currency of Gaussian mechanisms (cost ~ 1/sigma^2;
the reference schedule, T steps at sigma_ref, costs 1), not in epsilon, which grows like
sqrt(steps) and would charge early steps more than late ones.

Privacy contract.  Each step is one Poisson-subsampled Gaussian mechanism over the private
records: per-group clipped sums (sensitivity ``C_g``, noise ``s_g``) and, on count steps, the B
centred counts (sensitivity 1/2, noise ``s_c``), so ``sigma_eff = (sum_g (C_g/s_g)^2 +
B (1/2 / s_c)^2)^(-1/2)``, charged to the ledger before the update is applied.  The plan is a
function of earlier released outputs and public data only, i.e. chosen adaptively; the engine
therefore guards the budget with the RDP privacy filter valid under fully adaptive composition
(Feldman & Zrnic 2021; ``accountants.rdp``: per-order RDP sums, union bound over the orders),
refuses the step that would exceed it.  The filter certifies its budget, so ``dptrain train``
reports the budget ``privacy.epsilon`` as the guarantee and says it rests on that filter; the
epsilon the filter's accounting has spent so far is an odometer reading, shown only as a note.  Only ``privacy.accountant: rdp`` is accepted.  The guarantee
covers the private training records; the public split is not protected.  The recipe's
``privacy.epsilon`` is the budget (the filter's threshold) and defines ``sigma_ref``.

Agent and checkpoints.  ``dptrain train`` keeps its loop: after the last step of an interval
the policy closes it (state, reward), stores the transition in the agent's replay buffer, runs
``rl.gradient_steps`` SAC updates (after every ``rl.learn_every``-th transition) and takes the
agent's next action; the same decision process is a ``gymnasium.Env``
(:class:`PrivateTrainingEnv`) that any agent can drive.  The agent's networks, optimizers,
entropy coefficient, replay buffer and random streams and the interval state go into every
checkpoint (``weights_only`` loadable), so a resume continues the same agent.  The agent stays
on the CPU whatever ``training.device`` is (it is tiny, and its random streams are CPU
generators: the same actions on every device; see :mod:`.agent`), while the model, the public
loss and the released update it observes are on the run's device.  ``rl.init_from: RUN_DIR``
starts from that run's agent (networks, optimizers, buffer); the agent is a function of the
source run's released outputs, so for records private to both runs the headline is the
composition of both certified guarantees, ``(eps_1 + eps_2, delta_1 + delta_2)`` (basic
composition, valid under adaptivity; a warm-started source brings its own composed claim).  A
source with a ``data.public_fraction`` split anywhere up its chain is refused: its agent read
those records, chosen by its key, without noise (:func:`.warm.check_source`).
"""

from __future__ import annotations

from typing import Any

from .options import RLConfig, RLOptions

__all__ = [
    "PrivateTrainingEnv",
    "RLConfig",
    "RLOptions",
    "RLPolicy",
    "make_rl_policy",
    "require_rl",
]


def require_rl() -> None:
    """The rl extra (stable-baselines3, gymnasium), or an error naming it."""
    from ...extras import require

    require("gymnasium", "rl", "policy 'rl'")
    require("stable_baselines3", "rl", "policy 'rl'")


def make_rl_policy(**options: Any) -> Any:
    """The registry's factory (imports stable-baselines3 only when an rl policy is built)."""
    require_rl()
    from .policy import RLPolicy

    return RLPolicy(**options)


def __getattr__(name: str) -> Any:
    if name == "RLPolicy":
        from .policy import RLPolicy

        return RLPolicy
    if name == "PrivateTrainingEnv":
        require_rl()
        from .env import PrivateTrainingEnv

        return PrivateTrainingEnv
    raise AttributeError(name)
