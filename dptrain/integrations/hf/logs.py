"""Which of a ``DPTrainer`` log line's values the ``report_to`` integrations may receive.

A Trainer log line mixes released values with statistics of private records that no noise
covers.  The console, the user's own callbacks and the log history (``trainer_state.json`` of
the checkpoints, in ``output_dir``: private like the run key) get the whole line, as
``dptrain train``'s ``private/metrics.jsonl`` does; an experiment tracker (``report_to``: wandb, mlflow, tensorboard, ...) is a copy outside
the data owner's run directory, so by default it gets the released values only:

    public    ``epsilon`` (a function of the ledger), ``grad_norm`` (the norm of the released,
              noised update), ``learning_rate`` and ``epoch`` (functions of the step count)
    private   everything else: the training ``loss`` and ``train_loss`` (un-noised means over
              private batches), token counts (``num_input_tokens_seen``, ``total_flos``) and
              timings (they depend on the Poisson batch sizes), and any key a later
              ``transformers`` adds (an allow-list: unknown keys stay private)
    eval      ``eval_*`` metrics are statistics of ``eval_dataset``: private unless it is
              declared public (``PrivacyArguments.public_eval``)

``PrivacyArguments.report_private_metrics`` sends the whole line (the data owner's choice,
for a tracker only they can read).
"""

from __future__ import annotations

from typing import Any

from transformers import TrainerCallback
from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK

__all__ = ["PUBLIC_KEYS", "is_integration", "public_logs"]

PUBLIC_KEYS = frozenset({"epsilon", "grad_norm", "learning_rate", "epoch"})
EVAL_PREFIX = "eval_"

_INTEGRATIONS = tuple(INTEGRATION_TO_CALLBACK.values())


def is_integration(callback: TrainerCallback) -> bool:
    """Whether ``callback`` is an experiment tracker of ``report_to`` (also when added by hand)."""
    return isinstance(callback, _INTEGRATIONS)


def public_logs(logs: dict[str, Any], *, public_eval: bool) -> dict[str, Any]:
    """The values of ``logs`` that are released (see the module docstring), in their order."""
    return {
        k: v
        for k, v in logs.items()
        if k in PUBLIC_KEYS or (public_eval and k.startswith(EVAL_PREFIX))
    }
