"""Adversarial cases of the exactness matrix (see ``builders_adversary``): batch rows reordered
between layers, parameters under ``no_grad``, op sequences that depend on the data, layer options
and transformers architectures the other modules lack, padding-only samples and physical batches
with a remainder.  Judged like the rest of the matrix (``harness.run_case``)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from dptrain import UnsupportedLayerError
from dptrain.check import ExactnessCheck
from dptrain.losses import token_nll

from .builders import CAUSAL_LMS, Case, hf_case, lm_batch
from .builders_adversary import (
    ADVERSARY_CASES,
    ADVERSARY_STEPS,
    EXACT4_CASES,
    EXACT4_COUPLED,
    MORE_HF,
    all_padding_batch,
    more_hf_case,
)
from .harness import EXPECTED_BATCH_SIZE, REFUSE_CLIP


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


# -- exact4 ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(EXACT4_CASES))
def test_exact4_layer(exact, name):
    exact("adversarial torch.nn (exact4)", name, EXACT4_CASES[name])


@pytest.mark.parametrize("name", list(EXACT4_COUPLED))
def test_exact4_coupled_refused(name):
    """A loss (or a backward pass) that couples samples has no per-sample gradient: the engine
    refuses, naming a fix, and hands the optimizer nothing."""
    case = EXACT4_COUPLED[name]
    torch.manual_seed(0)
    check = ExactnessCheck(case.build(), case.loss, REFUSE_CLIP, "flat", EXPECTED_BATCH_SIZE)
    # a coupling of loss values is placed (here: in the loss function); one that only the
    # backward pass sees cannot be, and the message says so
    hidden = "straight-through" in name or "backward" in name
    where = "No layer can be named" if hidden else "the loss function"
    try:
        with pytest.raises(UnsupportedLayerError, match=f"{where}.*Fix"):
            check.engine_step(case.batch(3, 0))
    finally:
        check.close()


def _hf_peft(arch: str, config: Any, loss: Any = None) -> Case:
    base = hf_case(arch)

    def make() -> Any:
        import peft

        model = base.build()
        torch.manual_seed(1)
        return peft.get_peft_model(model, config()).double().train()

    return Case(make, base.batch, loss or base.loss)


def _virtual_loss(n: int) -> Any:
    """Causal LM loss with the ``n`` virtual tokens peft prepends cut off the logits."""

    def loss(model: Any, batch: Any) -> Any:
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        return token_nll(out.logits[:, n:], batch["labels"]).mean_per_sample

    return loss


def _per_row_loss(model: Any, batch: Any) -> Any:
    """The model's own (mean) loss, the model called on one row at a time."""
    rows = range(batch["input_ids"].shape[0])
    return torch.stack([model(**{k: v[i : i + 1] for k, v in batch.items()}).loss for i in rows])


def _no_label_sample(base: Any) -> Any:
    def make(b: int, seed: int) -> Any:
        batch = base(b, seed)
        if b >= 2:
            batch["labels"][b // 2] = -100  # attended to, but no token is labelled
        return batch

    return make


def _peft_config(name: str, **kw: Any) -> Any:
    def config() -> Any:
        import peft

        return getattr(peft, name)(task_type="CAUSAL_LM", **kw)

    return config


EXACT4_HF: dict[str, tuple[Case, dict[str, Any]]] = {
    "gpt2 prefix tuning": (
        _hf_peft("gpt2", _peft_config("PrefixTuningConfig", num_virtual_tokens=3)),
        {},
    ),
    "llama prompt tuning": (
        _hf_peft(
            "llama", _peft_config("PromptTuningConfig", num_virtual_tokens=3), _virtual_loss(3)
        ),
        {},
    ),
    "llama adalora": (
        _hf_peft(
            "llama",
            _peft_config(
                "AdaLoraConfig",
                r=2,
                init_r=3,
                target_r=2,
                total_step=10,
                target_modules=["q_proj", "v_proj"],
                init_lora_weights=False,
            ),
        ),
        {},
    ),
    "llama ia3": (
        _hf_peft(
            "llama",
            _peft_config(
                "IA3Config",
                target_modules=["q_proj", "v_proj", "down_proj"],
                feedforward_modules=["down_proj"],
                init_ia3_weights=False,
            ),
        ),
        {},
    ),
    "gpt2 loss calling the model per row": (
        Case(hf_case("gpt2").build, hf_case("gpt2").batch, _per_row_loss),
        {},
    ),
    "llama one sample without labels": (
        Case(hf_case("llama").build, _no_label_sample(lm_batch), hf_case("llama").loss),
        {"sizes": (4,)},
    ),
}


@pytest.mark.parametrize("name", list(EXACT4_HF))
def test_exact4_hf(exact, name):
    case, kwargs = EXACT4_HF[name]
    exact("adversarial inputs (exact4)", name, case, **kwargs)


def test_exact4_num_items_in_batch_refused():
    """transformers' own loss given ``num_items_in_batch`` (the batch's labelled-token count)
    divides by a batch statistic: refused, not a number."""
    base = hf_case("gpt2")

    def loss(model: Any, batch: Any) -> Any:
        n = (batch["labels"] != -100).sum()
        out = model(**batch, num_items_in_batch=n)
        return out.loss.expand(batch["input_ids"].shape[0])

    torch.manual_seed(0)
    check = ExactnessCheck(base.build(), loss, REFUSE_CLIP, "flat", EXPECTED_BATCH_SIZE)
    try:
        with pytest.raises(UnsupportedLayerError, match="Fix"):
            check.engine_step(base.batch(3, 0))
    finally:
        check.close()
