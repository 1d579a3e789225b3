"""Where a logged training step goes besides ``metrics.jsonl``: experiment loggers
(``training.report_to``), a plain line per logged step for batch jobs (``--no-progress``), and
an estimate of the remaining time once the first steps are timed.

Everything here receives exactly the records written to ``metrics.jsonl``
(:meth:`dptrain.rundir.RunDir.log` calls its listeners with each one), so no logger ever sees
a value the metrics file does not hold; like that file, the TensorBoard event files
(``RUN_DIR/private/tensorboard/``, mode 0700) hold statistics of private data, for the data owner.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from accountants.progress import format_seconds

from .extras import require

__all__ = [
    "REPORTERS",
    "StepLog",
    "TensorBoardReporter",
    "check_reporters",
    "format_seconds",
]

ESTIMATE_AFTER_STEPS = 3  # steps of this session timed before the remaining time is estimated


class TensorBoardReporter:
    """Each numeric field of a metrics record as a scalar ``dptrain/<field>`` at its step."""

    def __init__(self, log_dir: Path) -> None:
        module = require(
            "torch.utils.tensorboard", "tensorboard", "training.report_to: [tensorboard]"
        )
        log_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(log_dir, 0o700)  # statistics of private data, like metrics.jsonl
        self.writer = module.SummaryWriter(log_dir=str(log_dir))

    def __call__(self, record: dict[str, Any]) -> None:
        step = int(record["step"])
        for name, value in record.items():
            if name != "step" and isinstance(value, int | float) and not isinstance(value, bool):
                self.writer.add_scalar(f"dptrain/{name}", float(value), step)

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()


REPORTERS: dict[str, Callable[[Path], Any]] = {
    "tensorboard": lambda run_dir: TensorBoardReporter(run_dir / "tensorboard")
}
_MODULES = {"tensorboard": ("torch.utils.tensorboard", "tensorboard")}


def check_reporters(names: list[str]) -> None:
    """Each logger of ``training.report_to`` is installed (checked before training starts)."""
    for name in names:
        module, extra = _MODULES[name]
        require(module, extra, f"training.report_to: [{name}]")


class StepLog:
    """Listener of the run's metrics records (rank 0 only).

    ``plain``: print ``step t/T  loss ...  epsilon ...  ETA ...`` for every logged record (the
    progress bar's replacement in batch jobs).  The remaining time is estimated from the wall
    clock of this session's steps (eval and checkpoints included), first announced once
    :data:`ESTIMATE_AFTER_STEPS` steps are done."""

    def __init__(
        self,
        run_dir: Path,
        *,
        total: int,
        first: int,
        report_to: list[str],
        plain: bool,
        echo: Callable[[str], None],
    ) -> None:
        self.total, self.first, self.plain, self.echo = total, first, plain, echo
        self.reporters = [REPORTERS[name](run_dir) for name in report_to]
        self.t0 = time.perf_counter()
        self.estimated = False

    def remaining_seconds(self, step: int) -> float:
        done = step - self.first
        if done <= 0:
            return math.nan
        return (time.perf_counter() - self.t0) / done * (self.total - step)

    def __call__(self, record: dict[str, Any]) -> None:
        step = int(record["step"])
        for reporter in self.reporters:
            reporter(record)
        eta = self.remaining_seconds(step)
        if self.plain:
            fields = [f"step {step}/{self.total}"]
            for name, fmt in (("loss", ".4f"), ("epsilon", ".4f"), ("batch_size", "d")):
                value = record.get(name)
                if isinstance(value, int | float) and not isinstance(value, bool):
                    fields.append(f"{name} {value:{fmt}}")
            if step < self.total:
                fields.append(f"remaining ~{format_seconds(eta)}")
            self.echo("  ".join(fields))
        if not self.estimated and step - self.first >= min(
            ESTIMATE_AFTER_STEPS, self.total - self.first
        ):
            self.estimated = True
            if step < self.total:
                per_step = (time.perf_counter() - self.t0) / (step - self.first)
                self.echo(
                    f"estimated time: ~{format_seconds(eta)} for the remaining "
                    f"{self.total - step} steps ({per_step:.2f} s/step over the first "
                    f"{step - self.first})"
                )

    def close(self) -> None:
        for reporter in self.reporters:
            close = getattr(reporter, "close", None)
            if close is not None:
                close()
