"""Tensors the engine makes follow their inputs' device, never torch's default device.

CI has no GPU, and a factory call without ``device=`` (``torch.zeros(n)``) makes a CPU tensor
that breaks on CUDA (two such calls, in the check's reference loop and the probe, failed every
CUDA run until a lent H200 found them). Here the default device is ``meta`` while the model
and batches stay on the CPU: any tensor made on the default device meets a CPU one and raises.
Code under ``torch._C.DisableTorchFunction`` bypasses the default-device mode, so it is not
covered here (``benchmarks/gpu_check.sh`` covers it on a GPU; tests/engine/test_factory_devices.py
reads the source for factory calls without ``device=``, in every path).
"""

from __future__ import annotations

import pytest
import torch

from dptrain.diagnose import check_model
from dptrain.losses import causal_lm_loss
from dptrain.policies import ErrorFeedbackPolicy

from .._support import lm_batch, lora, make, tiny_gpt2, tiny_llama


def _models():
    return {
        "gpt2": lambda: tiny_gpt2(),
        "llama-lora": lambda: lora(tiny_llama(), ["q_proj", "v_proj"]),
    }


@pytest.mark.parametrize(("name", "policy"), [("gpt2", "static"), ("llama-lora", "dice")])
def test_private_steps_make_no_tensor_on_the_default_device(name, policy):
    model = _models()[name]()
    kw = {"policy": ErrorFeedbackPolicy(0.1, 1.0, error_clip=0.1)} if policy == "dice" else {}
    engine = make(model, sigma=1.0, n=8, q=0.5, grouping="per_layer", opt="adamw", **kw)
    batches = [lm_batch(61, 4, 8, seed=s) for s in range(2)]  # made before the guard
    before = [p.detach().clone() for p in model.parameters()]
    with torch.device("meta"):
        for b in batches:  # the first step probes the model
            engine.step(b)
    assert engine.steps_taken == 2
    assert all(p.device.type == "cpu" for p in model.parameters())
    moved = [not torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True)]
    assert any(moved)


def test_the_exactness_check_makes_no_tensor_on_the_default_device():
    model = tiny_gpt2()
    batches = [lm_batch(61, 4, 8, seed=s) for s in range(2)]
    with torch.device("meta"):
        result = check_model(model, causal_lm_loss, batches)
    assert result.refusal is None
    assert result.exact
