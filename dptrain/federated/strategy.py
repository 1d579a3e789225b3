"""The server strategy: Flower's message-based FedAvg, specialised to LoRA adapters.

Per round: every connected client is sent the global adapters (Poisson-sampled at
``client_dp.sample_rate`` when client-level DP is on); replies are sorted into updates,
declines (with the client's reason) and failures (errors, or no reply within
``round_timeout``: one per sent node, see :meth:`LoraFedAvg._sort`); if at least
``min_clients`` updates arrived, their weighted mean (by record count) goes through the
strategy's server step (:mod:`dptrain.federated.lora`), otherwise the global adapters are
kept.  The server step is post-processing of DP outputs; its linear algebra runs on the
recipe's ``training.device`` (:mod:`dptrain.federated.lora`), while the adapters, the
client-level clipping and its noise stay on the CPU (a few vectors per client, and the noise
is drawn on the CPU from the run key anyway).

Client-level DP (optional, ``federated.client_dp``): each client's update ``u_k - g`` is
clipped to L2 norm ``C`` (over all the factors it sends; a non-finite one is dropped, i.e.
contributes 0), the clipped updates are summed,
``N(0, (sigma C)^2)`` noise is added to each coordinate and the sum is divided by the
expected number of sampled clients ``p K`` (public); clients are Poisson-sampled with
probability ``p`` per round.  Adding or removing one client moves the sum by at most ``C``,
so each round is one Poisson-subsampled Gaussian event ``(p, sigma)`` on the server's own
ledger, whatever the replies: the noisy mean is released even when few clients answer,
and ``min_clients`` does not apply.  This epsilon is reported, not enforced.  The client
coins (node ``n`` joins round ``r`` iff ``PRF(k_coins, r, n) < p``) and the noise (counter
``(r, block)``) come from the server's own run key (``<run dir>/secret.key``).
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

from accountants import Event, Ledger, get_accountant

from ..clipping import clip_coef, norm_bound
from ..hardware import resolve_device
from ..noise import GaussianNoise, truncation_delta
from ..secret import RunKey, below
from .lora import State, get_strategy
from .recipe import FederatedRecipe

# SuperLink errors that mean "no reply before the request's TTL ran out"
_EXPIRED = (ErrorCode.MESSAGE_UNAVAILABLE, ErrorCode.REPLY_MESSAGE_UNAVAILABLE)


def _from_superlink(msg: Message) -> bool:
    """An error reply the SuperLink wrote itself, in place of a node's reply."""
    return msg.has_error() and msg.metadata.src_node_id == SUPERLINK_NODE_ID


@dataclass
class RoundReport:
    """What happened in one round, for the log, the metrics and the tests."""

    round: int
    clients: dict[int, dict[str, Any]] = field(default_factory=dict)  # by client id
    failures: dict[str, str] = field(default_factory=dict)  # who -> reason
    updates: int = 0
    aggregated: bool = False
    note: str = ""
    client_dp_epsilon: float | None = None


class LoraFedAvg(FedAvg):
    """FedAvg over LoRA adapters with the recipe's server step (see the module docstring)."""

    def __init__(
        self, recipe: FederatedRecipe, key: RunKey | None = None, *, run_id: str | None = None
    ) -> None:
        f = recipe.federated
        # the server run's public identity, sent with every request ("server-run"): a client
        # trains at most once per (run, round); default: a fresh random one
        self.run_id = run_id if run_id is not None else secrets.token_hex(16)
        super().__init__(min_train_nodes=f.min_clients, min_available_nodes=f.min_clients)
        self.spec = get_strategy(f.strategy)
        self.device = resolve_device(recipe.training.device)  # the server step's linear algebra
        self.expected_clients = f.clients
        self.min_clients = f.min_clients
        self.round_timeout = f.round_timeout
        self.client_dp = f.client_dp
        self.accountant = recipe.privacy.accountant
        key = key if key is not None else RunKey.generate()
        self.coins = key.prf("client-coins")
        self.noise = GaussianNoise(key)
        self.ledger = Ledger()  # client-level DP events (one per round)
        self.rounds_released = 0
        self.current: State = {}
        self.sent: list[int] = []
        self.messages: list[Message] = []  # this round's, as sent (Flower stamps their ids)
        self.node_client: dict[int, int] = {}
        self.epsilon: dict[int, float] = {}  # the largest epsilon each client reported
        self.delta: dict[int, float] = {}  # and delta
        # who may have spent more than ``epsilon`` says: sent a request whose reply carried no
        # spend (no reply, or an error without one), named "client k" or, before the node's
        # first reply, "node n"; cleared by the next reply that reports the spend
        self.unconfirmed: set[str] = set()
        self.reports: dict[int, RoundReport] = {}
        # client id -> the rounds in which a second node answered for it (two nodes on one
        # partition-id): private, like every reply (see _sort)
        self.shared_partitions: dict[int, list[int]] = {}
        # clients whose replies said their randomness follows from an insecure-seed (their own
        # node config): the client_guarantee does not hold for their records
        self.insecure_clients: set[int] = set()

    # -- sending ---------------------------------------------------------------------------

    def _nodes(self, grid: Grid, server_round: int) -> list[int]:
        """Connected nodes.  Before the first round, wait up to ``round_timeout`` for all
        expected clients; later rounds wait (as long) only for ``min_clients``."""
        start = time.monotonic()
        while True:
            nodes = sorted(grid.get_node_ids())
            waited = time.monotonic() - start
            enough = len(nodes) >= (
                self.expected_clients if server_round == 1 else self.min_clients
            )
            if enough or waited >= self.round_timeout:
                return nodes
            time.sleep(0.2)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self.current = dict(arrays.to_torch_state_dict())
        nodes = self._nodes(grid, server_round)
        if self.client_dp is not None and self.client_dp.sample_rate < 1:
            words = self.coins.at(server_round, np.array(nodes, dtype=np.uint64))[:, 0]
            chosen = below(words, self.client_dp.sample_rate)
            nodes = [n for n, c in zip(nodes, chosen, strict=True) if c]
        self.sent = nodes
        # a copy per round: Flower's FedAvg passes the same ConfigRecord every round, and the
        # in-process simulation hands clients the objects themselves (a late client would
        # read the next round's number)
        config = ConfigRecord({**config, "server-round": server_round, "server-run": self.run_id})
        content = RecordDict({"arrays": arrays, "config": config})
        self.messages = [
            Message(content, dst_node_id=n, message_type=MessageType.TRAIN, ttl=self.round_timeout)
            for n in nodes
        ]
        return list(self.messages)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return []  # the server evaluates the global model itself (see server.py)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> None:
        return None

    # -- receiving -------------------------------------------------------------------------

    def _sender(self, msg: Message) -> int | None:
        """The node a reply stands for: its source, or for an error the SuperLink wrote in a
        node's place (the request expired or its node is gone) the request's destination
        (None when the request is not one of this round's).  Flower never gives a node the
        SuperLink's id."""
        if not _from_superlink(msg):
            return msg.metadata.src_node_id
        asked = msg.metadata.reply_to_message_id
        return next(
            (m.metadata.dst_node_id for m in self.messages if m.metadata.message_id == asked), None
        )

    def _failure(self, msg: Message) -> str:
        """Why an error reply failed: the client's error, or the SuperLink's reason for not
        delivering one."""
        code, reason = msg.error.code, msg.error.reason or f"error code {msg.error.code}"
        if _from_superlink(msg) and code in _EXPIRED:
            return f"no reply within {self.round_timeout:g} s (the request expired)"
        return reason

    def _sort(self, report: RoundReport, replies: Iterable[Message]) -> list[RecordDict]:
        """Sort replies into updates (returned), declines and failures (in ``report``).

        A request carries ``ttl = round_timeout``; the SuperLink answers a request that
        expired unanswered (or whose node is gone) with its own error reply, sent from
        ``SUPERLINK_NODE_ID``.  Flower's grid waits ``round_timeout`` from the end of the
        push, the TTL counts from the message's creation: which of the two ends the wait
        depends on how busy the server is.  Either way the request's node has not answered
        in time, so such an error is charged to the destination of the request it answers
        (one failure per sent node, whichever clock ran out first), never to the SuperLink.
        """
        updates, answered = [], set()
        first: dict[int, int] = {}  # client id -> the node whose reply for it came first
        for msg in replies:
            node = self._sender(msg)
            if node is None:  # a SuperLink error about a request not of this round
                continue
            answered.add(node)
            if msg.has_error():
                name = self._name(node)
                report.failures[name] = self._failure(msg)
                self.unconfirmed.add(name)
                continue
            m = msg.content["metrics"]
            cid = int(m["client"])
            self.node_client[node] = cid
            if cid in first:  # a second reply for one client in one round
                self._second_reply(report, cid, node, first[cid], m)
                continue
            if int(m.get("insecure-seed", 0)):
                self.insecure_clients.add(cid)
            first[cid] = node
            self.unconfirmed -= {f"client {cid}", f"node {node}"}  # its spend, reported
            # a client's spend only grows; a decline's delta lacks the noise sampler's
            # truncation term: never report less than an earlier reply did
            self.epsilon[cid] = max(self.epsilon.get(cid, 0.0), float(m["epsilon"]))
            entry = {"epsilon": float(m["epsilon"]), "steps": int(m["steps"])}
            if "delta" in m:
                entry["delta"] = float(m["delta"])
                self.delta[cid] = max(self.delta.get(cid, 0.0), entry["delta"])
            if "num-people" in m and int(m["num-people"]):  # the client's own unit: a person
                entry["people"] = int(m["num-people"])
            if "failed" in m and int(m["failed"]):  # it failed after reading its ledger
                reason = str(msg.content["status"]["reason"])
                entry.update(status="failed", reason=reason)
                report.failures[f"client {cid}"] = reason
            elif int(m["declined"]):
                entry.update(status="declined", reason=str(msg.content["status"]["reason"]))
            else:
                entry["status"] = "trained"
                updates.append(msg.content)
            report.clients[cid] = entry
        for node in set(self.sent) - answered:
            name = self._name(node)
            report.failures[name] = f"no reply within {self.round_timeout:g} s"
            self.unconfirmed.add(name)
        return updates

    def _second_reply(
        self, report: RoundReport, cid: int, node: int, earlier: int, m: MetricRecord
    ) -> None:
        """A reply for client ``cid`` after one already came this round: its spend counts
        (the largest reported), its update is dropped (one update per client per round: the
        weights, and client-level DP's sensitivity ``C`` per client, assume it).  From the
        same node it is a redelivered request (the client declines a repeat: one training per
        round); from another node, two nodes share partition-id ``cid`` (recorded: if both
        hold the same records, with separate state directories, those records were trained
        twice this round, beyond the run's ``client_guarantee``)."""
        self.epsilon[cid] = max(self.epsilon.get(cid, 0.0), float(m["epsilon"]))
        if "delta" in m:
            self.delta[cid] = max(self.delta.get(cid, 0.0), float(m["delta"]))
        self.unconfirmed.discard(f"node {node}")
        if node != earlier:
            rounds = self.shared_partitions.setdefault(cid, [])
            rounds.append(report.round)
            report.failures[f"node {node}"] = (
                f"answered for client {cid}, which node {earlier} answered for this round: two "
                f"nodes share partition-id {cid}; its reply is not aggregated. Fix: give each "
                "SuperNode its own partition-id"
            )

    def _name(self, node: int) -> str:
        who = self.node_client.get(node)
        return f"client {who}" if who is not None else f"node {node}"

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        report = self.reports[server_round] = RoundReport(server_round)
        updates = self._sort(report, replies)
        report.updates = len(updates)
        if self.client_dp is not None:
            mean = self._private_mean(updates)
            p, sigma = self.client_dp.sample_rate, self.client_dp.noise_multiplier
            self.ledger.record(Event(sample_rate=p, noise_multiplier=sigma))
            report.client_dp_epsilon = self.ledger_epsilon()
        elif len(updates) < self.min_clients:
            report.note = (
                f"{len(updates)} update(s), fewer than min_clients={self.min_clients}: "
                "the global adapters are kept"
            )
            return None, MetricRecord({"updates": len(updates)})
        else:
            mean = dict(aggregate_arrayrecords(updates, "num-examples").to_torch_state_dict())
        self.current = self.spec.merge(self.current, mean, self.device)
        report.aggregated = True
        return ArrayRecord(self.current), MetricRecord({"updates": len(updates)})

    def ledger_epsilon(self) -> float | None:
        """Client-level epsilon of the rounds so far (None without client-level DP)."""
        if self.client_dp is None:
            return None
        if not self.ledger.events:
            return 0.0
        return get_accountant(self.accountant).epsilon(self.ledger.events, self.client_dp.delta)

    def ledger_delta(self) -> float | None:
        """Client-level delta including the noise sampler's truncation term."""
        eps = self.ledger_epsilon()
        if eps is None or self.client_dp is None:
            return None
        return self.client_dp.delta + truncation_delta(eps, self.noise.pairs)

    def _private_mean(self, updates: list[RecordDict]) -> State:
        """``g + (sum_k clip(u_k - g, C) + N(0, (sigma C)^2)) / (p K)`` over the sent factors."""
        assert self.client_dp is not None
        c, sigma = self.client_dp.clip, self.client_dp.noise_multiplier
        keys = [k for k in self.current if self.spec.trainable(k)]
        total = {k: torch.zeros_like(self.current[k]) for k in keys}
        for content in updates:
            u = content["arrays"].to_torch_state_dict()
            delta = {k: u[k].to(self.current[k].dtype) - self.current[k] for k in keys}
            norm = norm_bound(delta.values())  # float64, rounded up
            if not torch.isfinite(norm):  # min(1, C / nan) is 1: it would enter unclipped
                continue  # dropped: contributes 0, within C like any clipped update
            # min(1, C / norm) rounded toward zero into each delta's dtype, so ||scale d|| <= C
            scales = {d.dtype: clip_coef(norm, c, d.dtype, eps=0.0) for d in delta.values()}
            for k in keys:
                total[k] += scales[delta[k].dtype].to(delta[k].device) * delta[k]
        denom = self.client_dp.sample_rate * self.expected_clients
        self.noise.begin_step(self.rounds_released)  # round r's noise: counter (r, block)
        self.rounds_released += 1
        return {
            k: self.current[k] + (total[k] + self.noise(total[k], sigma * c)) / denom for k in keys
        }
