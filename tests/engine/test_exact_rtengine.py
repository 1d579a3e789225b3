"""Red-team cases of the exactness matrix (``builders_rtengine``): peft's LoRA on
``nn.MultiheadAttention``, transformers models that update a cache handed to a layer (on a
batch of one and in physical batches of one, where the re-run was silently wrong), a layer
applied across the batch axis, and layer options the other modules lack."""

from __future__ import annotations

import pytest
import torch

from dptrain.check import ExactnessCheck

from .builders_rtengine import RT_CASES, RT_HF, rt_hf_case
from .harness import EXPECTED_BATCH_SIZE


@pytest.mark.parametrize("name", list(RT_CASES))
def test_rt_layer(exact, name):
    exact("red team (rtengine)", name, RT_CASES[name])


VARIANTS = {
    "": {},
    " batch-1": {"sizes": (1,)},
    " physical-batch-1": {"sizes": (3,), "max_physical_batch_size": 1},
}


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("arch", list(RT_HF))
def test_rt_cache_models(exact, arch, variant):
    exact("red team (rtengine)", f"{arch}{variant}", rt_hf_case(arch), **VARIANTS[variant])


def test_lora_mha_leaves_frozen_weights_alone():
    """peft's merge/unmerge around the MHA call swaps the frozen weights: a step must leave
    their values as they were (the per-sample re-run used to change them by up to 1.2)."""
    case = RT_CASES["peft-lora-multihead-attention"]
    torch.manual_seed(0)
    model = case.build()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    check = ExactnessCheck(model, case.loss, 0.1, "flat", EXPECTED_BATCH_SIZE)
    try:
        check.engine_step(case.batch(3, 0))
    finally:
        check.close()
    now = dict(model.named_parameters())
    for n, before in frozen.items():
        torch.testing.assert_close(now[n].detach(), before, rtol=0, atol=1e-12, msg=n)
