"""``token_nll`` without the sliced copies gives the sliced form's losses, gradients and engine
updates bit for bit (benchmarks/README.md, "Per-sample work on the full setup")."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dptrain.engine import PrivacyEngine
from dptrain.losses import TokenNLL, causal_lm_loss, token_nll
from dptrain.policies import StaticPolicy
from tests._support import lm_batch, seeded_noise, tiny_gpt2


def _sliced(logits: torch.Tensor, labels: torch.Tensor) -> TokenNLL:
    """The former form: the cross-entropy of the sliced ``(B, T - 1, V)`` logits."""
    logits, labels = logits[:, :-1], labels[:, 1:]
    b, t, v = logits.shape
    nll = F.cross_entropy(
        logits.reshape(-1, v).float(), labels.reshape(-1), ignore_index=-100, reduction="none"
    ).view(b, t)
    return TokenNLL(nll, (labels != -100).to(nll.dtype))


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bits (so that -0.0 and 0.0, or two NaN payloads, are told apart)."""
    ints = {2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
    return t.detach().contiguous().view(ints)


def _loss_and_grad(fn, logits: torch.Tensor, labels: torch.Tensor):
    x = logits.detach().clone().requires_grad_(True)
    out = fn(x, labels)
    weights = torch.arange(1.0, x.shape[0] + 1)
    (out.mean_per_sample * weights).sum().backward()
    return out.nll.detach(), out.mask, out.mean_per_sample.detach(), x.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("shape", [(3, 7, 50), (2, 1, 5), (4, 33, 129)])
def test_losses_and_gradient_bit_for_bit(dtype, shape):
    b, t, v = shape
    g = torch.Generator().manual_seed(1)
    logits = (3 * torch.randn(b, t, v, generator=g)).to(dtype)
    labels = torch.randint(0, v, (b, t), generator=g)
    labels[0, -1] = -100
    if t > 2:
        labels[1, 2] = -100
    new = _loss_and_grad(token_nll, logits, labels)
    old = _loss_and_grad(_sliced, logits, labels)
    for a, c in zip(new, old, strict=True):
        assert a.shape == c.shape
        assert torch.equal(_bits(a), _bits(c))


@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_non_finite_last_logits_take_the_sliced_form(bad):
    """The last position's logits take no part in the loss: even non-finite they get a zero
    gradient, as in the sliced form (the full-row form would make it NaN)."""
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(3, 6, 11, generator=g)
    logits[1, -1, 4] = bad
    labels = torch.randint(0, 11, (3, 6), generator=g)
    new = _loss_and_grad(token_nll, logits, labels)
    old = _loss_and_grad(_sliced, logits, labels)
    for a, c in zip(new, old, strict=True):
        assert torch.equal(_bits(a), _bits(c))
    assert bool(torch.isfinite(new[3]).all())


def test_engine_update_bit_for_bit():
    """A private step (ghost norms, tied embedding) with the loss on either form releases the
    same update, bit for bit."""
    vocab = 61
    batch = lm_batch(vocab, 5, 9, seed=3)

    def sliced_loss(model, b):
        out = model(input_ids=b["input_ids"], attention_mask=b.get("attention_mask"))
        return _sliced(out.logits, b["labels"]).mean_per_sample

    updates = []
    for loss_fn in (causal_lm_loss, sliced_loss):
        model = tiny_gpt2(vocab, seed=4)
        engine = PrivacyEngine(
            model,
            torch.optim.SGD(model.parameters(), lr=0.1),
            policy=StaticPolicy(clip=0.5, noise_multiplier=1.0),
            sample_rate=0.5,
            dataset_size=10,
            loss_fn=loss_fn,
            noise=seeded_noise(5),
        )
        seen = []
        engine.add_release_hook(lambda step, u, seen=seen: seen.append(dict(u)))
        engine.step(batch)
        engine.step(batch)
        updates.append([[_bits(u[p]) for p in engine.params] for u in seen])
    for a, c in zip(*updates, strict=True):
        assert all(torch.equal(x, y) for x, y in zip(a, c, strict=True))


def test_left_padding_counts_no_target_predicted_from_a_pad():
    """A left-padded sequence's first token is predicted from a padding position: counted, its
    loss would follow the batch's padded length.  With rotary positions (relative) each
    sample's loss in a left-padded batch is then its loss alone; right padding is unchanged."""
    from tests._support import tiny_llama

    model = tiny_llama(seed=5)
    g = torch.Generator().manual_seed(6)
    lengths = [3, 7, 5]
    rows = [torch.randint(1, 61, (n,), generator=g) for n in lengths]

    def batch(side: str) -> dict[str, torch.Tensor]:
        width = max(lengths)
        ids = torch.zeros(len(rows), width, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, r in enumerate(rows):
            at = slice(width - len(r), width) if side == "left" else slice(0, len(r))
            ids[i, at], mask[i, at] = r, 1
        return {
            "input_ids": ids,
            "attention_mask": mask,
            "labels": ids.masked_fill(mask == 0, -100),
        }

    with torch.no_grad():
        alone = torch.cat(
            [causal_lm_loss(model, {"input_ids": r[None], "labels": r[None]}) for r in rows]
        )
        left = causal_lm_loss(model, batch("left"))
        right = causal_lm_loss(model, batch("right"))
        b = batch("left")
        out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        counted = token_nll(out, b["labels"]).mean_per_sample  # the pad-predicted target kept
    torch.testing.assert_close(left, alone, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(right, alone, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(counted[[0, 2]], alone[[0, 2]])  # the padded samples
