"""Server-side math: FedSVD re-factorization, FFA and DP-LoRA merges, the Flower strategy's
sorting of replies (updates, declines, failures), min_clients, and client-level DP."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Error,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)

from dptrain.federated.lora import (
    get_strategy,
    load_lora_state,
    lora_state,
    orthonormal_rows,
    pairs,
    refactorize,
)
from dptrain.federated.recipe import FederatedRecipe
from dptrain.federated.strategy import LoraFedAvg
from dptrain.recipe import RecipeError, parse_recipe

from .conftest import tiny_recipe

A, B = "m.q.lora_A.default.weight", "m.q.lora_B.default.weight"
A2, B2 = "m.v.lora_A.default.weight", "m.v.lora_B.default.weight"


def adapters(seed: int = 0, r: int = 3, d_in: int = 7, d_out: int = 5) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        A: torch.randn(r, d_in, generator=g, dtype=torch.float64),
        B: torch.randn(d_out, r, generator=g, dtype=torch.float64),
        A2: torch.randn(r, d_in, generator=g, dtype=torch.float64),
        B2: torch.randn(d_out, r, generator=g, dtype=torch.float64),
    }


def truncated_svd(m: torch.Tensor, r: int) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(m, full_matrices=False)
    return u[:, :r] @ torch.diag(s[:r]) @ vh[:r]


def full_svd_refactorize(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference: the full SVD of the d x k product, ``A' = V_r^T``, ``B' = U_r S_r``, each
    singular pair's sign chosen so that the largest-magnitude entry of its row of A' is > 0."""
    r = a.shape[0]
    u, s, vh = torch.linalg.svd(b.double() @ a.double(), full_matrices=False)
    u, s, vh = u[:, :r], s[:r], vh[:r]
    flip = vh[torch.arange(r), vh.abs().argmax(dim=1)] < 0
    sign = 1.0 - 2.0 * flip.double()
    return vh * sign[:, None], u * sign * s


def test_refactorize_is_the_rank_r_svd_with_orthonormal_a():
    g = torch.Generator().manual_seed(1)
    for r, d_in, d_out in [(3, 7, 5), (2, 16, 16), (4, 6, 9), (5, 5, 40), (16, 64, 48)]:
        a = torch.randn(r, d_in, generator=g, dtype=torch.float64)
        b = torch.randn(d_out, r, generator=g, dtype=torch.float64)
        a_new, b_new = refactorize(a, b)
        assert a_new.shape == a.shape and b_new.shape == b.shape  # peft: A (r, in), B (out, r)
        torch.testing.assert_close(b_new @ a_new, truncated_svd(b @ a, r))
        torch.testing.assert_close(b_new @ a_new, b @ a)  # rank(B A) <= r: nothing is lost
        torch.testing.assert_close(a_new @ a_new.T, torch.eye(r, dtype=torch.float64))
        # B' carries the singular values: its columns are orthogonal with norms S
        s = torch.linalg.svdvals(b @ a)[:r]
        torch.testing.assert_close(b_new.T @ b_new, torch.diag(s**2))
        # the thin-QR path gives the full SVD's factors themselves (same sign convention)
        a_ref, b_ref = full_svd_refactorize(a, b)
        torch.testing.assert_close(a_new, a_ref)
        torch.testing.assert_close(b_new, b_ref)


def test_refactorize_on_rank_deficient_products_matches_the_full_svd():
    """rank(B A) = rho < r (B or A rank-deficient, or B = 0 as at FedSVD's init): the rho
    leading singular pairs are the full SVD's; the other rows of A' are some orthonormal
    completion (not unique), with zero columns of B'; B' A' = B A either way."""
    g = torch.Generator().manual_seed(2)
    r, d_in, d_out = 6, 20, 24

    def low_rank(rows: int, cols: int, rho: int) -> torch.Tensor:
        x = torch.randn(rows, rho, generator=g, dtype=torch.float64)
        return x @ torch.randn(rho, cols, generator=g, dtype=torch.float64)

    cases = [
        (torch.randn(r, d_in, generator=g, dtype=torch.float64), low_rank(d_out, r, 2), 2),
        (low_rank(r, d_in, 3), torch.randn(d_out, r, generator=g, dtype=torch.float64), 3),
        (torch.randn(r, d_in, generator=g, dtype=torch.float64), torch.zeros(d_out, r), 0),
    ]
    for a, b, rho in cases:
        b = b.double()
        a_new, b_new = refactorize(a, b)
        torch.testing.assert_close(b_new @ a_new, b @ a)
        torch.testing.assert_close(a_new @ a_new.T, torch.eye(r, dtype=torch.float64))
        a_ref, b_ref = full_svd_refactorize(a, b)
        torch.testing.assert_close(a_new[:rho], a_ref[:rho])
        torch.testing.assert_close(b_new[:, :rho], b_ref[:, :rho])
        assert float(b_new[:, rho:].abs().max()) < 1e-12


def test_refactorize_keeps_dtypes_and_refuses_a_rank_above_the_layer():
    g = torch.Generator().manual_seed(3)
    a = torch.randn(4, 30, generator=g)
    b = torch.randn(20, 4, generator=g)
    a_new, b_new = refactorize(a, b)
    assert a_new.dtype == b_new.dtype == torch.float32
    a_ref, b_ref = full_svd_refactorize(a, b)
    torch.testing.assert_close(a_new, a_ref.float())
    torch.testing.assert_close(b_new, b_ref.float())
    with pytest.raises(RecipeError, match=r"lora\.r"):
        refactorize(torch.randn(4, 3), torch.randn(20, 4))


def test_fedsvd_merge_averages_b_then_refactorizes():
    spec = get_strategy("fedsvd")
    assert spec.trains == ("B",) and not spec.trainable(A) and spec.trainable(B)
    g0 = spec.init(adapters(0))
    for a, b in pairs(g0):  # A starts orthonormal, B at zero
        torch.testing.assert_close(g0[a] @ g0[a].T, torch.eye(3, dtype=torch.float64))
        assert not g0[b].any()
    clients = [adapters(s) for s in (1, 2, 3)]
    weights = np.array([10.0, 30.0, 60.0])
    mean_b = {
        k: sum(w * c[k] for w, c in zip(weights / weights.sum(), clients, strict=True))
        for k in (B, B2)
    }
    new = spec.merge(g0, mean_b)
    for a, b in ((A, B), (A2, B2)):
        target = truncated_svd(mean_b[b] @ g0[a], 3)
        torch.testing.assert_close(new[b] @ new[a], target)
        torch.testing.assert_close(new[a] @ new[a].T, torch.eye(3, dtype=torch.float64))


def test_the_server_step_runs_on_the_recipes_device_and_is_unchanged_on_the_cpu(
    tmp_path, monkeypatch
):
    """LoraFedAvg resolves training.device once and the FedSVD QRs and SVD run there in float64
    (spied: the device, dtype and shape of their inputs: the d x k product is never formed); on the CPU the results are bit for bit those of the
    device-less call, and the state stays CPU tensors (Flower arrays)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    strategy = strategy_for(tmp_path)  # federated_tiny: training.device auto -> cpu here
    assert strategy.device == torch.device("cpu")
    seen = []
    for name in ("qr", "svd"):
        real = getattr(torch.linalg, name)

        def spy(m, *a, real=real, name=name, **k):
            seen.append((name, tuple(m.shape), m.device, m.dtype))
            return real(m, *a, **k)

        monkeypatch.setattr(torch.linalg, name, spy)
    spec = get_strategy("fedsvd")
    g0 = spec.init(adapters(0), strategy.device)
    mean = {B: adapters(1)[B], B2: adapters(2)[B2]}
    new = spec.merge(g0, mean, strategy.device)
    cpu = (torch.device("cpu"), torch.float64)
    init = [("qr", (7, 3), *cpu)] * 2  # A^T of each pair
    step = [("qr", (5, 3), *cpu), ("qr", (7, 3), *cpu), ("svd", (3, 3), *cpu)] * 2
    assert seen == init + step  # per pair: thin QRs of B and A^T, the r x r core's SVD
    plain_init = spec.init(adapters(0))
    plain = spec.merge(plain_init, mean)
    assert all(torch.equal(g0[k], plain_init[k]) and torch.equal(new[k], plain[k]) for k in new)
    assert all(t.device.type == "cpu" for t in new.values())


def test_orthonormal_rows_spans_the_same_rows():
    a = adapters(4)[A]
    q = orthonormal_rows(a)
    torch.testing.assert_close(q @ q.T, torch.eye(3, dtype=torch.float64))
    # projecting a's rows onto span(q) changes nothing
    torch.testing.assert_close(a @ q.T @ q, a)


def test_ffa_keeps_a_and_dp_lora_averages_both():
    g0 = adapters(0)
    ffa, dp = get_strategy("ffa_lora"), get_strategy("dp_lora")
    assert ffa.init(g0) == g0 and ffa.trainable(B) and not ffa.trainable(A)
    mean = {B: torch.ones(5, 3, dtype=torch.float64)}
    new = ffa.merge(g0, mean)
    assert torch.equal(new[A], g0[A]) and torch.equal(new[B], mean[B])
    assert dp.trainable(A) and dp.trainable(B)
    both = {A: torch.zeros(3, 7, dtype=torch.float64), B: mean[B]}
    new = dp.merge(g0, both)
    assert torch.equal(new[A], both[A]) and torch.equal(new[B2], g0[B2])


def test_lora_state_round_trip_on_a_peft_model():
    from peft import LoraConfig, get_peft_model

    from dptrain.models import load_model_and_tokenizer

    model, _ = load_model_and_tokenizer("tiny-gpt2")
    model = get_peft_model(model, LoraConfig(r=2, target_modules=["c_attn"]))
    state = get_strategy("fedsvd").init(lora_state(model))
    load_lora_state(model, state)
    for name, value in lora_state(model).items():
        assert torch.equal(value, state[name])
    with pytest.raises(ValueError, match="does not fit the model"):
        load_lora_state(model, {**state, "nope.lora_A.default.weight": torch.zeros(1)})


# -- the Flower strategy ---------------------------------------------------------------------


def strategy_for(tmp_path, **federated) -> LoraFedAvg:
    d = tiny_recipe(tmp_path)
    d["federated"].update(federated)
    recipe = parse_recipe(d)
    assert isinstance(recipe, FederatedRecipe)
    return LoraFedAvg(recipe)


def request(node: int) -> Message:
    return Message(RecordDict(), dst_node_id=node, message_type=MessageType.TRAIN)


def update(node: int, client: int, arrays: dict, n: int) -> Message:
    metrics = {"client": client, "num-examples": n, "epsilon": 1.0, "steps": 3, "declined": 0}
    content = RecordDict({"arrays": ArrayRecord(arrays), "metrics": MetricRecord(metrics)})
    return Message(content, reply_to=request(node))


def decline(node: int, client: int, reason: str) -> Message:
    metrics = {"client": client, "num-examples": 9, "epsilon": 7.9, "steps": 0, "declined": 1}
    content = RecordDict(
        {"metrics": MetricRecord(metrics), "status": ConfigRecord({"reason": reason})}
    )
    return Message(content, reply_to=request(node))


def test_strategy_sorts_replies_and_respects_min_clients(tmp_path, task_identity):
    s = strategy_for(tmp_path, strategy="ffa_lora", clients=4, min_clients=2)
    g0 = {k: v.float() for k, v in adapters(0).items()}
    s.current, s.sent = g0, [11, 12, 13, 14]
    b1, b2 = torch.ones(5, 3), 3 * torch.ones(5, 3)
    replies = [
        update(11, 0, {B: b1, B2: b1}, n=10),
        decline(12, 1, "budget: 3 more local steps would exceed epsilon=8"),
        Message(Error(code=3, reason="RuntimeError: simulated crash"), reply_to=request(13)),
    ]  # node 14 never answers
    arrays, _ = s.aggregate_train(1, replies)
    report = s.reports[1]
    assert arrays is None and not report.aggregated and "min_clients=2" in report.note
    assert report.clients[1]["status"] == "declined" and "budget" in report.clients[1]["reason"]
    assert "simulated crash" in report.failures["node 13"]
    assert "no reply" in report.failures["node 14"]
    assert s.epsilon == {0: 1.0, 1: 7.9}
    assert s.unconfirmed == {"node 13", "node 14"}  # may have charged steps before failing

    replies = [
        update(11, 0, {B: b1, B2: b1}, n=10),
        update(14, 3, {B: b2, B2: b2}, n=30),
        decline(13, 2, "budget: ..."),
    ]
    s.sent = [11, 12, 13, 14]
    arrays, _ = s.aggregate_train(2, replies)
    new = arrays.to_torch_state_dict()
    torch.testing.assert_close(new[B], 2.5 * torch.ones(5, 3))  # weighted by record counts
    assert torch.equal(new[A], g0[A])  # FFA: A never moves
    assert "no reply" in s.reports[2].failures["client 1"]  # known by now from its decline
    assert s.unconfirmed == {"client 1"}  # nodes 13 and 14 reported their spends
    # a reply below an earlier one (here 1.0 after 7.9) never lowers the reported spend
    s.sent = [12]
    s.aggregate_train(3, [update(12, 1, {B: b1, B2: b1}, n=10)])
    assert s.epsilon[1] == 7.9 and s.reports[3].clients[1]["epsilon"] == 1.0 and not s.unconfirmed


def test_clients_with_an_insecure_seed_are_recorded_and_named_in_the_summary(
    tmp_path, task_identity, capsys
):
    """A client that reports an insecure-seed has no guarantee: the strategy records it and
    the server's summary warns that the client_guarantee does not hold for it."""
    from dptrain.federated import server as server_module

    s = strategy_for(tmp_path, strategy="ffa_lora", clients=2, min_clients=1)
    s.current = {k: v.float() for k, v in adapters(0).items()}
    s.sent = [11, 12]
    b1 = torch.ones(5, 3)
    insecure = update(12, 1, {B: b1, B2: b1}, n=10)
    insecure.content["metrics"]["insecure-seed"] = 1
    s.aggregate_train(1, [update(11, 0, {B: b1, B2: b1}, n=10), insecure])
    assert s.insecure_clients == {1}

    class Run:
        path = final = readme = tmp_path
        ledger = tmp_path / "absent.json"

    meta = {"client_guarantee": {"statement": "(1, 1e-5)", "accountant": "rdp"}}
    meta |= {"strategy": "ffa_lora", "clients": 2, "rounds": 1, "accountant": "rdp"}
    stats = {"perplexity_before": 1.0, "perplexity_after": 1.0, "client_epsilon": {}}
    server_module._print_summary(Run(), meta, {**stats, "insecure_clients": [1]})
    out = capsys.readouterr().out
    assert "client(s) 1 replied" in out and "does not hold for them" in out
    server_module._print_summary(Run(), meta, {**stats, "insecure_clients": []})
    assert "insecure-seed" not in capsys.readouterr().out


def test_a_second_reply_for_one_client_in_a_round_is_not_aggregated(tmp_path, task_identity):
    """One update per client per round: a second node answering for the same partition-id is
    recorded (privately) and dropped; its spend still counts."""
    s = strategy_for(tmp_path, strategy="ffa_lora", clients=2, min_clients=1)
    g0 = {k: v.float() for k, v in adapters(0).items()}
    s.current, s.sent = g0, [11, 12]
    b1, b3 = torch.ones(5, 3), 3 * torch.ones(5, 3)
    second = update(12, 0, {B: b3, B2: b3}, n=10)
    second.content["metrics"]["epsilon"] = 2.0
    arrays, _ = s.aggregate_train(1, [update(11, 0, {B: b1, B2: b1}, n=10), second])
    report = s.reports[1]
    assert report.updates == 1 and report.clients[0]["epsilon"] == 1.0
    torch.testing.assert_close(arrays.to_torch_state_dict()[B], b1)  # node 12's dropped
    assert "two nodes share partition-id 0" in report.failures["node 12"]
    assert s.shared_partitions == {0: [1]} and s.epsilon[0] == 2.0 and not s.unconfirmed
    # a configure_train request names the server run and its round
    assert len(s.run_id) == 32


def test_superlink_errors_for_expired_requests_are_charged_to_their_nodes(tmp_path, task_identity):
    """The SuperLink answers a request whose TTL ran out (or whose node is gone) with its own
    error, from SUPERLINK_NODE_ID: it is the request's node that failed, once, never node 1."""
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.server.superlink.linkstate.utils import (
        NODE_UNAVAILABLE_ERROR_REASON,
        create_message_error_unavailable_ins_message,
        create_message_error_unavailable_res_message,
    )

    s = strategy_for(tmp_path, strategy="ffa_lora", clients=4, min_clients=1)
    g0 = {k: v.float() for k, v in adapters(0).items()}
    s.current, s.sent = g0, [11, 12, 13, 14]
    s.messages = [request(n) for n in s.sent]
    for i, m in enumerate(s.messages):
        m.metadata.__dict__["_message_id"] = f"id-{i}"  # as the grid's push stamps them
    expired = create_message_error_unavailable_ins_message("id-1", run_id=1)
    gone = create_message_error_unavailable_res_message(s.messages[2].metadata, "node_unavail")
    stale = create_message_error_unavailable_ins_message("id-of-an-earlier-round", run_id=1)
    assert {m.metadata.src_node_id for m in (expired, gone, stale)} == {SUPERLINK_NODE_ID}
    ones = torch.ones(5, 3)
    replies = [update(11, 0, {B: ones, B2: ones}, n=10), expired, gone, stale]  # 14: nothing
    arrays, _ = s.aggregate_train(1, replies)
    report = s.reports[1]
    assert arrays is not None and report.aggregated and report.updates == 1
    assert report.failures == {
        "node 12": "no reply within 60 s (the request expired)",
        "node 13": NODE_UNAVAILABLE_ERROR_REASON,
        "node 14": "no reply within 60 s",
    }


def test_client_level_dp_clips_each_update_and_charges_one_event_per_round(tmp_path, task_identity):
    dp = {"clip": 0.5, "noise_multiplier": 1e-9, "sample_rate": 1.0, "delta": 1e-3}
    s = strategy_for(tmp_path, strategy="dp_lora", clients=2, min_clients=2, client_dp=dp)
    g0 = {k: torch.zeros_like(v).float() for k, v in adapters(0).items()}
    s.current, s.sent = g0, [1, 2]
    big = {k: torch.full_like(v, 10.0) for k, v in g0.items()}
    small = {k: torch.full_like(v, 0.001) for k, v in g0.items()}  # same direction, norm < C
    arrays, _ = s.aggregate_train(1, [update(1, 0, big, 5), update(2, 1, small, 5)])
    new = arrays.to_torch_state_dict()
    total = {k: new[k] * 2 for k in new}  # undo the mean over p K = 2 clients
    norm = math.sqrt(sum(float(v.pow(2).sum()) for v in total.values()))
    small_norm = 0.001 * math.sqrt(sum(v.numel() for v in g0.values()))
    assert norm == pytest.approx(0.5 + small_norm, rel=1e-4)  # big clipped to 0.5, small kept
    assert s.ledger.total_steps == 1 and s.reports[1].client_dp_epsilon > 0
    # the noisy mean is released even when nobody answers: the event is still charged
    s.aggregate_train(2, [])
    assert s.ledger.total_steps == 2
    assert s.reports[2].client_dp_epsilon > s.reports[1].client_dp_epsilon


def test_client_level_dp_drops_a_non_finite_update_instead_of_adding_it(tmp_path, task_identity):
    """``min(1, C / nan)`` is 1: a NaN update would enter the sum unclipped, and the released
    mean would tell whether that client took part (no bounded sensitivity).  Dropped, it
    contributes 0, within ``C``, and the honest update is released as if alone."""
    dp = {"clip": 0.5, "noise_multiplier": 1e-9, "sample_rate": 1.0, "delta": 1e-3}
    s = strategy_for(tmp_path, strategy="dp_lora", clients=2, min_clients=2, client_dp=dp)
    g0 = {k: torch.zeros_like(v).float() for k, v in adapters(0).items()}
    s.current, s.sent = g0, [1, 2]
    broken = {k: torch.full_like(v, math.nan) for k, v in g0.items()}
    honest = {k: torch.full_like(v, 0.001) for k, v in g0.items()}
    arrays, _ = s.aggregate_train(1, [update(1, 0, broken, 5), update(2, 1, honest, 5)])
    new = arrays.to_torch_state_dict()
    assert all(torch.isfinite(v).all() for v in new.values())
    for k, v in new.items():
        assert torch.allclose(v * 2, honest[k], atol=1e-6)  # p K = 2: only the honest update


class _NoNoise:
    """The strategy's noise with sigma -> 0 exactly, so that the clipped sum itself is read."""

    pairs = 0

    def begin_step(self, step: int) -> None:
        pass

    def __call__(self, t: torch.Tensor, std: float) -> torch.Tensor:
        return torch.zeros_like(t)


def test_client_level_dp_clip_never_exceeds_c_in_float32(tmp_path, task_identity):
    """An update of norm 1024 (one entry, exactly representable) clipped at C = 0.1: the float32
    coefficient of C / 1024 rounded to nearest is above it (float32(0.1) > 0.1), so the clipped
    update would exceed C; rounded toward zero it stays within C, and loses < 1e-7 of it."""
    dp = {"clip": 0.1, "noise_multiplier": 1e-9, "sample_rate": 1.0, "delta": 1e-3}
    s = strategy_for(tmp_path, strategy="dp_lora", clients=2, min_clients=1, client_dp=dp)
    g0 = {k: torch.zeros_like(v).float() for k, v in adapters(0).items()}
    s.current, s.sent = g0, [1]
    s.noise = _NoNoise()
    big = {k: torch.zeros_like(v) for k, v in g0.items()}
    big[B][0, 0] = 1024.0
    assert float(torch.tensor(0.1 / 1024, dtype=torch.float64).float()) * 1024 > 0.1
    arrays, _ = s.aggregate_train(1, [update(1, 0, big, 5)])
    new = arrays.to_torch_state_dict()
    norm = math.sqrt(sum(float((v.double() * 2).pow(2).sum()) for v in new.values()))  # p K = 2
    assert norm <= 0.1
    assert norm == pytest.approx(0.1, rel=1e-7)
