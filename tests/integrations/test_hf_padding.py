"""DPTrainer with ``PrivacyArguments.max_length``: the public length bound and the collator's
padding reach the engine as in ``dptrain train`` (float32 Grams for wide ghost norms, the
padding probe), a batch beyond the bound is refused before its step, and the probe pads as
the Hugging Face collators do (the tokenizer's pad id and padding side) or refuses a field
it cannot pad."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from transformers import DataCollatorForLanguageModeling, TrainingArguments

from dptrain import UnsupportedLayerError, clipping
from dptrain.data.lm import LMExamples, pad_batch
from dptrain.grad_sample import outer as O
from dptrain.integrations import hf
from dptrain.integrations.hf import DPTrainer, DPTrainerError, PrivacyArguments
from dptrain.integrations.hf.data import BatchPadder, PadCollator
from tests._support import tiny_gpt2, tiny_llama
from tests.engine.builders import build_hf

VOCAB, N = 61, 24
PRIVACY = dict(epsilon=4.0, clip=1.0, insecure_seed=3)


def _tokenizer(side: str = "right"):
    """A word-level tokenizer of ``VOCAB`` tokens ``t0..``, ``t0`` its pad token."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(VOCAB)}
    tok = Tokenizer(WordLevel(vocab, unk_token="t1"))
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="t0", padding_side=side)


def _records(lengths: range | list[int] = range(4, 13)) -> list[dict[str, list[int]]]:
    """N unpadded records (ids 1..VOCAB-1) of the given lengths in turn."""
    g = torch.Generator().manual_seed(0)
    lengths = list(lengths)
    return [
        {"input_ids": torch.randint(1, VOCAB, (lengths[i % len(lengths)],), generator=g).tolist()}
        for i in range(N)
    ]


def _trainer(out: Path, model, *, side="right", records=None, collator=None, **privacy):
    tok = _tokenizer(side)
    args = TrainingArguments(
        str(out),
        max_steps=2,
        per_device_train_batch_size=8,
        max_grad_norm=0,
        learning_rate=0.1,
        optim="sgd",
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
    )
    return DPTrainer(
        model,
        args,
        train_dataset=records if records is not None else _records(),
        data_collator=collator or DataCollatorForLanguageModeling(tok, mlm=False),
        processing_class=tok,
        privacy=PrivacyArguments(**PRIVACY, **privacy),
    )


def test_max_length_reaches_the_engine_and_takes_float32_grams(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(O, "FLOAT32_GRAM_COST", 0)  # the tiny layers too: as a wide model's
    taken: list[int] = []
    real = clipping._certified32
    monkeypatch.setattr(clipping, "_certified32", lambda fs, n: taken.append(n) or real(fs, n))
    trainer = _trainer(tmp_path, tiny_gpt2(VOCAB, layers=1).float(), max_length=16, ghost="always")
    trainer.train()
    engine = trainer.engine
    assert engine.max_length == 16 and engine.ledger.total_steps == 2
    assert isinstance(engine.capture.padding[0], BatchPadder) and engine.capture.padding[1] == 16
    assert taken and set(taken) == {16}  # certified at the public bound, not the batch's width


def test_without_max_length_nothing_changes(tmp_path, monkeypatch) -> None:
    """Today's behaviour: float64 Grams, no padding probe."""
    monkeypatch.setattr(O, "FLOAT32_GRAM_COST", 0)
    taken: list[int] = []
    monkeypatch.setattr(clipping, "_certified32", lambda fs, n: taken.append(n))
    trainer = _trainer(tmp_path, tiny_gpt2(VOCAB, layers=1).float(), ghost="always")
    assert trainer.max_length is None and trainer.pad is None
    trainer.train()
    assert trainer.engine.max_length is None and trainer.engine.capture.padding is None
    assert not taken and trainer.engine.ledger.total_steps == 2


def test_dynamic_rope_beyond_its_bound_is_refused_before_any_step(tmp_path) -> None:
    """Records of at most 12 tokens, max_position_embeddings 16: only the probe's padding to
    max_length = 48 makes the rope rescale, and the Trainer's key is named in the fix."""
    model = build_hf(
        "LlamaForCausalLM",
        {"max_position_embeddings": 16, "rope_scaling": {"rope_type": "dynamic", "factor": 2.0}},
    )
    trainer = _trainer(tmp_path, model, max_length=48)
    with pytest.raises(UnsupportedLayerError) as err:
        trainer.train()
    msg = str(err.value)
    assert "padded length" in msg and "dynamic rope" in msg and "max_length = 48" in msg
    assert "PrivacyArguments.max_length" in msg and "data.max_length" not in msg
    assert trainer.engine.ledger.total_steps == 0 and trainer.engine.steps_taken == 0


def test_a_left_padding_tokenizer_pads_the_probe_on_the_left(tmp_path) -> None:
    """GPT-2 numbers positions from the left edge: left padding moves every real token's
    position with the batch's padded length, which the probe (padding on the left, as the
    tokenizer does) refuses; rotary Llama depends on relative positions only and trains."""
    gpt2 = _trainer(tmp_path / "gpt2", tiny_gpt2(VOCAB, layers=1), side="left", max_length=16)
    assert gpt2.pad.side == "left"
    with pytest.raises(UnsupportedLayerError, match="padded length"):
        gpt2.train()
    assert gpt2.engine.ledger.total_steps == 0
    # the built-in loss counts no target predicted from a padding position (a left-padded
    # sequence's first token): left and right padding give a rotary model the same losses
    rows = _records([3, 5, 9])[:3]
    model = tiny_llama(VOCAB, layers=1)
    both = [
        hf.causal_lm_loss()(model, DataCollatorForLanguageModeling(_tokenizer(s), mlm=False)(rows))
        for s in ("left", "right")
    ]
    torch.testing.assert_close(both[0], both[1], rtol=1e-9, atol=1e-12)
    # sdpa attention (transformers' eager attention gives left-padded rows NaN outputs)
    run = _trainer(tmp_path / "llama", tiny_llama(VOCAB, layers=1), side="left", max_length=16)
    run.train()
    assert run.engine.ledger.total_steps == 2 and run.last_report.nonfinite == 0


def test_batch_padder_pads_on_its_side_and_refuses_the_other() -> None:
    tok = _tokenizer("left")
    batch = DataCollatorForLanguageModeling(tok, mlm=False)(_records([3, 5])[:2])
    assert batch["attention_mask"][0, 0] == 0  # left-padded by the collator
    pad = BatchPadder(tok.pad_token_id, "left")
    wide = pad(batch, 9)
    assert wide["input_ids"].shape == (2, 9) and (wide["input_ids"][:, :4] == 0).all()
    assert (wide["attention_mask"][:, :4] == 0).all() and (wide["labels"][:, :4] == -100).all()
    assert all(torch.equal(wide[k][:, 4:], batch[k]) for k in batch)
    tight = pad(wide, None)
    assert all(torch.equal(tight[k], batch[k]) for k in batch)
    with pytest.raises(DPTrainerError, match=r"pads on the left.*padding_side is 'right'"):
        BatchPadder(tok.pad_token_id, "right")(batch, 9)
    typed = {**batch, "token_type_ids": torch.ones_like(batch["input_ids"])}
    assert (pad(typed, 9)["token_type_ids"][:, :4] == 0).all()
    with pytest.raises(ValueError, match="more than 4 tokens"):
        pad(batch, 4)
    right = pad_batch(
        {k: v.flip(1) for k, v in batch.items()}, 7, 0
    )  # the default side is still the right
    assert (right["attention_mask"][:, 5:] == 0).all()


def test_a_field_the_probe_cannot_pad_is_refused_before_any_step(tmp_path) -> None:
    base = DataCollatorForLanguageModeling(_tokenizer(), mlm=False)

    def with_positions(rows):
        out = base(rows)
        out["position_ids"] = torch.arange(out["input_ids"].shape[1]).expand_as(out["input_ids"])
        return out

    trainer = _trainer(tmp_path, tiny_gpt2(VOCAB, layers=1), collator=with_positions, max_length=16)
    with pytest.raises(DPTrainerError, match=r"position_ids.*will not guess.*DPTrainer\(pad=f\)"):
        trainer.train()
    assert trainer.engine.ledger.total_steps == 0


def test_a_record_longer_than_max_length_is_refused_with_the_fix(tmp_path) -> None:
    trainer = _trainer(tmp_path, tiny_gpt2(VOCAB, layers=1), max_length=8)
    with pytest.raises(DPTrainerError, match=r"has \d+ tokens.*truncation=True, max_length=8"):
        trainer.train()
    assert trainer.engine.ledger.total_steps == 0
    with pytest.raises(DPTrainerError, match="max_length: 0 is not a positive"):
        _trainer(tmp_path / "zero", tiny_gpt2(VOCAB, layers=1), max_length=0)


def test_lm_examples_default_to_their_own_bound_and_other_collators_warn(tmp_path, caplog) -> None:
    ids = torch.randint(1, VOCAB, (N, 8))
    mask = (torch.arange(8) < 4 + torch.arange(N)[:, None] % 5).long()
    ds = LMExamples(ids, mask, pad_token_id=0, ids=[f"r{i}" for i in range(N)], max_length=8)
    args = TrainingArguments(str(tmp_path), max_steps=1, report_to="none", use_cpu=True)
    trainer = DPTrainer(
        tiny_gpt2(VOCAB, layers=1), args, train_dataset=ds, privacy=PrivacyArguments(**PRIVACY)
    )
    assert trainer.max_length == 8 and isinstance(trainer.data_collator, PadCollator)
    assert isinstance(trainer.pad, BatchPadder) and trainer.pad.side == "right"
    with caplog.at_level(logging.WARNING):
        own = DPTrainer(
            tiny_gpt2(VOCAB, layers=1),
            args,
            train_dataset=ds,
            data_collator=lambda rows: PadCollator(pad_token_id=0)(rows),
            privacy=PrivacyArguments(**PRIVACY),
        )
    assert own.max_length == 8 and own.pad is None and "padding probe is off" in caplog.text


def test_the_engines_length_fixes_name_the_trainers_setting() -> None:
    """A use longer than the bound inside the model (past the batch check) or a changed use
    structure: the engine's fix names its own argument, the trainer's PrivacyArguments."""
    from dptrain.clipping import UseStructureChanged, _changed
    from dptrain.grad_sample.outer import Outer, float32_for_run
    from dptrain.integrations.hf.trainer import in_trainer_terms

    with pytest.raises(ValueError) as err:
        float32_for_run([Outer(torch.randn(1, 9, 4), torch.randn(1, 9, 4), 4)], 8, always=True)
    renamed = in_trainer_terms(err.value)
    assert type(renamed) is ValueError and "data.max_length" not in str(renamed)
    assert "pass the longest sequence any batch can have (PrivacyArguments.max_length)" in str(
        renamed
    ) and "or PrivacyArguments(max_length=None)" in str(renamed)
    changed = in_trainer_terms(_changed("w", None, None))
    assert isinstance(changed, UseStructureChanged)
    assert "set PrivacyArguments(max_length=None)" in str(changed)
    assert in_trainer_terms(ValueError("something else")) is None


def test_records_that_contribute_nothing_are_named_once_with_their_likely_causes(
    tmp_path, caplog
) -> None:
    """Left padding under eager attention: a fully masked row turns to NaN, the sample counts as
    non-finite and contributes nothing; the trainer says so once, with the fixes."""
    model = tiny_llama(VOCAB, layers=1)
    model.config._attn_implementation = "eager"
    run = _trainer(tmp_path / "eager", model, side="left", max_length=16)
    with caplog.at_level(logging.WARNING, logger="dptrain.integrations.hf.trainer"):
        run.train()
    said = [r.message for r in caplog.records if "non-finite loss or gradient" in r.message]
    assert len(said) == 1 and "attn_implementation='sdpa'" in said[0]  # once, for two steps
    assert run.engine.ledger.total_steps == 2  # charged all the same
