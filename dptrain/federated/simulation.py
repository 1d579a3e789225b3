"""In-process Flower simulation: Flower's Simulation Runtime with the ClientApps run on its
worker threads in this process.

Flower 1.41's ``run_simulation`` is the Simulation Runtime (an in-memory LinkState and Grid,
the ServerApp on a thread, one registered node per client, worker threads that pull each
node's messages and hand them to a ``Backend``).  Its only ``Backend`` is Ray's, which the
``flwr[simulation]`` extra installs: ray 2.55.1, a 74 MB wheel that unpacks to 240 MB and
starts a Ray cluster (several seconds) whose worker processes each import torch again.
:class:`InProcessBackend` implements Flower's ``Backend`` interface instead: it runs the
ClientApp on the calling worker thread.  Everything else -- messages, node contexts,
partition ids, error replies for a crashing ClientApp, round timeouts -- is Flower's.

``start_vce`` names the Ray backend by importing it from a fixed module, so
:func:`in_process_backend` puts a module holding :class:`InProcessBackend` under that name
for the duration of the call (restoring whatever was there).
"""

from __future__ import annotations

import logging
import sys
import types
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from unittest import mock

from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import Mod
from flwr.server.superlink.fleet.vce.backend import Backend, BackendConfig
from flwr.simulation import run_simulation

from .client import make_client_app
from .holder import ClientConfig, one_node_per_partition, simulated
from .recipe import FederatedRecipe, client_state_root
from .server import make_server_app, start_run

RAY_BACKEND_MODULE = "flwr.server.superlink.fleet.vce.backend.raybackend"


class InProcessBackend(Backend):
    """Runs each ClientApp call on the Simulation Runtime's worker thread that asked."""

    def __init__(self, backend_config: BackendConfig) -> None:
        super().__init__(backend_config)
        self._workers = int(backend_config.get("init_args", {}).get("num_workers", 1))
        self._app_fn: Callable[[], ClientApp] | None = None

    def build(self, app_fn: Callable[[], ClientApp]) -> None:
        self._app_fn = app_fn

    @property
    def num_workers(self) -> int:
        return self._workers

    def is_worker_idle(self) -> bool:
        return True

    def terminate(self) -> None:
        self._app_fn = None

    def process_message(self, message: Message, context: Context) -> tuple[Message, Context]:
        assert self._app_fn is not None, "build() first"
        return self._app_fn()(message, context), context


@contextmanager
def in_process_backend() -> Iterator[None]:
    """Make Flower's Simulation Runtime use :class:`InProcessBackend`."""
    shim = types.ModuleType(RAY_BACKEND_MODULE)
    shim.RayBackend = InProcessBackend  # type: ignore[attr-defined]
    with mock.patch.dict(sys.modules, {RAY_BACKEND_MODULE: shim}):
        yield


@contextmanager
def flower_log_level(level: int) -> Iterator[None]:
    logger = logging.getLogger("flwr")
    old = logger.level
    logger.setLevel(level)
    try:
        yield
    finally:
        logger.setLevel(old)


def simulate(
    recipe: FederatedRecipe,
    run_dir: str | Path | None = None,
    *,
    mods: list[Mod] | None = None,
    verbose: bool = False,
    clients: dict[int, ClientConfig] | None = None,
) -> dict[str, Any]:
    """Run ``recipe`` as an in-process Flower simulation; returns the run's metadata.

    One node per client (``partition-id`` = client index, each with its own state directory:
    a set-up that shares one is refused, :func:`~dptrain.federated.holder.one_node_per_partition`);
    ``mods`` are Flower mods around
    every ClientApp call (tests use them to inject faults).  Clients run on up to
    ``federated.clients`` threads, so a client that hangs does not hold up the others.  Client ``k``'s
    own settings are ``clients[k]`` where given, else :func:`~dptrain.federated.holder.simulated`
    (the recipe's privacy section, state in ``federated.state_dir/client-k``).
    """
    run_path = recipe.run_dir(run_dir)
    state_root = client_state_root(recipe, run_path)  # checked before the run dir is made
    f = recipe.federated
    own = {k: (clients or {}).get(k) or simulated(recipe, k, state_root) for k in range(f.clients)}
    one_node_per_partition({**(clients or {}), **own}, f.clients)  # before the run dir is made
    run = start_run(recipe, run_path)

    def config(context: Context) -> ClientConfig:
        # Flower's Simulation Runtime starts one node per partition-id 0..clients-1
        return own[int(context.node_config["partition-id"])]

    server_app = make_server_app(recipe, run)
    client_app = make_client_app(recipe, config, mods)
    with in_process_backend(), flower_log_level(logging.INFO if verbose else logging.CRITICAL):
        run_simulation(
            server_app,
            client_app,
            num_supernodes=f.clients,
            backend_name="in-process",
            backend_config={"init_args": {"num_workers": f.clients}},
        )
    return run.read_meta()
