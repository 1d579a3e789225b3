"""Adding one sample changes the clipped sum by that sample's clipped contribution and nothing
else: the sensitivity the accountant assumes.  The engine's choices per batch (ghost or
materialized norms by the cost rule, chunking, the Gram dtype) follow the batch's padded
length, which one long sample changes; a choice whose clip differs by more than rounding would
move every other sample's coefficient, and the sum by up to ``B`` times that."""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from dptrain import clipping
from dptrain.clipping import clip_and_sum
from dptrain.grad_sample import GradCapture
from dptrain.grad_sample import outer as O
from dptrain.losses import causal_lm_loss

VOCAB = 1000


def _model() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    cfg = GPT2Config(
        vocab_size=VOCAB, n_positions=256, n_embd=256, n_layer=1, n_head=4,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, attn_implementation="eager",
    )  # fmt: skip
    return GPT2LMHeadModel(cfg).train()


def _batch(lengths: list[int], seed: int) -> dict[str, torch.Tensor]:
    """Right-padded sequences of the given lengths (padded to the longest), labels -100 on
    padding; sequence ``i`` is the same tokens whatever the others."""
    t = max(lengths)
    ids = torch.zeros(len(lengths), t, dtype=torch.long)
    mask = torch.zeros(len(lengths), t, dtype=torch.long)
    for i, n in enumerate(lengths):
        g = torch.Generator().manual_seed(seed + i)
        ids[i, :n] = torch.randint(3, VOCAB, (n,), generator=g)
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def _clipped(model, batch, clip: float, ghost: str, max_length: int | None) -> torch.Tensor:
    cap = GradCapture(model)
    cap.attach()
    try:
        recorded, _ = cap.run(causal_lm_loss, batch)
        params = [p for p in model.parameters() if p.requires_grad]
        group_of = dict.fromkeys(params, "all")
        result = clip_and_sum(recorded, group_of, {"all": clip}, ghost=ghost, max_length=max_length)
    finally:
        cap.detach()
    return torch.cat([result.sums[p].flatten().double() for p in params])


@pytest.mark.parametrize("max_length", [None, 256], ids=["float64", "public-bound"])
@pytest.mark.parametrize("ghost", ["auto", "always"])
def test_one_long_sample_moves_the_sum_by_its_own_contribution(ghost, max_length, monkeypatch):
    """Three short sequences (12 tokens) with and without a fourth of 180, which makes the
    batch's padded length 180 (the cost rule then materializes the layers it ghosted at 12):
    sum(D + x) - sum(D) = contribution(x) to 1e-5 of C, float32 rounding of the longer
    shapes; a clip that over-estimated norms by 1e-4 more on one path would miss by 3e-4.
    With a public ``max_length`` the float32 Grams (over-clip up to 0.8% per sample) are used
    where the bound, not the batch, allows it (with ``ghost="always"`` on all four weights)."""
    float32_calls = []
    certified32 = clipping._certified32
    monkeypatch.setattr(
        clipping, "_certified32", lambda fs, n: float32_calls.append(1) or certified32(fs, n)
    )
    model = _model()
    clip = 0.05  # every sample clipped: coefficients depend on the norms
    short = [12, 12, 12]
    base = _batch(short, seed=0)
    both = _batch([*short, 180], seed=0)
    alone = _batch([180], seed=3)
    delta = _clipped(model, both, clip, ghost, max_length) - _clipped(
        model, base, clip, ghost, max_length
    )
    own = _clipped(model, alone, clip, ghost, max_length)
    slack = O.FLOAT32_SLACK / 2 if float32_calls else 1e-5  # the float32 path's own over-clip
    assert clip * (1 - slack) <= float(own.norm()) <= clip * (1 + 1e-6)
    assert float((delta - own).norm()) <= 1e-5 * clip
    assert bool(float32_calls) == (ghost == "always" and max_length is not None)
