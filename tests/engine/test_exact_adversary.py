"""Adversarial cases of the exactness matrix (see ``builders_adversary``): batch rows reordered
between layers, parameters under ``no_grad``, op sequences that depend on the data, layer options
and transformers architectures the other modules lack, padding-only samples and physical batches
with a remainder.  Judged like the rest of the matrix (``harness.run_case``)."""

from __future__ import annotations

import pytest

from .builders import CAUSAL_LMS, Case, hf_case, lm_batch
from .builders_adversary import (
    ADVERSARY_CASES,
    ADVERSARY_STEPS,
    MORE_HF,
    all_padding_batch,
    more_hf_case,
)


@pytest.mark.parametrize("name", list(ADVERSARY_CASES))
def test_adversary_layer(exact, name):
    exact("adversarial torch.nn", name, ADVERSARY_CASES[name])


@pytest.mark.parametrize("name", list(ADVERSARY_STEPS))
def test_adversary_steps(exact, name):
    case, kwargs = ADVERSARY_STEPS[name]
    exact("adversarial torch.nn", name, case, **kwargs)


@pytest.mark.parametrize("arch", list(MORE_HF))
def test_more_architectures(exact, arch):
    exact("more transformers architectures", arch, more_hf_case(arch))


# llama: the loop's gradient of the padding-only sample is not finite (eager attention over a
# fully masked row), so the yardstick has no clip to set; not an engine case
@pytest.mark.parametrize("arch", ["gpt2"])
def test_all_padding_sample(exact, arch):
    base = hf_case(arch)
    case = Case(base.build, all_padding_batch(lm_batch), base.loss)
    exact("adversarial inputs", f"{arch} one sample all padding", case, sizes=(4,))


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_physical_batch_remainder(exact, arch):
    exact(
        "adversarial inputs",
        f"{arch} 5 samples in physical batches of 2",
        hf_case(arch),
        sizes=(5,),
        max_physical_batch_size=2,
    )


@pytest.mark.parametrize("arch", ["mixtral-moe", "qwen3-moe", "qwen2-moe", "deepseek-v3"])
def test_moe_routing_changes(exact, arch):
    """Three steps on different batches (1, 3 and 2 samples), the model moving between them:
    experts hit in the planned batch are not hit in the next, and the other way round."""
    case = hf_case(arch) if arch in CAUSAL_LMS else more_hf_case(arch)
    exact("adversarial inputs", f"{arch} routing changes", case, sizes=(1, 3, 2), lr=1.0)
