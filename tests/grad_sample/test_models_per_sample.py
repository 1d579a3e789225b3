"""Whole Hugging Face models (LoRA-wrapped and fully trained) against the per-example loop."""

from __future__ import annotations

import pytest
import torch

from dptrain.clipping import clip_and_sum
from dptrain.grad_sample import GradCapture
from dptrain.losses import causal_lm_loss
from tests._support import (
    assert_close_rel,
    lm_batch,
    loop_per_sample_grads,
    per_sample_grads,
    tiny_gpt2,
    tiny_llama,
)


def lora(model, targets):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(1)
    return get_peft_model(
        model,
        LoraConfig(
            r=4, lora_alpha=8, target_modules=targets, lora_dropout=0.0, init_lora_weights=False
        ),
    )


CASES = {
    "gpt2-lora": lambda: lora(tiny_gpt2(), ["c_attn", "c_proj"]),
    "llama-lora": lambda: lora(tiny_llama(), ["q_proj", "v_proj", "down_proj"]),
    "gpt2-full": tiny_gpt2,  # tied wte / lm_head, Conv1D, LayerNorm, position embeddings
    "llama-full": tiny_llama,  # tied embeddings, RMSNorm
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("batch_size,length", [(1, 5), (3, 7)])
def test_whole_model_per_sample_grads(case, batch_size, length):
    model = CASES[case]()
    batch = lm_batch(61, batch_size, length, seed=batch_size)
    cap = GradCapture(model)
    cap.attach()
    uses, _ = cap.run(causal_lm_loss, batch)
    got = per_sample_grads(uses)
    ref = loop_per_sample_grads(model, causal_lm_loss, batch)
    names = {p: n for n, p in model.named_parameters()}
    assert set(got) == set(ref)
    for p, expected in ref.items():
        assert_close_rel(got[p], expected, what=names[p])

    # clipped sums (ghost where chosen) equal the loop's clipped mean, flat and per group
    group_of = {p: names[p].split(".")[-2] for p in ref}
    for groups in ({p: "all" for p in ref}, group_of):
        clip = {g: 0.05 for g in set(groups.values())}
        result = clip_and_sum(uses, groups, clip, ghost=True)
        sq = {}
        for p, g in ref.items():
            sq[groups[p]] = sq.get(groups[p], 0) + g.flatten(1).pow(2).sum(1)
        for p, g in ref.items():
            c = (clip[groups[p]] / (sq[groups[p]].sqrt() + 1e-6)).clamp(max=1)
            assert_close_rel(
                result.sums[p], torch.einsum("b,b...->...", c, g), what="clipped " + names[p]
            )
    cap.detach()


def test_frozen_base_is_free():
    from peft.tuners.lora import LoraLayer

    model = lora(tiny_llama(), ["q_proj"])
    cap = GradCapture(model)
    hooked = dict(cap.scopes)
    # the LoRA leaves and the adapted layers (their forward may use adapter weights directly);
    # never a frozen base layer
    assert hooked and all("lora_" in n or isinstance(m, LoraLayer) for n, m in hooked.items())
    assert not any(n.endswith("base_layer") for n in hooked)
