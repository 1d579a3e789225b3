"""Private training with the Hugging Face ``transformers.Trainer``.

    from dptrain.integrations.hf import DPTrainer, PrivacyArguments

    trainer = DPTrainer(model, TrainingArguments("out", max_steps=100, max_grad_norm=0),
                        train_dataset=records, privacy=PrivacyArguments(epsilon=8, clip=1.0))
    trainer.train()          # keyed Poisson batches, clipped and noised steps, ledger, budget
    trainer.epsilon()

See :mod:`dptrain.integrations.hf.trainer` for what changes against the Trainer and
:mod:`dptrain.integrations.hf.arguments` for the settings it maps and refuses.
"""

from .arguments import DPTrainerError, PrivacyArguments
from .data import PadCollator, record_ids
from .losses import causal_lm_loss, default_loss, sequence_classification_loss
from .trainer import AppliedByEngine, DPTrainer, PrivacyCallback

__all__ = [
    "AppliedByEngine",
    "DPTrainer",
    "DPTrainerError",
    "PadCollator",
    "PrivacyArguments",
    "PrivacyCallback",
    "causal_lm_loss",
    "default_loss",
    "record_ids",
    "sequence_classification_loss",
]
