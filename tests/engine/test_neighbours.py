"""Adding one sample changes the clipped sum by that sample's clipped contribution and nothing
else: the sensitivity the accountant assumes.  The engine's choices per batch (ghost or
materialized norms by the cost rule, chunking, the Gram dtype) follow the batch's padded
length, which one long sample changes; a choice whose clip differs by more than rounding would
move every other sample's coefficient, and the sum by up to ``B`` times that."""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from dptrain.clipping import clip_and_sum
from dptrain.grad_sample import GradCapture
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


def _clipped(model, batch, clip: float, ghost: str) -> torch.Tensor:
    cap = GradCapture(model)
    cap.attach()
    try:
        recorded, _ = cap.run(causal_lm_loss, batch)
        params = [p for p in model.parameters() if p.requires_grad]
        result = clip_and_sum(recorded, dict.fromkeys(params, "all"), {"all": clip}, ghost=ghost)
    finally:
        cap.detach()
    return torch.cat([result.sums[p].flatten().double() for p in params])


@pytest.mark.parametrize("ghost", ["auto", "always"])
def test_one_long_sample_moves_the_sum_by_its_own_contribution(ghost):
    """Three short sequences (12 tokens) with and without a fourth of 180, which makes the
    batch's padded length 180 (the cost rule then materializes the layers it ghosted at 12):
    sum(D + x) - sum(D) = contribution(x) to 1e-5 of C, float32 rounding of the longer
    shapes; a clip that over-estimated norms by 1e-4 more on one path would miss by 3e-4."""
    model = _model()
    clip = 0.05  # every sample clipped: coefficients depend on the norms
    short = [12, 12, 12]
    base = _batch(short, seed=0)
    both = _batch([*short, 180], seed=0)
    alone = _batch([180], seed=3)
    delta = _clipped(model, both, clip, ghost) - _clipped(model, base, clip, ghost)
    own = _clipped(model, alone, clip, ghost)
    assert float(own.norm()) == pytest.approx(clip, rel=1e-5)
    assert float((delta - own).norm()) <= 1e-5 * clip
