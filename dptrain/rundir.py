"""The run directory: resolved recipe, metadata, metrics, ledger, checkpoints, final model.

Layout (``README.txt`` in the directory says the same: what may be published)::

    README.txt           which files are public and which private
    secret.key           PRIVATE. The run key (mode 0600): every private random choice derives
                         from it; never copied into any other file (see dptrain.secret)
    recipe.yaml          public. The recipe as the user wrote it (with any --set overrides);
                         its fingerprint identifies the run on resume
    run.json             public. The resolved run plan (sample rate, delta, steps, the noise
                         multiplier as given or calibrated, accountant, budget, key mode), the
                         noise generator, status and, once finished, the guarantee: values
                         derived from the recipe, public counts (N) and released outputs only
                         (each field and its reason: dptrain.publication, enforced here)
    ledger.json          public. The privacy ledger, written before any model state it covers
    final/               public (the guarantee covers it). Adapter (peft) or model, loadable
                         with transformers / peft
    report/privacy.png   public. Epsilon spent per step (and the noise per step), a function
                         of ledger.json and run.json only (dptrain.figures)
    private/             PRIVATE (mode 0700). Un-noised statistics of private records:
      metrics.jsonl      one JSON object per logged step (loss, batch size, validation
                         perplexity, non-finite samples, ...)
      stats.json         validation perplexity before and after, the validation split's size,
                         truncated and non-finite sample counts, training time, records per
                         person, the canary check (read back on resume)
      training.png       the training loss, validation metrics and policy diagnostics per
                         step, drawn from metrics.jsonl and stats.json (dptrain.figures)
    checkpoints/step-00000100.pt   PRIVATE. Model/adapter, optimizer, engine (ledger, policy
                         state such as an error-feedback buffer, noise position)
    canaries.secret.json PRIVATE (with data.canaries). The audit canaries' secrets
    audit/               PRIVATE. Attack reports on private records
    .lock                held (flock) by the process training in the directory: a second
                         ``dptrain train`` into it is refused instead of interleaving files

Every file is written atomically: to a temporary name in the same directory, flushed and
fsynced, then renamed over the target, so a crash leaves the old file or the new, never half.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from accountants.ledger import Ledger, atomic_write

from .errors import UserError
from .publication import MOVED_TO_PRIVATE, check_public

CHECKPOINT_FORMAT = "dptrain-checkpoint"
CHECKPOINT_VERSION = 1


class CheckpointError(UserError, RuntimeError):
    """A checkpoint or run directory that cannot be used; the message names the file and the fix."""


def write_json(path: Path, obj: Any) -> None:
    atomic_write(path, lambda f: json.dump(obj, f, indent=2, sort_keys=True, default=str))


def read_json(path: Path) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path} is not valid JSON ({err}); it may be corrupted") from None


PUBLIC_FILES = ("recipe.yaml", "run.json", "ledger.json", "final/", "report/privacy.png")
"""What a run directory may publish (see the module docstring); nothing else."""

README = """dptrain run directory: what may be published

PUBLIC (free of private statistics, or covered by the run's (epsilon, delta) guarantee):
  recipe.yaml           the recipe (check that its paths and names reveal nothing secret)
  run.json              the plan, the noise, the guarantee: no statistic of private records
  ledger.json           the privacy ledger
  final/                the trained adapter or model (the guarantee covers it)
  report/privacy.png    epsilon spent per step: drawn from ledger.json and run.json only

PRIVATE (keep with the data; never publish):
  secret.key            the run key: whoever holds it can replay the coins and the noise
  private/              un-noised statistics of private records: metrics.jsonl (per-step
                        loss, batch size, time, validation perplexity), stats.json
                        (validation perplexities and size, truncated and non-finite counts,
                        training time, records per person, the canary check), training.png
                        (their plot)
  checkpoints/          resume state (optimizer, policy state, noise position)
  canaries.secret.json  the audit canaries' secrets (runs with data.canaries)
  audit/                attack reports on private records

The guarantee covers the training records only: records of the data file that went to the
validation split are exposed by the validation perplexity in private/ (and records declared
public are not protected at all).  run.json's "file_level" says what holds for the file.
"""


class RunDir:
    """Paths and atomic writers of one run directory."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.listeners: list[Callable[[dict[str, Any]], None]] = []  # see log()

    recipe = property(lambda self: self.path / "recipe.yaml")
    meta = property(lambda self: self.path / "run.json")
    key = property(lambda self: self.path / "secret.key")
    readme = property(lambda self: self.path / "README.txt")
    private = property(lambda self: self.path / "private")
    metrics = property(lambda self: self.path / "private" / "metrics.jsonl")
    stats = property(lambda self: self.path / "private" / "stats.json")
    ledger = property(lambda self: self.path / "ledger.json")
    checkpoints = property(lambda self: self.path / "checkpoints")
    final = property(lambda self: self.path / "final")

    lock_file = property(lambda self: self.path / ".lock")

    def exists(self) -> bool:
        return self.meta.exists()

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        """Hold an exclusive ``flock`` on ``.lock`` (creating the directory) while the block
        runs; another process holding it is refused with its pid.  The kernel drops the lock
        when the holder exits, even on SIGKILL, so a stale ``.lock`` file never blocks."""
        created = not self.path.exists()
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.lock_file, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as err:
            raise CheckpointError(
                f"cannot write to the run directory {self.path} ({err.strerror}). Fix: make it "
                "writable, or choose another output_dir / --output."
            ) from None
        held = False
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                held = True
            except OSError as err:
                if err.errno not in (errno.EWOULDBLOCK, errno.EACCES):
                    raise
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
                raise CheckpointError(
                    f"{self.path} is in use by another dptrain process (pid {holder}): two runs "
                    "in one directory would overwrite each other's checkpoints and ledger. Fix: "
                    "wait for it to finish (then --resume if needed), or choose another "
                    "output_dir / --output."
                ) from None
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            yield
        finally:
            # a run refused before writing anything leaves no directory behind; only the
            # holder cleans up, and before it releases the lock (a process that lost the race
            # for a directory it also created must not remove the winner's)
            if held and created and [p.name for p in self.path.iterdir()] == [".lock"]:
                self.lock_file.unlink()
                self.path.rmdir()
            os.close(fd)  # releases the lock

    def started(self) -> bool:
        """Whether anything of a run was ever written here beyond its recipe, README and key
        (a key that never drew a step's coins and noise may be reused: ``secret.key`` records
        when it first did, see :meth:`dptrain.secret.RunKey.mark_used`)."""
        return (
            self.meta.exists()
            or self.ledger.exists()
            or self.metrics.exists()
            or self.stats.exists()
            or bool(self.checkpoint_files())
            or self.final.exists()
        )

    def read_meta(self) -> dict[str, Any]:
        return read_json(self.meta)

    def write_meta(self, meta: dict[str, Any]) -> None:
        """Write ``run.json``: only fields :mod:`dptrain.publication` classifies as public
        (any other is refused); the private fields an earlier version kept there
        (:data:`~dptrain.publication.MOVED_TO_PRIVATE`, read back on resume) go to
        ``private/stats.json`` instead, which keeps any value it already has."""
        legacy = {k: meta[k] for k in MOVED_TO_PRIVATE & meta.keys()}
        public = {k: v for k, v in meta.items() if k not in legacy}
        check_public(public)
        if legacy:
            self.update_stats(**{**legacy, **self.read_stats()})
        write_json(self.meta, public)

    def update_meta(self, **changes: Any) -> dict[str, Any]:
        meta = self.read_meta() if self.meta.exists() else {}
        meta.update(changes)
        self.write_meta(meta)
        return meta

    # -- what may be published, and the private statistics ---------------------------------

    def write_readme(self) -> None:
        """``README.txt``: which files may be published (:data:`README`)."""
        atomic_write(self.readme, lambda f: f.write(README))

    def _private_dir(self) -> Path:
        self.private.mkdir(mode=0o700, parents=True, exist_ok=True)
        return self.private

    def read_stats(self) -> dict[str, Any]:
        """``private/stats.json`` (empty if not written yet)."""
        return read_json(self.stats) if self.stats.exists() else {}

    def update_stats(self, **changes: Any) -> dict[str, Any]:
        """Merge ``changes`` into ``private/stats.json`` (private statistics, atomically)."""
        self._private_dir()
        stats = {**self.read_stats(), **changes}
        write_json(self.stats, stats)
        return stats

    def clean_partial(self) -> list[Path]:
        """Remove temporary files left by writes that a crash interrupted (never the targets)."""
        stale = [p for p in self.path.rglob(".*.tmp") if p.is_file()]
        stale += [p for p in self.path.glob(".final-*") if p.is_dir()]
        for p in stale:
            if p.is_dir():
                import shutil

                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
        return stale

    # -- metrics ---------------------------------------------------------------------------

    def log(self, record: dict[str, Any]) -> None:
        """Append ``record`` to ``private/metrics.jsonl`` (mode 0600: private statistics),
        then hand the same record to each of ``listeners`` (experiment loggers, plain log
        lines: :mod:`dptrain.steplog`), so they show nothing the file does not hold."""
        self._private_dir()
        fd = os.open(self.metrics, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        with os.fdopen(fd, "a") as f:
            f.write(json.dumps(record, default=float) + "\n")
            f.flush()
        for listener in self.listeners:
            listener(record)

    def truncate_metrics(self, after_step: int) -> None:
        """Drop records of steps beyond ``after_step`` (replayed after a resume)."""
        if not self.metrics.exists():
            return
        keep = []
        for line in self.metrics.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a crash
            if rec.get("step", 0) <= after_step:
                keep.append(line)
        atomic_write(self.metrics, lambda f: f.write("".join(x + "\n" for x in keep)))

    def read_metrics(self) -> list[dict[str, Any]]:
        if not self.metrics.exists():
            return []
        out = []
        for line in self.metrics.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return out

    # -- checkpoints -----------------------------------------------------------------------

    def save_ledger(self, ledger: Ledger) -> None:
        """Write ``ledger.json`` atomically; a full disk is a :class:`CheckpointWriteError`
        (the ledger on disk is then the previous one, which covers every saved checkpoint)."""
        try:
            ledger.save(self.ledger)
        except OSError as err:
            if err.errno not in DISK_FULL:
                raise
            raise CheckpointWriteError(self, "the ledger (ledger.json)", err) from err

    def checkpoint_files(self) -> list[Path]:
        if not self.checkpoints.exists():
            return []
        return sorted(self.checkpoints.glob("step-*.pt"))

    def save_checkpoint(self, step: int, state: dict[str, Any], *, keep: int = 2) -> Path:
        state = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "step": step, **state}
        path = self.checkpoints / f"step-{step:08d}.pt"
        try:
            atomic_write(path, lambda f: torch.save(state, f), binary=True)
        except (OSError, RuntimeError) as err:
            if isinstance(err, RuntimeError) and not _is_write_failure(err):
                raise
            # torch's zip writer reports the file's OSError (e.g. ENOSPC) as "unexpected pos":
            # the OSError it swallowed says what happened
            cause = err.__context__ if isinstance(err.__context__, OSError) else err
            raise CheckpointWriteError(self, f"checkpoint step {step}", cause) from err
        for old in self.checkpoint_files()[:-keep]:
            old.unlink(missing_ok=True)
        return path

    def load_checkpoint(self, fingerprint: str | None = None) -> dict[str, Any] | None:
        """The newest readable checkpoint (older ones are tried if the newest is corrupt)."""
        errors = []
        for path in reversed(self.checkpoint_files()):
            try:
                state = load_checkpoint_file(path)
            except CheckpointError as err:
                errors.append(str(err))
                continue
            if fingerprint is not None and state.get("fingerprint") != fingerprint:
                raise CheckpointError(
                    f"{path} was written by a different recipe (fingerprint {state.get('fingerprint')} "
                    f"vs {fingerprint}). Fix: resume with the recipe that started this run "
                    f"({self.recipe}), or start a new run in another output_dir."
                )
            return state
        if errors:
            raise CheckpointError("no usable checkpoint:\n  " + "\n  ".join(errors))
        return None


def _is_write_failure(err: RuntimeError) -> bool:
    """torch.save reports a failed write (a full disk, a quota) as a RuntimeError from its zip
    writer, e.g. ``[enforce fail at inline_container.cc:672] . unexpected pos``."""
    text = str(err)
    return any(s in text for s in ("inline_container", "PytorchStreamWriter", "file write failed"))


DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
"""The errnos of a write that failed for want of space (a full disk, a quota, a size limit)."""


class CheckpointWriteError(CheckpointError):
    """A run-directory file could not be written (a full disk, a quota): what is on disk is
    intact, and the one-line message says how to resume (``command``: the command that was
    running, filled in by the command layer)."""

    def __init__(self, run: RunDir, what: str, err: BaseException) -> None:
        kept = run.checkpoint_files()
        detail = " ".join(f"{type(err).__name__}: {err}".split())  # one line
        head = (
            f"could not write {what} in {run.path} ({detail}). Nothing was lost: every write "
            "is atomic, and"
        )
        full = getattr(err, "errno", None) in DISK_FULL
        fix = (
            "free disk space" if full else "remove the cause named above (a full disk, permissions)"
        )
        self.run_dir = run.path
        self.command = "dptrain train RECIPE"
        # without a checkpoint a resume starts over from step 0: refused once the key drew noise
        self.resumable = bool(kept) or not _key_used(run)
        if kept:
            self.state = (
                f"{head} the last checkpoint ({kept[-1].name}) and the ledger covering it are "
                f"intact. Fix: {fix}, then continue with"
            )
        elif self.resumable:
            self.state = f"{head} no checkpoint was written yet. Fix: {fix}, then run again with"
        else:
            self.state = (
                f"{head} no checkpoint was written yet; the run key has drawn noise, so this run "
                f"cannot resume (starting over would repeat that noise). Fix: {fix}, "
                f"then start a new run in another output_dir (or delete {run.path} first)"
            )
        super().__init__(self.state)

    def __str__(self) -> str:
        if not self.resumable:
            return self.state
        return f"{self.state} `{self.command} --resume {self.run_dir}`"


def _key_used(run: RunDir) -> bool:
    """Whether the run's ``secret.key`` has drawn coins and noise (no file: an insecure seed,
    which :meth:`dptrain.secret.RunKey.refuse_restart` never refuses)."""
    from .secret import RunKey, RunKeyError

    if not run.key.exists():
        return False
    try:
        return RunKey.read(run.key).used
    except RunKeyError:
        return False  # the resume names what is wrong with the key


def load_checkpoint_file(path: Path) -> dict[str, Any]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise CheckpointError(
            f"{path} cannot be read ({type(err).__name__}: {err}); it is corrupted or not a checkpoint"
        ) from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not a dptrain checkpoint (foreign file)")
    if state.get("version") != CHECKPOINT_VERSION:
        raise CheckpointError(
            f"{path} has checkpoint version {state.get('version')}, this dptrain reads {CHECKPOINT_VERSION}"
        )
    return state


def save_final(model: Any, tokenizer: Any, path: Path) -> None:
    """Write the adapter (peft) or full model plus tokenizer, atomically as a directory."""
    import shutil

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".final-", dir=path.parent))
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if path.exists():
        old = path.with_name(".final-old")
        shutil.rmtree(old, ignore_errors=True)
        path.rename(old)
        tmp.rename(path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(path)


def versions() -> dict[str, str]:
    """The Python and package versions a run records in ``run.json``."""
    import importlib.metadata as md
    import platform

    out = {"python": platform.python_version()}
    for pkg in ("dptrain", "torch", "transformers", "peft", "dp-accounting", "prv-accountant"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = "not installed"
    return out
