"""The padding probe: a sample's loss and gradient must not depend on how far its batch is
padded (``PrivacyEngine(max_length=L, pad=...)``, :meth:`GradCapture._check_padding`).

``dptrain train`` pads a batch to its longest record, so a model whose outputs follow the
padded length lets one long record change every other sample's gradient in its batch: the
probes on ``B + 1``, ``batch[1:]`` and ``batch[:1]`` keep the padded length and cannot see it.
transformers' dynamic rope recomputes its frequencies from the padded length beyond
``max_position_embeddings``, longrope switches to its long factors beyond
``original_max_position_embeddings``; a layer that reads the padding positions is the general
case.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from torch import Tensor, nn

from dptrain import UnsupportedLayerError
from dptrain.data.lm import pad_batch
from dptrain.losses import causal_lm_loss
from tests._support import assert_close_rel, loop_per_sample_grads, make, per_sample_grads

from .builders import VOCAB, build_hf

ROOT = Path(__file__).resolve().parents[2]
DYNAMIC = {"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}
LONGROPE = {
    "max_position_embeddings": 64,
    "original_max_position_embeddings": 16,
    "rope_scaling": {"rope_type": "longrope", "short_factor": [1.0] * 4, "long_factor": [2.0] * 4},
}


def pad(batch: dict[str, Tensor], length: int | None) -> dict[str, Tensor]:
    return pad_batch(batch, length, 0)


def batch(lengths: list[int]) -> dict[str, Tensor]:
    """Right-padded to the longest of ``lengths``, as the collator pads; labels -100 there."""
    g = torch.Generator().manual_seed(0)
    width = max(lengths)
    ids = torch.randint(3, VOCAB, (len(lengths), width), generator=g)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    ids = ids.masked_fill(mask == 0, 0)
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def llama(**over) -> nn.Module:
    return build_hf("LlamaForCausalLM", {"max_position_embeddings": 16, **over})


def engine(model: nn.Module, max_length: int, with_pad: bool = True):
    return make(model, n=4, max_length=max_length, pad=pad if with_pad else None)


def test_dynamic_rope_beyond_max_position_embeddings_is_refused() -> None:
    """The probe batch is 9 positions wide, within max_position_embeddings = 16: only the
    padding probe (to max_length = 48) makes the rope rescale."""
    eng = engine(llama(**DYNAMIC), max_length=48)
    with pytest.raises(UnsupportedLayerError) as err:
        eng.step(batch([5, 9, 7]))
    msg = str(err.value)
    assert "padded length" in msg and "dynamic rope" in msg and "max_position_embeddings" in msg
    assert "max_length = 48" in msg and "Fix:" in msg and "BatchNorm" not in msg
    assert "LlamaRotaryEmbedding" in msg  # what it observed: the rope's buffer rewritten
    assert eng.steps_taken == 0  # refused before anything was released or charged


def test_dynamic_rope_on_a_batch_beyond_the_bound_names_rope_not_batchnorm() -> None:
    """A probe batch already wider than max_position_embeddings rescales in the first probe:
    refused for the buffer it rewrites, with the rope causes, not BatchNorm's fix."""
    with pytest.raises(UnsupportedLayerError) as err:
        engine(llama(**DYNAMIC), max_length=48).step(batch([20, 40]))
    msg = str(err.value)
    assert "rope" in msg and "max_position_embeddings" in msg and "BatchNorm" not in msg


class PadMean(nn.Module):
    """Subtracts the mean over *all* positions (padding included): every real position's
    output follows the padded length, with no buffer to see."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb, self.head = nn.Embedding(VOCAB, 8), nn.Linear(8, VOCAB)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        h = self.emb(input_ids)
        return self.head(torch.tanh(h - h.mean(1, keepdim=True)))


def test_a_layer_reading_the_padding_is_refused_by_its_losses() -> None:
    model = PadMean().double()
    with pytest.raises(UnsupportedLayerError, match=r"loss changes .*padded length"):
        engine(model, max_length=24).step(batch([5, 9, 7]))
    engine(PadMean().double(), max_length=24, with_pad=False).step(batch([5, 9, 7]))  # unseen


class PadMeanGrad(PadMean):
    """The same mean added with its value cancelled: the losses do not follow the padding,
    the gradients do."""

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        h = self.emb(input_ids)
        m = h.mean(1, keepdim=True)
        return self.head(torch.tanh(h + (m - m.detach())))


def test_a_gradient_following_the_padding_is_refused_by_the_residual() -> None:
    with pytest.raises(UnsupportedLayerError, match=r"gradients change .*padded length"):
        engine(PadMeanGrad().double(), max_length=24).step(batch([5, 9, 7]))


@pytest.mark.parametrize(
    "over, max_length",
    [(DYNAMIC, 16), ({}, 48), (LONGROPE, 16)],
    ids=["dynamic-within-bound", "default-rope", "longrope-within-original"],
)
def test_accepted_and_exact(over: dict, max_length: int) -> None:
    """Within the length the rope does not rescale at, or with a rope that does not follow the
    length, the probe passes and the per-sample gradients are the per-example loop's."""
    cls = "Phi3ForCausalLM" if over is LONGROPE else "LlamaForCausalLM"
    model = build_hf(cls, {"max_position_embeddings": 16, **over})
    eng = engine(model, max_length=max_length)
    b = batch([5, 9, 16 if max_length == 16 else 12])
    recorded, _ = eng.capture.run(causal_lm_loss, b)
    got = per_sample_grads(recorded)
    want = loop_per_sample_grads(model, causal_lm_loss, b)
    for p, g in want.items():
        assert_close_rel(got[p], g, rtol=1e-8, what=eng.names[p])


def test_longrope_beyond_its_original_length_is_refused() -> None:
    model = build_hf("Phi3ForCausalLM", LONGROPE)
    with pytest.raises(UnsupportedLayerError) as err:
        engine(model, max_length=48).step(batch([5, 9]))
    msg = str(err.value)
    assert "padded length" in msg and "Phi3RotaryEmbedding" in msg and "BatchNorm" not in msg


def test_pad_needs_max_length() -> None:
    with pytest.raises(ValueError, match="pad needs max_length"):
        make(llama(), n=4, pad=pad)


def test_pad_batch_pads_and_trims_as_the_collator() -> None:
    b = batch([3, 5])
    wide = pad_batch(b, 8, 7)
    assert wide["input_ids"].shape == (2, 8) and (wide["input_ids"][:, 5:] == 7).all()
    assert (wide["attention_mask"][:, 5:] == 0).all() and (wide["labels"][:, 5:] == -100).all()
    tight = pad_batch(wide, None, 7)
    assert all(torch.equal(tight[k], b[k]) for k in b)
    with pytest.raises(ValueError):
        pad_batch(b, 4, 7)


@pytest.fixture
def phi3_recipe(tmp_path: Path) -> Path:
    """A recipe on a local Phi3 whose longrope switches at 16 positions, records of at most 12
    tokens, data.max_length 48 (within max_position_embeddings = 64: the context check
    passes)."""
    from dptrain.models.tiny import build_tiny_tokenizer

    tok = build_tiny_tokenizer(512)
    over = {**LONGROPE, "vocab_size": len(tok), "pad_token_id": tok.eos_token_id}
    over.update(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    model = build_hf("Phi3ForCausalLM", over).float()
    model.save_pretrained(tmp_path / "phi3")
    tok.save_pretrained(tmp_path / "phi3")
    rows = [{"id": str(i), "text": f"note {i} ok"} for i in range(40)]
    data = tmp_path / "short.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    d = yaml.safe_load((ROOT / "recipes" / "tiny.yaml").read_text())
    d["model"]["name"] = str(tmp_path / "phi3")
    d["data"].update(path=str(data), max_records=None, validation_fraction=0.25)
    d["training"].update(steps=1, batch_size=8, physical_batch_size=8)
    d["output_dir"] = str(tmp_path / "run")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(d))
    return recipe


def test_dptrain_train_refuses_longrope_beyond_its_original_length(phi3_recipe, capsys):
    """Through ``dptrain train``: the engine gets the examples' pad and refuses at the first
    step, before anything is released."""
    from dptrain.cli import main
    from dptrain.rundir import RunDir

    assert main(["train", str(phi3_recipe), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "padded length" in err and "max_length = 48" in err and "BatchNorm" not in err
    run = RunDir(phi3_recipe.parent / "run")
    assert not run.final.exists() and not any(run.checkpoints.glob("*"))  # no step was taken


def test_dptrain_check_runs_the_padding_probe(phi3_recipe, capsys):
    """``dptrain check`` refuses what ``dptrain train`` would (its own engine has no
    max_length); within the original length it passes."""
    from dptrain.cli import main

    argv = ["check", str(phi3_recipe), "--records", "4", "--batch-size", "2", "--json"]
    assert main(argv) == 1
    out = json.loads(capsys.readouterr().out)
    assert "padded length" in out["refusal"] and not out["exact"]
    assert main([*argv, "--set", "data.max_length=16"]) == 0
    assert json.loads(capsys.readouterr().out)["exact"]
