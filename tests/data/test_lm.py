import logging
from typing import Any

import pytest
import torch

from dptrain.data.lm import IGNORE_INDEX, LMExamples, SequenceTooLongError, tokenize
from dptrain.data.loading import TextDataset, load_texts


class CharTokenizer:
    """One token per character (ord % 50 + 3); 1 = EOS, 2 = BOS when ``bos``; pad optional."""

    def __init__(self, pad: int | None = None, eos: int | None = 1, bos: bool = False) -> None:
        self.pad_token_id, self.eos_token_id, self.bos = pad, eos, bos

    def __call__(self, texts: list[str], add_special_tokens: bool = True) -> dict[str, Any]:
        pre = [2] if (self.bos and add_special_tokens) else []
        return {"input_ids": [pre + [ord(c) % 50 + 3 for c in t] for t in texts]}


def ds(*texts: str) -> TextDataset:
    return TextDataset(list(texts), [f"r{i}" for i in range(len(texts))])


def test_one_example_per_record_with_eos_and_pad_fallback() -> None:
    ex = tokenize(ds("abc", "a", "abcdef"), CharTokenizer(), max_length=16)
    assert len(ex) == 3 and ex.ids == ["r0", "r1", "r2"]
    assert ex.pad_token_id == 1  # no pad token: EOS is used
    assert ex.input_ids.shape == (3, 7)
    assert ex.lengths.tolist() == [4, 2, 7]
    assert ex.input_ids[1].tolist() == [ord("a") % 50 + 3, 1, 1, 1, 1, 1, 1]
    assert ex.attention_mask[1].tolist() == [1, 1, 0, 0, 0, 0, 0]
    assert ex.num_truncated == 0


def test_special_tokens_kept_and_eos_not_doubled() -> None:
    ex = tokenize(ds("ab"), CharTokenizer(pad=0, bos=True), max_length=8)
    assert ex.input_ids[0].tolist() == [2, ord("a") % 50 + 3, ord("b") % 50 + 3, 1]
    no_eos = tokenize(ds("ab"), CharTokenizer(pad=0), max_length=8, add_eos=False)
    assert no_eos.lengths.tolist() == [2]


def test_truncation_counted_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="dptrain.data.lm"):
        ex = tokenize(ds("abcdefgh", "ab", "abcdefghijk"), CharTokenizer(pad=0), max_length=5)
    assert ex.num_truncated == 2 and ex.stats()["truncated"] == 2
    assert ex.input_ids.shape == (3, 5)
    assert 1 not in ex.input_ids[0].tolist()  # a truncated record has no EOS
    assert "truncated 2 of 3 records to max_length=5" in caplog.text


def test_overflow_error_names_record() -> None:
    with pytest.raises(SequenceTooLongError, match="record 'r1' has 9 tokens > max_length=5"):
        tokenize(ds("ab", "abcdefgh"), CharTokenizer(), max_length=5, on_overflow="error")


def test_batch_trims_and_masks_labels() -> None:
    tok = CharTokenizer()  # pad == eos == 1: the real EOS must stay a target
    ex = tokenize(ds("abcdefgh", "ab", "abc"), tok, max_length=32)
    b = ex.batch([1, 2])
    assert b["input_ids"].shape == (2, 4)  # longest of the two (3 chars + EOS)
    assert b["labels"][0].tolist() == [
        b["input_ids"][0, 0].item(),
        b["input_ids"][0, 1].item(),
        1,
        IGNORE_INDEX,
    ]
    assert b["labels"][1, -1].item() == 1
    assert torch.equal(b["labels"] == IGNORE_INDEX, b["attention_mask"] == 0)
    assert ex[torch.tensor([0])]["input_ids"].shape == (1, 9)
    assert ex[[2, 0]]["input_ids"].shape == (2, 9)
    assert ex[1:3]["input_ids"].shape == (2, 4)
    assert ex[5:]["input_ids"].shape == (0, 0)
    assert all(v.dtype == torch.long for v in b.values())


@pytest.mark.parametrize("empty", [[], torch.tensor([], dtype=torch.long)])
def test_empty_batch(empty: Any) -> None:
    ex = tokenize(ds("ab", "c"), CharTokenizer(), max_length=8)
    b = ex.batch(empty)
    assert set(b) == {"input_ids", "attention_mask", "labels"}
    assert all(v.shape[0] == 0 and v.dtype == torch.long for v in b.values())


def test_int_index_gives_unpadded_example() -> None:
    ex = tokenize(ds("abcd", "a"), CharTokenizer(pad=0), max_length=8)
    item = ex[1]
    assert item["input_ids"].tolist() == [ord("a") % 50 + 3, 1]
    assert item["labels"].tolist() == item["input_ids"].tolist()
    assert ex[-1]["input_ids"].tolist() == item["input_ids"].tolist()
    assert ex[torch.tensor(0)]["input_ids"].shape == (5,)
    with pytest.raises(IndexError):
        ex[2]


def test_empty_dataset_and_errors() -> None:
    ex = tokenize(TextDataset([], []), CharTokenizer(), max_length=4)
    assert (
        len(ex) == 0 and ex.input_ids.shape == (0, 0) and ex.batch([])["input_ids"].shape == (0, 0)
    )
    with pytest.raises(ValueError, match="no tokens"):
        tokenize(ds(""), CharTokenizer(pad=0), max_length=4, add_eos=False)
    with pytest.raises(ValueError, match="neither a pad token nor an EOS"):
        tokenize(ds("a"), CharTokenizer(eos=None), max_length=4, add_eos=False)
    with pytest.raises(ValueError, match="max_length"):
        tokenize(ds("a"), CharTokenizer(), max_length=0)
    with pytest.raises(ValueError, match="on_overflow"):
        tokenize(ds("a"), CharTokenizer(), max_length=4, on_overflow="pack")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="shapes"):
        LMExamples(torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 4, dtype=torch.long))


def test_real_tokenizer_on_bundled_validation() -> None:
    from dptrain.models import build_tiny_tokenizer

    tok = build_tiny_tokenizer()
    val = load_texts("bundled:clinic_notes:validation")
    ex = tokenize(val, tok, max_length=128)
    assert len(ex) == len(val) > 300
    assert 0 < ex.num_truncated < len(val)
    assert ex.input_ids.shape == (len(val), 128)
    full = ex.lengths < 128
    eos = tok.eos_token_id
    rows = torch.nonzero(full).flatten()
    assert all(ex.input_ids[r, ex.lengths[r] - 1].item() == eos for r in rows)
    assert tok.decode(ex[int(rows[0])]["input_ids"][:-1]) == val.texts[int(rows[0])]
    loader = torch.utils.data.DataLoader(range(len(ex)), batch_size=32, collate_fn=ex.batch)
    first = next(iter(loader))
    assert first["input_ids"].shape[0] == 32
