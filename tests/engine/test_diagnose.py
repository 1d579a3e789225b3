"""``dptrain check`` / :func:`dptrain.diagnose.check_model`: the engine against the loop on a
user's model, with the planned rule per layer; a planted engine bug and a mixing layer are
reported, not passed."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from dptrain.cli import main
from dptrain.diagnose import check_model
from dptrain.grad_sample import ops
from dptrain.grad_sample.outer import Outer


def _mlp(norm: nn.Module | None = None) -> nn.Module:
    torch.manual_seed(0)
    layers = [nn.Linear(5, 8), nn.Dropout(0.3), nn.Tanh()]
    if norm is not None:
        layers.insert(1, norm)
    return nn.Sequential(*layers, nn.Linear(8, 3)).double()


def _loss(model: nn.Module, batch) -> torch.Tensor:
    x, y = batch
    return F.cross_entropy(model(x), y, reduction="none")


def _batches(sizes=(1, 3, 4)):
    g = torch.Generator().manual_seed(1)
    return [
        (
            torch.randn(b, 5, generator=g, dtype=torch.float64),
            torch.randint(0, 3, (b,), generator=g),
        )
        for b in sizes
    ]


def test_exact_model_gets_one_rule_and_a_tiny_error_per_layer():
    model = _mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = check_model(model, _loss, _batches())
    assert result.exact and result.refusal is None
    assert [r.layer for r in result.layers] == ["0", "3"]
    assert all(r.rule == "linear" and r.error < 1e-10 for r in result.layers)
    assert result.clipped_fraction >= 0.5  # clipping binds: the check compares clipped updates
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert "exact" in result.render()


def test_a_planted_engine_bug_is_reported_on_its_layer(monkeypatch):
    """A bias gradient doubled inside the Linear rule: the check must say NOT EXACT there."""
    honest = ops.Linear.outer

    def doubled_bias(self, use):
        out = honest(self, use)
        if "bias" in out:
            b = out["bias"]
            out["bias"] = Outer(2 * b.left, b.right, b.m, b.shape_)
        return out

    monkeypatch.setattr(ops.Linear, "outer", doubled_bias)
    result = check_model(_mlp(), _loss, _batches())
    assert not result.exact
    assert min(r.error for r in result.layers) > 1e-3
    assert "NOT EXACT" in result.render()


def test_a_layer_that_mixes_samples_is_named_as_refused():
    result = check_model(_mlp(nn.BatchNorm1d(8).double()), _loss, _batches((3, 4)))
    assert not result.exact
    assert result.refusal is not None and "BatchNorm1d" in result.refusal
    assert "REFUSED" in result.render()


def test_a_model_with_an_engine_attached_is_refused_naming_detach():
    import dptrain
    from dptrain.errors import InputError

    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    policy = dptrain.StaticPolicy(clip=1.0, noise_multiplier=1.0)
    engine = dptrain.PrivacyEngine(
        model, opt, policy=policy, sample_rate=0.5, dataset_size=8, loss_fn=_loss
    )
    engine.step(_batches((3,))[0])
    with pytest.raises(InputError, match=r"engine\.detach\(\)"):
        check_model(model, _loss, _batches())
    engine.detach()
    assert check_model(model, _loss, _batches()).exact


def test_cli_checks_a_recipe_and_exits_zero_when_exact(capsys):
    code = main(["check", "recipes/tiny.yaml", "--records", "4", "--batch-size", "2", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert code == 0 and out["exact"], out
    assert out["batches"] == [2, 2]
    rules = {r["layer"]: r["rule"] for r in out["layers"]}
    assert rules["transformer.h.0.attn.c_attn"] == "addmm"
    assert all(r["error"] <= out["tolerance"] for r in out["layers"])
    assert out["neighbours"] and all(n["error"] <= out["tolerance"] for n in out["neighbours"])


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_cli_checks_a_recipe_under_its_autocast_precision(capsys, precision):
    """The recipe's training.precision is what is checked: the engine's step under autocast
    (fp16 with its loss scale) against the float64 loop, at the autocast dtype's tolerance."""
    sets = ["--set", "training.device=cpu", "--set", f"training.precision={precision}"]
    code = main(
        ["check", "recipes/tiny.yaml", "--records", "4", "--batch-size", "2", "--json", *sets]
    )
    out = json.loads(capsys.readouterr().out)
    assert code == 0 and out["exact"], out
    assert out["tolerance"] == {"bf16": 2e-2, "fp16": 5e-3}[precision]


class _PaddedMean(nn.Module):
    """Token embeddings averaged over every position of the batch, padding included (or, with
    ``own=True``, over the sample's own tokens only): with padding counted, each sample's
    output follows the batch's padded length, which no batch of one sliced from the batch and
    no engine probe changes."""

    def __init__(self, own: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.own = own
        self.emb = nn.Embedding(11, 6, dtype=torch.float64)
        self.head = nn.Linear(6, 3, dtype=torch.float64)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.emb(ids) * mask.unsqueeze(-1)
        width = (
            mask.sum(1, keepdim=True) if self.own else mask.new_full((len(ids), 1), ids.shape[1])
        )
        return self.head(h.sum(1) / width)


def _records(n: int = 6) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    lengths = torch.tensor([2, 7, 3, 5, 2, 4][:n])
    ids = torch.randint(1, 11, (n, 7), generator=g)
    mask = (torch.arange(7) < lengths[:, None]).long()
    return ids * mask, mask, torch.randint(0, 3, (n,), generator=g)


def _collate(records):
    ids, mask, y = records

    def collate(indices):
        idx = torch.as_tensor(list(indices))
        width = int(mask[idx].sum(1).max())
        return ids[idx, :width], mask[idx, :width], y[idx]

    return collate


def _padded_loss(model, batch):
    ids, mask, y = batch
    return F.cross_entropy(model(ids, mask), y, reduction="none")


@pytest.mark.parametrize("own", [True, False])
def test_neighbours_catch_a_model_that_follows_the_padded_length(own):
    """The loop and the engine agree on both models (each sample's batch of one keeps the
    padding); only the neighbour test, which collates the longest record out of its batch and
    alone, sees that with the padded mean a sample's gradient follows the others' lengths."""
    result = check_model(
        _PaddedMean(own), _padded_loss, [[0, 1, 2], [3, 4, 5]], collate=_collate(_records())
    )
    assert result.total_error < 1e-10  # exact against the loop either way
    assert [(n.batch, n.which) for n in result.neighbours] == [
        (0, "longest"),
        (0, "shortest"),
        (1, "longest"),
        (1, "shortest"),
    ]
    assert [n.record for n in result.neighbours] == [1, 0, 3, 4]
    if own:
        assert result.exact and result.neighbour_error < 1e-12
        assert "neighbours:" in result.render() and "WRONG" not in result.render()
    else:
        assert not result.exact
        # without its longest record the others move; the shortest, alone at its own length,
        # is not the record it was inside the padded batch
        assert all(n.error > 1e-3 for n in result.neighbours)
        text = result.render()
        assert "WRONG" in text and "padded length" in text and "NOT EXACT" in text
