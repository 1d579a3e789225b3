"""Deployment: the ServerApp and ClientApps as Flower's own processes, talking over a network.

A Flower deployment is a SuperLink (the server side; it runs the ServerApp in a
``flwr-serverapp`` subprocess), one SuperNode per client (each runs the ClientApp in a
``flwr-clientapp`` subprocess per message), and ``flwr run APP_DIR CONNECTION``, which
submits a Flower App (here: a directory holding only a pyproject.toml that names
:mod:`dptrain.federated.app` and carries the recipe) to the SuperLink.

:func:`write_app` writes that directory; :class:`LoopbackFederation` starts a SuperLink and
the SuperNodes on 127.0.0.1 (free ports, no TLS, nothing reachable from outside) and always
stops every process it started, with its children.  On real machines, run the same
commands by hand (see README): ``flower-superlink`` on the server, ``flower-supernode
--superlink HOST:PORT --node-config "partition-id=K num-partitions=N state-dir='...'
epsilon=8.0"`` on each client (the data holder's own settings:
:mod:`dptrain.federated.holder`), then ``flwr run``.  On the loopback federation one operator
plays every data holder: client ``k`` gets the recipe's privacy section as its own settings.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, Any

import tomli_w

from ..recipe import dump_recipe
from .holder import ClientConfig, ClientConfigError, one_node_per_partition, simulated
from .recipe import FederatedRecipe, client_state_root

CONNECTION = "dptrain-loopback"
STARTUP_TIMEOUT = 60.0


def write_app(recipe: FederatedRecipe, app_dir: str | Path, output_dir: str | Path) -> Path:
    """Write a Flower App directory for ``recipe`` whose server writes into ``output_dir``."""
    app_dir = Path(app_dir)
    app_dir.mkdir(parents=True, exist_ok=True)
    project = {
        "build-system": {"requires": ["setuptools>=68"], "build-backend": "setuptools.build_meta"},
        "project": {
            "name": "dptrain-federated",
            "version": "0.1.0",
            "description": f"dptrain federated recipe {recipe.name}",
            "license": "Apache-2.0",
            "dependencies": [],
        },
        "tool": {
            "flwr": {
                "app": {
                    "publisher": "dptrain",
                    "components": {
                        "serverapp": "dptrain.federated.app:serverapp",
                        "clientapp": "dptrain.federated.app:clientapp",
                    },
                    "config": {
                        "recipe": dump_recipe(recipe),
                        "output-dir": str(Path(output_dir).resolve()),
                    },
                }
            }
        },
    }
    (app_dir / "pyproject.toml").write_text(tomli_w.dumps(project))
    return app_dir


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def flower_env(flwr_home: Path) -> dict[str, str]:
    """The environment of Flower's processes: this Python's tools and this dptrain first on
    the path, a private FLWR_HOME, no telemetry, no update check, no runtime installs."""
    import dptrain

    bin_dir = str(Path(sys.executable).parent)
    src = str(Path(dptrain.__file__).resolve().parents[1])
    env = dict(os.environ)
    env.update(
        PATH=os.pathsep.join([bin_dir, env.get("PATH", "")]),
        PYTHONPATH=os.pathsep.join(p for p in [src, env.get("PYTHONPATH", "")] if p),
        FLWR_HOME=str(flwr_home),
        FLWR_TELEMETRY_ENABLED="0",
        FLWR_DISABLE_UPDATE_CHECK="1",
        PYTHONUNBUFFERED="1",
    )
    return env


class LoopbackFederation:
    """A SuperLink and ``clients`` SuperNodes on 127.0.0.1, as separate processes.

    Use as a context manager; :meth:`close` stops every process group it started.
    ``configs[k]`` is client k's own settings (its state directory -- ledger and key -- is
    kept across restarts), passed to its SuperNode as node config.
    """

    def __init__(self, clients: int, workdir: str | Path, configs: list[ClientConfig]) -> None:
        if len(configs) != clients:
            raise ValueError(f"{clients} clients need {clients} client configs")
        one_node_per_partition(dict(enumerate(configs)), clients)
        self.clients = clients
        self.workdir = Path(workdir)
        self.configs = list(configs)
        self.logs = self.workdir / "logs"
        self.env = flower_env(self.workdir / "flwr-home")
        self.port = free_port()
        self.superlink: subprocess.Popen | None = None
        self.supernodes: dict[int, subprocess.Popen] = {}
        self._files: list[IO[Any]] = []

    def __enter__(self) -> LoopbackFederation:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _spawn(self, name: str, args: list[str]) -> subprocess.Popen:
        self.logs.mkdir(parents=True, exist_ok=True)
        log = open(self.logs / f"{name}.log", "ab")
        self._files.append(log)
        return subprocess.Popen(
            args, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )

    def start(self) -> None:
        home = Path(self.env["FLWR_HOME"])
        home.mkdir(parents=True, exist_ok=True)
        (home / "config.toml").write_text(
            tomli_w.dumps(
                {
                    "superlink": {
                        "default": CONNECTION,
                        CONNECTION: {"address": f"127.0.0.1:{self.port}", "insecure": True},
                    }
                }
            )
        )
        self.superlink = self._spawn(
            "superlink",
            [
                "flower-superlink",
                "--insecure",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--disable-runtime-dependency-installation",
            ],
        )
        self._wait_for_superlink()
        for k in range(self.clients):
            self.start_client(k)

    def _wait_for_superlink(self) -> None:
        import httpx

        deadline = time.monotonic() + STARTUP_TIMEOUT
        while time.monotonic() < deadline:
            assert self.superlink is not None
            if self.superlink.poll() is not None:
                raise RuntimeError(f"flower-superlink exited; see {self.logs / 'superlink.log'}")
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}/health", timeout=1.0).is_success:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise TimeoutError(f"flower-superlink did not start in {STARTUP_TIMEOUT:g} s")

    def start_client(self, k: int) -> None:
        """Start (or restart) client ``k``'s SuperNode; refused while one runs (two nodes on
        partition-id ``k``: see :func:`~dptrain.federated.holder.one_node_per_partition`)."""
        running = self.supernodes.get(k)
        if running is not None and running.poll() is None:
            raise ClientConfigError(
                f"client {k}'s SuperNode is running: a second node on partition-id {k} would "
                "train its records twice per round. Fix: stop_client(k) before restarting it"
            )
        config = self.configs[k].node_config(k, self.clients)
        self.supernodes[k] = self._spawn(
            f"supernode-{k}",
            [
                "flower-supernode",
                "--insecure",
                "--superlink",
                f"127.0.0.1:{self.port}",
                "--port",
                str(free_port()),
                "--node-config",
                config,
            ],
        )

    def stop_client(self, k: int, sig: int = signal.SIGKILL) -> None:
        """Stop client ``k``'s SuperNode and its ClientApp processes (SIGKILL: a crash)."""
        _stop(self.supernodes.pop(k), sig)

    def run(
        self, app_dir: str | Path, timeout: float, *, stream: bool = False
    ) -> subprocess.CompletedProcess:
        """``flwr run APP_DIR --stream`` against this federation, bounded by ``timeout``;
        its output is captured, or shown as it comes with ``stream``."""
        return subprocess.run(
            ["flwr", "run", str(app_dir), CONNECTION, "--stream"],
            env=self.env,
            capture_output=not stream,
            text=True,
            timeout=timeout,
        )

    def close(self) -> None:
        for k in list(self.supernodes):
            _stop(self.supernodes.pop(k), signal.SIGTERM)
        if self.superlink is not None:
            _stop(self.superlink, signal.SIGTERM)
            self.superlink = None
        for f in self._files:
            f.close()
        self._files.clear()


def _stop(proc: subprocess.Popen, sig: int) -> None:
    """Signal the process group ``proc`` leads (it and its children), escalate to SIGKILL,
    and wait until no process of the group is left."""
    try:
        os.killpg(proc.pid, sig)
        proc.wait(timeout=10)
    except ProcessLookupError:
        pass
    except subprocess.TimeoutExpired:
        pass
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # children that outlived their leader
        except ProcessLookupError:
            break
        proc.poll()
        time.sleep(0.1)


def deploy(
    recipe: FederatedRecipe,
    run_dir: str | Path | None = None,
    *,
    timeout: float | None = None,
    stream: bool = False,
) -> tuple[Path, subprocess.CompletedProcess]:
    """Run ``recipe`` on a loopback federation; returns (run directory, ``flwr run`` result)."""
    run_path = recipe.run_dir(run_dir).resolve()
    if (run_path / "run.json").exists():
        from ..recipe import RecipeError

        raise RecipeError(f"output directory {run_path} already holds a run; choose another")
    f = recipe.federated
    state_root = client_state_root(recipe, run_path)
    work = run_path / "flower"  # the app, Flower's home and the processes' logs
    configs = [simulated(recipe, k, state_root) for k in range(f.clients)]
    app = write_app(recipe, work / "app", run_path)
    limit = timeout or (f.rounds + 1) * f.round_timeout + 120
    with LoopbackFederation(f.clients, work, configs) as federation:
        done = federation.run(app, timeout=limit, stream=stream)
    return run_path, done
