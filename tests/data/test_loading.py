import hashlib
import json
import random
import sys
from decimal import Decimal
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dptrain.data.loading import (
    BUNDLED_SPLIT_KEY,
    DataError,
    TextDataset,
    canonical_id,
    cap,
    load_texts,
    split,
)
from dptrain.errors import InputWarning
from dptrain.secret import RunKey

KEY = RunKey.from_insecure_seed(3)


def cid(text: str) -> str:
    """The id of a record without one: derived from its content."""
    return "text-" + hashlib.sha256(text.encode()).hexdigest()[:16]


def write(tmp_path: Path, name: str, content: str | bytes) -> Path:
    p = tmp_path / name
    if isinstance(content, bytes):
        p.write_bytes(content)
    else:
        p.write_text(content, encoding="utf-8", newline="")
    return p


# -- JSONL --------------------------------------------------------------------------------


def test_jsonl_basic_and_ids(tmp_path: Path) -> None:
    p = write(tmp_path, "d.jsonl", '{"id": "a", "text": "hello"}\n\n{"id": 7, "text": "world"}\n')
    ds = load_texts(p)
    assert ds.texts == ["hello", "world"] and ds.ids == ["a", "7"] and len(ds) == 2


def test_jsonl_custom_field_missing_id_crlf_bom_and_unicode_separator(tmp_path: Path) -> None:
    rows = ['{"body": "x\\ny", "k": 1}', '{"body": "a\u2028b"}']
    p = write(tmp_path, "d.ndjson", ("\ufeff" + "\r\n".join(rows) + "\r\n").encode())
    ds = load_texts(p, text_field="body")
    assert ds.texts == ["x\ny", "a\u2028b"]
    assert ds.ids == [cid("x\ny"), cid("a\u2028b")]


def test_jsonl_missing_field_lists_available(tmp_path: Path) -> None:
    p = write(tmp_path, "d.jsonl", '{"text": "ok"}\n{"id": "r2", "body": "x", "meta": 1}\n')
    with pytest.raises(
        DataError,
        match=r"d\.jsonl:2: no field 'text'.*available fields: id, body, meta\. Fix: set "
        r"data\.text_field in the recipe",
    ):
        load_texts(p)


def test_jsonl_bad_json_names_line(tmp_path: Path) -> None:
    p = write(tmp_path, "d.jsonl", '{"text": "a"}\n{"text": "b"\n')
    with pytest.raises(DataError, match=r"d\.jsonl:2: invalid JSON"):
        load_texts(p)


@pytest.mark.parametrize(
    ("line", "msg"),
    [("[1, 2]", "expected a JSON object"), ('{"text": 3}', "is int, expected a string")],
)
def test_jsonl_wrong_types(tmp_path: Path, line: str, msg: str) -> None:
    p = write(tmp_path, "d.jsonl", '{"text": "a"}\n' + line + "\n")
    with pytest.raises(DataError, match=msg):
        load_texts(p)


def test_undecodable_bytes_name_line(tmp_path: Path) -> None:
    p = write(tmp_path, "d.jsonl", b'{"text": "a"}\n{"text": "b"}\n{"text": "\xff\xfe"}\n')
    with pytest.raises(DataError, match=r"d\.jsonl:3: not valid UTF-8"):
        load_texts(p)


def test_duplicate_ids_rejected_unless_id_field_none(tmp_path: Path) -> None:
    p = write(tmp_path, "d.jsonl", '{"id": 1, "text": "a"}\n{"id": 1, "text": "b"}\n')
    with pytest.raises(DataError, match=r"duplicate record id '1'.*remove the id field"):
        load_texts(p)
    assert load_texts(p, id_field=None).ids == [cid("a"), cid("b")]


def test_content_ids_survive_insertions_and_duplicates_get_their_own(tmp_path: Path) -> None:
    """Ids of records without one do not depend on line numbers, and the k-th further copy of
    a text gets suffix ~k (so it has its own Poisson coins, not its twin's)."""
    p = write(tmp_path, "a.txt", "alpha\nbeta\nalpha\ngamma\n")
    ids = load_texts(p).ids
    assert ids == [cid("alpha"), cid("beta"), cid("alpha") + "~1", cid("gamma")]
    q = write(tmp_path, "b.txt", "new first line\nalpha\nbeta\nzeta\nalpha\ngamma\n")
    assert set(load_texts(q).ids) - set(ids) == {cid("new first line"), cid("zeta")}
    assert set(ids) <= set(load_texts(q).ids)


# -- CSV / TSV ----------------------------------------------------------------------------


def test_csv_column_multiline_and_ids(tmp_path: Path) -> None:
    p = write(tmp_path, "d.csv", 'id,note,x\nr1,"line one\nline two",1\n,plain,2\n\n')
    ds = load_texts(p, text_field="note")
    assert ds.texts == ["line one\nline two", "plain"]
    assert ds.ids == ["r1", cid("plain")]


def test_csv_missing_column_lists_available(tmp_path: Path) -> None:
    p = write(tmp_path, "d.csv", "id,body\n1,x\n")
    with pytest.raises(
        DataError,
        match=r"no column 'text'; available columns: id, body\. Fix: set data\.text_field",
    ):
        load_texts(p)


def test_csv_ragged_row(tmp_path: Path) -> None:
    p = write(tmp_path, "d.csv", "id,text\n1,a\n2,b,extra\n")
    with pytest.raises(DataError, match=r"d\.csv:3: 3 columns, header has 2"):
        load_texts(p)


def test_tsv_and_explicit_format(tmp_path: Path) -> None:
    p = write(tmp_path, "d.tsv", "text\tid\nhello, world\tA\n")
    assert load_texts(p).texts == ["hello, world"]
    q = write(tmp_path, "d.data", "text\tid\nhi\tB\n")
    assert load_texts(q, format="tsv").ids == ["B"]


# -- plain text ---------------------------------------------------------------------------


def test_txt_one_record_per_nonempty_line(tmp_path: Path) -> None:
    p = write(tmp_path, "d.txt", "first  \n\n  \nsecond\r\nthird")
    with pytest.warns(InputWarning, match="multi-line paragraphs"):  # lines chosen, yet blocks
        ds = load_texts(p, text_records="line")
    assert ds.texts == ["first", "second", "third"]
    assert ds.ids == [cid("first"), cid("second"), cid("third")]


def test_paragraphs(tmp_path: Path) -> None:
    p = write(tmp_path, "d.txt", "\na\nb\n\n\nc\n  \nd\ne\n")
    ds = load_texts(p, format="paragraphs")
    assert ds.texts == ["a\nb", "c", "d\ne"]
    assert ds.ids == [cid("a\nb"), cid("c"), cid("d\ne")]


# -- errors -------------------------------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="data file not found"):
        load_texts(tmp_path / "nope.jsonl")


def test_directory_and_unknown_suffix_and_format(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="is a directory"):
        load_texts(tmp_path)
    p = write(tmp_path, "d.xml", "x")
    with pytest.raises(DataError, match=r"cannot infer the format.*jsonl, csv, tsv, txt"):
        load_texts(p)
    with pytest.raises(DataError, match="unknown format 'xml'"):
        load_texts(p, format="xml")


@pytest.mark.parametrize(
    ("name", "content"),
    [
        ("e.jsonl", ""),
        ("e.jsonl", "\n \n"),
        ("e.csv", "id,text\n"),
        ("e.txt", "\n\n"),
        ("e.csv", ""),
    ],
)
def test_empty_dataset(tmp_path: Path, name: str, content: str) -> None:
    p = write(tmp_path, name, content)
    with pytest.raises(DataError, match=r"no records|empty file"):
        load_texts(p)


# -- bundled ------------------------------------------------------------------------------


def test_bundled_and_fixed_split() -> None:
    full = load_texts("bundled:clinic_notes")
    train = load_texts("bundled:clinic_notes:train")
    val = load_texts("bundled:clinic_notes:validation")
    assert len(full) == 4500 and len(train) + len(val) == 4500
    assert abs(len(val) - 450) < 5 * (4500 * 0.1 * 0.9) ** 0.5  # per-record decisions at 0.1
    assert set(train.ids).isdisjoint(val.ids)
    assert set(train.ids) | set(val.ids) == set(full.ids)
    assert val.ids == split(full, 0.1, BUNDLED_SPLIT_KEY)[1].ids  # a public, fixed split


@pytest.mark.parametrize("spec", ["bundled:nope", "bundled:clinic_notes:test", "bundled:"])
def test_bad_bundled_name(spec: str) -> None:
    with pytest.raises(DataError, match="clinic_notes"):
        load_texts(spec)


# -- split --------------------------------------------------------------------------------


def make(n: int) -> TextDataset:
    return TextDataset([f"text {i}" for i in range(n)], [f"id{i}" for i in range(n)])


def test_split_sizes_order_and_determinism() -> None:
    ds = make(2000)
    tr, va = split(ds, 0.2, KEY)
    assert len(tr) + len(va) == 2000 and abs(len(va) - 400) < 5 * (2000 * 0.16) ** 0.5
    assert tr.ids == sorted(tr.ids, key=lambda s: int(s[2:]))  # original order kept
    assert split(ds, 0.2, RunKey.from_insecure_seed(3))[1].ids == va.ids
    assert split(ds, 0.2, RunKey.from_insecure_seed(4))[1].ids != va.ids
    assert split(ds, 0.2, KEY, "public")[1].ids != va.ids  # an independent sub-key per purpose
    for t, i in zip(va.texts, va.ids, strict=True):
        assert t == f"text {i[2:]}"


def test_split_independent_of_file_order() -> None:
    ds = make(60)
    order = list(range(60))
    random.Random(0).shuffle(order)
    shuffled = ds.subset(order)
    assert set(split(shuffled, 0.25, KEY)[1].ids) == set(split(ds, 0.25, KEY)[1].ids)


def test_split_edge_cases() -> None:
    assert len(split(make(10), 0.0, KEY)[1]) == 0
    assert len(split(TextDataset([], []), 0.5, KEY)[1]) == 0
    for bad in (-0.1, 1.0, 1.5):
        with pytest.raises(ValueError, match="validation fraction"):
            split(make(5), bad, KEY)


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(0, 300),
    frac=st.floats(0.0, 0.99),
    seed=st.integers(0, 2**31),
    at=st.floats(0.0, 1.0),
)
def test_adding_a_record_changes_each_part_by_at_most_that_record(
    n: int, frac: float, seed: int, at: float
) -> None:
    """Neighbouring files give training sets that differ by at most the added record."""
    key = RunKey.from_insecure_seed(seed)
    ds = make(n)
    tr, va = split(ds, frac, key)
    assert sorted(tr.ids + va.ids) == sorted(ds.ids)
    pos = int(at * n)
    bigger = TextDataset(
        [*ds.texts[:pos], "an added record", *ds.texts[pos:]],
        [*ds.ids[:pos], "added", *ds.ids[pos:]],
    )
    tr2, va2 = split(bigger, frac, key)
    assert set(tr2.ids) - {"added"} == set(tr.ids) and set(va2.ids) - {"added"} == set(va.ids)


def test_cap_keeps_a_count_by_keyed_hash_and_may_swap_one_record() -> None:
    """``cap`` is not per-record: adding a record can push another out (the run reports the
    group-privacy epsilon for that case)."""
    ds = make(200)
    kept, cut = cap(ds, 50, KEY, "max_records")
    assert len(kept) == 50 and len(cut) == 150 and sorted(kept.ids + cut.ids) == sorted(ds.ids)
    assert kept.ids == [i for i in ds.ids if i in set(kept.ids)]  # original order
    swaps = 0
    for j in range(40):
        bigger = TextDataset([*ds.texts, f"extra {j}"], [*ds.ids, f"extra{j}"])
        k2 = set(cap(bigger, 50, KEY, "max_records")[0].ids)
        diff = k2 ^ set(kept.ids)
        assert diff in (set(), {f"extra{j}"} | (set(kept.ids) - k2))
        assert len(diff) in (0, 2)
        swaps += len(diff) == 2
    assert 0 < swaps < 40  # about 50/201 of added records displace one


def test_textdataset_length_mismatch() -> None:
    with pytest.raises(ValueError):
        TextDataset(["a"], [])


def test_jsonl_written_by_json_dumps_roundtrip(tmp_path: Path) -> None:
    recs = [{"id": f"r{i}", "text": f'Patient {i}\nnote "quoted" é'} for i in range(5)]
    p = write(tmp_path, "d.jsonl", "".join(json.dumps(r) + "\n" for r in recs))
    assert load_texts(p).texts == [r["text"] for r in recs]


# -- Parquet and datasets saved to disk ---------------------------------------------------


def test_parquet_files_and_folders(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    pq.write_table(pa.table({"note": ["alpha", "beta"], "id": [7, 8]}), tmp_path / "a.parquet")
    ds = load_texts(tmp_path / "a.parquet", text_field="note")
    assert ds.texts == ["alpha", "beta"] and ds.ids == ["7", "8"]
    folder = tmp_path / "shards"
    folder.mkdir()
    pq.write_table(pa.table({"text": ["one", "   "]}), folder / "part-0.parquet")
    pq.write_table(pa.table({"text": ["two"]}), folder / "part-1.parquet")
    with pytest.warns(InputWarning, match="dropped 1"):
        ds = load_texts(folder)
    assert ds.texts == ["one", "two"] and ds.ids == [cid("one"), cid("two")]
    with pytest.raises(DataError, match=r"no column 'text'; available columns: note, id"):
        load_texts(tmp_path / "a.parquet")
    pq.write_table(pa.table({"text": [1, 2]}), tmp_path / "n.parquet")
    with pytest.raises(DataError, match="row 1: column 'text' is int"):
        load_texts(tmp_path / "n.parquet")


def test_datasets_saved_to_disk(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    data = datasets.Dataset.from_dict({"text": ["first", "second"], "id": ["a", "b"]})
    data.save_to_disk(str(tmp_path / "saved"))
    ds = load_texts(tmp_path / "saved")
    assert ds.texts == ["first", "second"] and ds.ids == ["a", "b"]
    datasets.DatasetDict({"train": data, "test": data}).save_to_disk(str(tmp_path / "dict"))
    with pytest.raises(DataError, match=r"DatasetDict with splits test, train.*dict/test"):
        load_texts(tmp_path / "dict")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="neither a dataset saved"):
        load_texts(tmp_path / "empty")


def test_tables_name_the_extra_when_it_is_missing(tmp_path: Path, monkeypatch) -> None:
    from dptrain.extras import MissingExtraError

    (tmp_path / "d.parquet").write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(MissingExtraError, match=r"dptrain\[datasets\]"):
        load_texts(tmp_path / "d.parquet")
    (tmp_path / "saved").mkdir()
    (tmp_path / "saved" / "state.json").write_text("{}")
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(MissingExtraError, match=r"dptrain\[datasets\]"):
        load_texts(tmp_path / "saved")


# -- record ids: one canonical form, one rule for blanks, in every format --------------------


def _id_files(tmp_path: Path, texts: list[str], ids: list) -> list[Path]:
    """The same records (``ids[i] is None``: no id field) as JSONL, a JSON array, CSV, TSV,
    Parquet and a datasets save (the last two only when their extras are installed)."""
    rows = [
        {"text": t, **({} if i is None else {"id": i})} for t, i in zip(texts, ids, strict=True)
    ]
    paths = [
        write(tmp_path, "a.jsonl", "".join(json.dumps(r) + "\n" for r in rows)),
        write(tmp_path, "a.json", json.dumps(rows)),
    ]
    for name, sep in (("a.csv", ","), ("a.tsv", "\t")):
        cells = [f"{t}{sep}{'' if i is None else i}" for t, i in zip(texts, ids, strict=True)]
        paths.append(write(tmp_path, name, "\n".join([f"text{sep}id", *cells]) + "\n"))
    try:
        import datasets
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        return paths
    column = {"text": texts, "id": [None if i is None else i for i in ids]}
    pq.write_table(pa.table(column), tmp_path / "a.parquet")
    datasets.Dataset.from_dict(column).save_to_disk(str(tmp_path / "saved"))
    return [*paths, tmp_path / "a.parquet", tmp_path / "saved"]


def test_blank_record_ids_are_no_ids_in_every_format(tmp_path: Path) -> None:
    """A blank id ("" or whitespace) is no id, as an empty CSV cell must be: the record's id is
    derived from its content in JSONL, JSON, CSV, TSV, Parquet and datasets alike, and two
    blank ids are not a duplicate; a given id is stripped."""
    texts = ["alpha", "beta", "gamma", "delta"]
    for path in _id_files(tmp_path, texts, ["", " a ", "   ", None]):
        ds = load_texts(path)
        assert ds.ids == [cid("alpha"), "a", cid("gamma"), cid("delta")], path.name


def test_numeric_record_ids_have_one_text_in_every_format(tmp_path: Path) -> None:
    """1, 1.0 and "1" are the id "1": a float id column (Parquet / datasets) and a CSV of one
    ("2.0") give the ids an integer column does; the same id twice is a duplicate."""
    texts = ["alpha", "beta"]
    for path in _id_files(tmp_path, texts, [1.0, 2.0]):
        assert load_texts(path).ids == ["1", "2"], path.name
    np = pytest.importorskip("numpy")
    same = [7, 7.0, "7", " 7.00 ", np.int64(7), np.float64(7.0), Decimal("7"), Decimal("7.0")]
    assert {canonical_id(v, "here", "id") for v in same} == {"7"}
    assert [canonical_id(v, "here", "id") for v in ("007", "+7", "-0.0", "\u0661.0")] == [
        "007", "+7", "0", "\u0661.0"
    ]  # fmt: skip
    assert [canonical_id(v, "here", "id") for v in (None, float("nan"), "", " \t")] == [None] * 4
    write(tmp_path, "mixed.jsonl", '{"text": "a", "id": 1}\n{"text": "b", "id": "1.0"}\n')
    with pytest.raises(DataError, match="duplicate record id '1'"):
        load_texts(tmp_path / "mixed.jsonl")


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("1.5", "'id' is the float 1.5, which is not a whole number"),
        ("1e300", "'id' is the float 1e\\+300, which is beyond 2\\^53"),
        ("true", "'id' is the boolean True"),
        ('{"a": 1}', "'id' is dict, not an id"),
    ],
)
def test_record_ids_without_one_exact_text_are_refused_naming_the_line(
    tmp_path: Path, value: str, message: str
) -> None:
    write(tmp_path, "a.jsonl", f'{{"text": "a", "id": 3}}\n{{"text": "b", "id": {value}}}\n')
    with pytest.raises(DataError, match=rf"a.jsonl:2: {message}.*Fix: "):
        load_texts(tmp_path / "a.jsonl")
