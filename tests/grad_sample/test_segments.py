"""Per-person clipping (rows grouped into segments) against an explicit per-person loop:
each person's gradient is the sum of their records' gradients, clipped as one sample."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dptrain.clipping import clip_and_sum
from dptrain.engine import PrivacyEngine
from dptrain.grad_sample import GradCapture
from dptrain.losses import causal_lm_loss
from dptrain.policies import StaticPolicy
from dptrain.segments import Segments, person_chunks

from .._support import assert_close_rel, lm_batch, loop_per_sample_grads, tiny_gpt2, tiny_llama


@pytest.fixture(autouse=True, scope="module")
def _float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def _loop_per_person(model, loss, batch, of_row, clip):
    """The reference: one backward per record, summed per person, clipped per person."""
    ref = loop_per_sample_grads(model, loss, batch)
    p = int(of_row.max()) + 1
    per_person = {
        q: torch.zeros((p, *g.shape[1:]), dtype=g.dtype).index_add_(0, of_row, g)
        for q, g in ref.items()
    }
    total = sum(g.flatten(1).pow(2).sum(1) for g in per_person.values()).sqrt()
    c = (clip / (total + 1e-6)).clamp(max=1)
    return total, {q: torch.einsum("b,b...->...", c, g) for q, g in per_person.items()}


def _check(model, loss, batch, of_row, clip, modes=("always", "never", "auto")):
    cap = GradCapture(model)
    cap.attach()
    recorded, _ = cap.run(loss, batch)
    total, want = _loop_per_person(model, loss, batch, of_row, clip)
    names = {p: n for n, p in model.named_parameters()}
    seg = Segments.from_ids(of_row)
    for mode in modes:
        group_of = dict.fromkeys(want, "all")
        result = clip_and_sum(recorded, group_of, {"all": clip}, ghost=mode, segments=seg)
        if mode == "always":
            assert result.ghosted > 0
        assert_close_rel(result.norms["all"], total, what=f"per-person norms ({mode})")
        for p, w in want.items():
            assert_close_rel(result.sums[p], w, what=f"{names[p]} ({mode})")
    cap.detach()


class Small(nn.Module):
    """Embedding, LayerNorm and Linear layers, each used across a sequence."""

    def __init__(self, vocab: int = 11, width: int = 6) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, width)
        self.norm = nn.LayerNorm(width)
        self.lin = nn.Linear(width, vocab)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lin(torch.tanh(self.norm(self.emb(ids))))


def _seq_loss(model, batch):
    ids, target = batch
    return nn.functional.cross_entropy(model(ids).transpose(1, 2), target, reduction="none").mean(1)


OF_ROW = torch.tensor([0, 0, 0, 1, 2, 2])  # persons with 3, 1 and 2 records


def test_linear_embedding_layernorm_per_person_exact():
    torch.manual_seed(0)
    model = Small()
    batch = (torch.randint(0, 11, (6, 5)), torch.randint(0, 11, (6, 5)))
    _check(model, _seq_loss, batch, OF_ROW, 0.2)


def test_rows_need_not_be_sorted_for_clipping():
    torch.manual_seed(1)
    model = Small()
    batch = (torch.randint(0, 11, (5, 4)), torch.randint(0, 11, (5, 4)))
    _check(model, _seq_loss, batch, torch.tensor([1, 0, 2, 0, 1]), 0.1)


def _lora(model, targets):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(1)
    cfg = LoraConfig(r=3, target_modules=targets, lora_dropout=0.0, init_lora_weights=False)
    return get_peft_model(model, cfg)


@pytest.mark.parametrize(
    "build",
    [
        tiny_gpt2,  # all parameters: tied wte / lm_head, Conv1D, LayerNorm
        lambda: _lora(tiny_gpt2(), ["c_attn"]),
        lambda: _lora(tiny_llama(), ["q_proj", "v_proj"]),
    ],
    ids=["gpt2-full", "gpt2-lora", "llama-lora"],
)
def test_tiny_models_per_person_exact(build):
    model = build()
    batch = lm_batch(61, 6, 7, seed=3)
    _check(model, causal_lm_loss, batch, OF_ROW, 0.02, modes=("always", "never"))


def test_a_heavy_person_contributes_at_most_the_clip():
    """A person with 12 records: the whole sum of their records is clipped to C (record-level
    clipping would let them move the sum by up to 12 C)."""
    torch.manual_seed(2)
    model = Small()
    target = torch.randint(0, 11, (1, 5)).expand(12, 5)  # similar records: gradients align
    batch = (torch.randint(0, 11, (12, 5)), target)
    cap = GradCapture(model)
    cap.attach()
    recorded, _ = cap.run(_seq_loss, batch)
    clip, group_of = 0.05, dict.fromkeys(model.parameters(), "all")
    one = Segments.from_ids(torch.zeros(12, dtype=torch.long))
    for mode in ("always", "never"):
        person = clip_and_sum(recorded, group_of, {"all": clip}, ghost=mode, segments=one)
        assert float(person.norms["all"][0]) > clip  # the clip binds
        released = torch.sqrt(sum(s.pow(2).sum() for s in person.sums.values()))
        assert float(released) <= clip * (1 + 1e-4)
        records = clip_and_sum(recorded, group_of, {"all": clip}, ghost=mode)
        by_record = torch.sqrt(sum(s.pow(2).sum() for s in records.sums.values()))
        assert float(by_record) > 3 * clip
    cap.detach()


def test_person_chunks_hold_whole_persons():
    of_row = torch.tensor([0, 0, 1, 2, 2, 2, 2, 2, 3])
    chunks = person_chunks(of_row, 3)
    assert chunks == [(0, 3), (3, 8), (8, 9)]  # person 2 (5 records) gets a chunk of its own
    with pytest.raises(ValueError, match="sorted"):
        person_chunks(torch.tensor([1, 0]), 3)


def test_engine_step_with_segments_equals_the_loop_in_chunks():
    """The engine with physical chunks of whole persons releases the per-person clipped sum."""
    torch.manual_seed(3)
    model = Small()
    batch = (torch.randint(0, 11, (6, 5)), torch.randint(0, 11, (6, 5)))
    _, want = _loop_per_person(model, _seq_loss, batch, OF_ROW, 0.1)
    params = list(model.parameters())
    before = [p.detach().clone() for p in params]
    engine = PrivacyEngine(
        model,
        torch.optim.SGD(params, lr=1.0),
        policy=StaticPolicy(clip=0.1, noise_multiplier=0.0),
        sample_rate=0.5,
        dataset_size=6,
        loss_fn=_seq_loss,
        max_physical_batch_size=2,
    )
    report = engine.step(batch, segments=OF_ROW)
    assert report.batch_size == 3
    for p, b in zip(params, before, strict=True):
        assert_close_rel(b - p.detach(), want[p] / 3.0, what="update")  # E[B] = 0.5 * 6
    engine.detach()
