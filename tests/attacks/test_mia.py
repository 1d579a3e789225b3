"""Membership attacks on synthetic observations where the truth is known: records differ in
difficulty, and training shifts a record's log-probability by a fixed amount."""

from __future__ import annotations

import numpy as np
import pytest

from attacks.metrics import roc
from attacks.mia import ATTACKS, Observations
from attacks.scores import TextStats


def observations(k: int, n: int = 400, pop: int = 100, shift: float = 0.6, seed: int = 0):
    rng = np.random.default_rng(seed)
    member = np.arange(n) < n // 2
    difficulty = rng.normal(-3.0, 1.0, n + pop)  # log-prob of a record before training
    refs_in = np.zeros((k, n + pop), bool)
    for j in range(n + pop):  # each record in exactly half the reference models
        refs_in[rng.permutation(k)[: k // 2], j] = True
    refs = difficulty + shift * refs_in + rng.normal(0, 0.2, (k, n + pop))
    target_in = np.r_[member, np.zeros(pop, bool)]
    target = difficulty + shift * target_in + rng.normal(0, 0.2, n + pop)
    stats = TextStats(-target[:n], -target[:n] * 20, -target[:n] + 1, np.full(n, 20))
    obs = Observations(
        target=stats,
        zlib_bits=np.full(n, 400.0),
        refs=refs[:, :n],
        refs_in=refs_in[:, :n],
        pop_target=target[n:],
        pop_refs=refs[:, n:],
        pop_refs_in=refs_in[:, n:],
    )
    return obs, member


@pytest.mark.parametrize("k", [4, 64])  # pooled variance, then per-record variance
def test_reference_attacks_beat_the_loss_threshold(k):
    obs, member = observations(k)
    auc = {
        name: roc(s[member], s[~member]).auc
        for name, fn in ATTACKS.items()
        if (s := fn(obs)) is not None
    }
    assert set(auc) == set(ATTACKS)
    assert 0.55 < auc["loss"] < 0.75  # difficulty hides membership from the plain loss
    for name in ("lira_offline", "lira_online", "rmia_offline", "rmia_online"):
        assert auc[name] > 0.9, (name, auc[name])


def test_online_attacks_need_in_models_and_offline_ones_out_models():
    obs, member = observations(4)
    only_out = Observations(
        **{
            **obs.__dict__,
            "refs_in": np.zeros_like(obs.refs_in),
            "pop_refs_in": np.zeros_like(obs.pop_refs_in),
        }
    )
    assert ATTACKS["lira_online"](only_out) is None and ATTACKS["rmia_online"](only_out) is None
    assert roc(*(lambda s: (s[member], s[~member]))(ATTACKS["lira_offline"](only_out))).auc > 0.5
    only_in = Observations(**{**obs.__dict__, "refs_in": np.ones_like(obs.refs_in)})
    assert ATTACKS["lira_offline"](only_in) is None and ATTACKS["rmia_offline"](only_in) is None


def test_rmia_score_is_a_fraction_of_the_population():
    obs, _ = observations(4)
    s = ATTACKS["rmia_online"](obs)
    assert s.min() >= 0 and s.max() <= 1
    # gamma above every likelihood ratio: no record dominates any population record
    strict = Observations(**{**obs.__dict__, "rmia_gamma": 1e9})
    assert ATTACKS["rmia_online"](strict).max() == 0
