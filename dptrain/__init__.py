"""dptrain: differentially private training and fine-tuning of PyTorch models and LLMs.

Python API in a few lines::

    engine = dptrain.PrivacyEngine(model, optimizer, policy=dptrain.StaticPolicy(clip=1.0,
        noise_multiplier=1.0), sample_rate=q, dataset_size=n, budget=dptrain.Budget(8.0, 1e-5))
    sampler = dptrain.PoissonSampler(record_ids, q)   # keyed coins; a fresh secret key
    for t in range(steps):
        engine.step(collate(sampler.sample(t)))
    print(engine.epsilon())
"""

from importlib import import_module
from typing import TYPE_CHECKING, Any

# Imported on first use (PEP 562), so that `dptrain epsilon` and `dptrain --help` start without
# torch or transformers: name -> the module that defines it.
_LAZY = {
    **dict.fromkeys(
        ("Budget", "BudgetExceeded", "Event", "Ledger", "calibrate_noise", "get_accountant"),
        "accountants",
    ),
    "check_model": "dptrain.diagnose",
    "PrivacyEngine": "dptrain.engine",
    "StepReport": "dptrain.engine",
    **dict.fromkeys(
        ("UnsupportedLayerError", "register_op", "register_scope"), "dptrain.grad_sample"
    ),
    **dict.fromkeys(("causal_lm_loss", "classification_loss", "perplexity"), "dptrain.losses"),
    "GaussianNoise": "dptrain.noise",
    **dict.fromkeys(
        (
            "ErrorFeedbackPolicy",
            "Policy",
            "StaticPolicy",
            "StepPlan",
            "make_policy",
            "register_policy",
        ),
        "dptrain.policies",
    ),
    "PoissonSampler": "dptrain.sampling",
    "RunKey": "dptrain.secret",
}

if TYPE_CHECKING:
    from accountants import Budget, BudgetExceeded, Event, Ledger, calibrate_noise, get_accountant

    from .diagnose import check_model
    from .engine import PrivacyEngine, StepReport
    from .grad_sample import UnsupportedLayerError, register_op, register_scope
    from .losses import causal_lm_loss, classification_loss, perplexity
    from .noise import GaussianNoise
    from .policies import (
        ErrorFeedbackPolicy,
        Policy,
        StaticPolicy,
        StepPlan,
        make_policy,
        register_policy,
    )
    from .sampling import PoissonSampler
    from .secret import RunKey


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'dptrain' has no attribute {name!r}")
    value = getattr(import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__version__ = "0.1.0"

__all__ = [
    "Budget",
    "BudgetExceeded",
    "ErrorFeedbackPolicy",
    "Event",
    "GaussianNoise",
    "Ledger",
    "PoissonSampler",
    "Policy",
    "PrivacyEngine",
    "RunKey",
    "StaticPolicy",
    "StepPlan",
    "StepReport",
    "UnsupportedLayerError",
    "calibrate_noise",
    "causal_lm_loss",
    "check_model",
    "classification_loss",
    "get_accountant",
    "make_policy",
    "perplexity",
    "register_op",
    "register_policy",
    "register_scope",
]
