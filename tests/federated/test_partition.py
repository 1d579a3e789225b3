"""The non-IID split: seeded, disjoint, complete, skewed by kind; clear errors."""

from __future__ import annotations

from collections import Counter

import pytest

from dptrain.data import DataError, load_texts, split
from dptrain.federated.partition import partition, record_labels, split_indices
from dptrain.secret import RunKey


def test_dirichlet_split_by_kind_is_seeded_disjoint_complete_and_skewed():
    train, _ = split(load_texts("bundled:clinic_notes"), 0.1, RunKey.from_insecure_seed(0))
    kinds = record_labels("bundled:clinic_notes", "kind", train.ids)
    assert set(kinds) == {
        "clinic_note",
        "portal_message",
        "support_ticket",
        "referral_letter",
        "lab_notice",
    }
    parts = split_indices(len(train), 3, labels=kinds, alpha=0.3, seed=7, min_size=16)
    again = split_indices(len(train), 3, labels=kinds, alpha=0.3, seed=7, min_size=16)
    assert parts == again != split_indices(len(train), 3, labels=kinds, alpha=0.3, seed=8)
    flat = [i for p in parts for i in p]
    assert sorted(flat) == list(range(len(train)))  # every record on exactly one client
    assert min(len(p) for p in parts) >= 16

    # non-IID: some kind's share differs a lot between clients; the IID split keeps them close
    def kind_shares(ps):
        out = []
        for p in ps:
            c = Counter(kinds[i] for i in p)
            out.append({k: c[k] / len(p) for k in set(kinds)})
        return out

    skewed = kind_shares(parts)
    iid = kind_shares(split_indices(len(train), 3, labels=None, alpha=1.0, seed=7))

    def spread(shares):  # the largest gap between clients' shares of one kind
        return max(max(s[k] for s in shares) - min(s[k] for s in shares) for k in shares[0])

    assert spread(skewed) > 0.2 > 0.1 > spread(iid)
    datasets = partition(
        train, 3, path="bundled:clinic_notes", by="kind", alpha=0.3, seed=7, min_size=16
    )
    assert [d.ids for d in datasets] == [[train.ids[i] for i in p] for p in parts]


def test_split_errors_name_the_fix(tmp_path):
    with pytest.raises(DataError, match=r"federated\.clients"):
        split_indices(5, 3, labels=None, alpha=1.0, seed=0, min_size=2)
    with pytest.raises(DataError, match=r"raise federated\.partition\.alpha"):
        split_indices(40, 4, labels=["a"] * 40, alpha=0.001, seed=0, min_size=9)
    f = tmp_path / "notes.jsonl"
    f.write_text('{"id": "1", "text": "a"}\n{"id": "2", "text": "b"}\n')
    with pytest.raises(DataError, match="no field 'kind'"):
        record_labels(str(f), "kind", ["1", "2"])


def test_labels_follow_content_derived_ids(tmp_path):
    """Records without an id field get content ids; their labels are found all the same."""
    f = tmp_path / "notes.jsonl"
    f.write_text(
        '{"text": "a", "kind": "x"}\n{"text": "b", "kind": "y"}\n{"text": "a", "kind": "z"}\n'
    )
    ids = load_texts(str(f)).ids
    assert ids[2] == ids[0] + "~1"
    assert record_labels(str(f), "kind", [ids[2], ids[1], ids[0]]) == ["z", "y", "x"]


def test_numeric_labels_are_one_label_however_written_and_blank_ones_are_named(tmp_path):
    """A label written 1, 1.0 and "1" is one label; a blank one is refused naming the field."""
    f = tmp_path / "notes.jsonl"
    f.write_text(
        '{"id": "a", "text": "a", "kind": 1}\n{"id": "b", "text": "b", "kind": 1.0}\n'
        '{"id": "c", "text": "c", "kind": "1"}\n{"id": "d", "text": "d", "kind": 2}\n'
    )
    assert record_labels(str(f), "kind", ["a", "b", "c", "d"]) == ["1", "1", "1", "2"]
    f.write_text('{"id": "a", "text": "a", "kind": "x"}\n{"id": "b", "text": "b", "kind": " "}\n')
    with pytest.raises(
        DataError,
        match=r"records \['b'\] \(the value is missing, null or empty\): no field 'kind'\. "
        r"Fix: set federated\.partition\.by .*partition\.by: null",
    ):
        record_labels(str(f), "kind", ["a", "b"])
