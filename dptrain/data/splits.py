"""The splits of a recipe's data: training, validation, public, unused (all keyed per record).

Every split is a per-record keyed decision of the run key (:func:`dptrain.data.split`), so
adding a record to the file changes the training set by at most that record; ``max_records``
is the exception (a count: see :func:`dptrain.plan.guarantee_numbers`).  With
``data.privacy_unit`` the validation split is keyed per PERSON instead
(:func:`split_people`): all of a person's records fall on one side, so validation measures
people the model never saw, and adding a person changes the training set by at most that
person.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from ..errors import RecipeError
from ..secret import RunKey, below, record_keys
from ..tasks import task_for
from .canaries import Canary, insert_canaries
from .loading import DataError, TextDataset, cap, split
from .people import recipe_person_ids, same_number, unit_name

if TYPE_CHECKING:
    from ..recipe import Recipe


def split_data(
    recipe: Recipe, key: RunKey, *, canaries: list[Canary] | None = None
) -> tuple[TextDataset, TextDataset, TextDataset]:
    """``(train, validation, unused)``: ``train`` ends with the included canary records (if the
    recipe has ``data.canaries``: ``canaries`` if given, the ones drawn from ``key`` by
    :func:`~dptrain.data.canaries.make_canaries`); ``unused`` holds the records cut by ``max_records`` or
    ``max_validation_records``, never trained on (an audit's extra non-members).

    ``max_records`` keeps the records with the lowest keyed hashes, so adding a record may
    swap one."""
    d = recipe.data
    task = task_for(recipe)  # text, or structured records as canonical texts
    texts = task.load(d.path, d.text_field, d.format, text_records=d.text_records)
    if d.validation_path:
        train = texts
        val = task.load(d.validation_path, d.text_field, d.format, text_records=d.text_records)
        if d.privacy_unit is not None:
            _check_people_apart(recipe, train, val)
    elif d.privacy_unit is not None:
        persons = recipe_person_ids(recipe)
        train, val = split_people(texts, persons, d.validation_fraction, key)
    else:
        train, val = split(texts, d.validation_fraction, key, "validation")
    unused = TextDataset([], [])
    if d.max_records is not None:
        train, unused = cap(train, d.max_records, key, "max_records")
    if d.max_validation_records is not None:
        val, rest = cap(val, d.max_validation_records, key, "max_validation_records")
        unused = TextDataset(unused.texts + rest.texts, unused.ids + rest.ids)
    if d.canaries is not None:
        train = insert_canaries(
            train, d.canaries, key, canaries, person_level=d.privacy_unit is not None
        )
    return train, val, unused


def split_people(
    ds: TextDataset, persons: dict[str, str], fraction: float, key: RunKey
) -> tuple[TextDataset, TextDataset]:
    """``(rest, chosen)`` by person: person ``u`` (with every record of theirs) is chosen iff
    ``PRF_k(id64(u)) < floor(fraction 2^64)`` (``k``: the ``split/validation/people`` sub-key
    of ``key``, distinct from the record-level ``split/validation``).

    Each person is decided alone, from their id: adding or removing a person changes the parts
    by exactly that person's records.  Both parts keep the original record order."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"validation fraction must be in [0, 1), got {fraction}")
    if not len(ds):
        return ds, TextDataset([], [])
    of_record = [persons.get(rid) for rid in ds.ids]
    if None in of_record:
        rid = ds.ids[of_record.index(None)]
        raise DataError(f"record {rid!r} has no person id (data.privacy_unit.field)")
    people = sorted(set(of_record))
    words = key.prf("split/validation/people").at(0, record_keys(people))[:, 0]
    held = {u for u, c in zip(people, below(words, fraction), strict=True) if c}
    return (
        ds.subset([i for i, u in enumerate(of_record) if u not in held]),
        ds.subset([i for i, u in enumerate(of_record) if u in held]),
    )


def _check_people_apart(recipe: Recipe, train: TextDataset, val: TextDataset) -> None:
    """``data.validation_path`` under a person unit: no person may have records on both sides
    (validation must measure people the model never saw)."""
    d = recipe.data
    field = d.privacy_unit.field  # type: ignore[union-attr]
    mine = recipe_person_ids(recipe)
    try:
        theirs = recipe_person_ids(recipe, path=d.validation_path)
    except DataError as e:
        raise RecipeError(
            f"data.validation_path: cannot tell its records' people ({e}). Under "
            "data.privacy_unit validation must hold people the model never trained on. Fix: "
            f"give every validation record its {field!r}, or delete data.validation_path to "
            "let the run key hold out whole people"
        ) from None

    def key(person: str) -> object:  # "007" in one file and 7 in the other: one person
        number = same_number(person)
        return person if number is None else number

    seen = {key(mine[r]): mine[r] for r in train.ids if r in mine}
    shared = sorted(seen[k] for k in seen.keys() & {key(theirs[r]) for r in val.ids if r in theirs})
    if shared:
        raise RecipeError(
            f"data.validation_path: {len(shared)} people (e.g. {shared[0]!r}) have records in "
            "both the training and the validation data, so validation would not measure unseen "
            "people. Fix: move each of them wholly to one file, or delete data.validation_path "
            "to let the run key hold out whole people"
        )


def no_validation_error(recipe: Recipe) -> RecipeError:
    """The error for an empty validation split drawn by ``data.validation_fraction``: per
    record, or under ``data.privacy_unit`` per person (then few people may give none)."""
    d = recipe.data
    if d.privacy_unit is None:
        drawn = (
            f"no record of {d.path} was held out for validation (each record is held out alone "
            f"with probability {d.validation_fraction:g})"
        )
        path = "set data.validation_path"
    else:
        who = unit_name(d.privacy_unit.field)
        drawn = (
            f"no {who} of {d.path} was held out for validation (under data.privacy_unit the "
            f"split is per {who}: each {who} ({d.privacy_unit.field!r}), with all of their "
            f"records, is held out alone with probability {d.validation_fraction:g}, so with few "
            f"people none may be)"
        )
        path = f"set data.validation_path to a file of people not in {d.path}"
    return RecipeError(
        f"data.validation_fraction: {drawn}. Fix: raise data.validation_fraction or {path}."
    )


def read_data(
    recipe: Recipe, key: RunKey, *, canaries: list[Canary] | None = None
) -> tuple[TextDataset, TextDataset]:
    """``(train, validation)`` of :func:`split_data`."""
    train, val, _ = split_data(recipe, key, canaries=canaries)
    return train, val


def load_public(recipe: Recipe) -> TextDataset:
    """The records of ``data.public_path``, read as the recipe's task reads its data."""
    d = recipe.data
    if d.public_path is None:
        raise ValueError("load_public: the recipe has no data.public_path")
    return task_for(recipe).load(d.public_path, d.text_field, d.format, text_records=d.text_records)


def read_public(
    recipe: Recipe,
    train: TextDataset,
    key: RunKey,
    *,
    load: Callable[[Recipe], TextDataset] = load_public,
) -> tuple[TextDataset, TextDataset | None]:
    """``(private, public)``: the split the recipe declares public (``data.public_fraction``:
    each training record is public by a per-record keyed decision, and removed from the
    private records; or ``data.public_path``, read by ``load``: a caller may cache the file);
    the DP guarantee covers only the private records."""
    d = recipe.data
    if d.public_fraction is not None:
        train, public = split(train, d.public_fraction, key, "public")
    elif d.public_path is not None:
        public = load(recipe)
        shared = set(public.texts) & set(train.texts)
        if shared:
            raise RecipeError(
                f"data.public_path: {len(shared)} of its records are also private training "
                "records; public data must not contain protected records. Fix: remove them, or "
                "use data.public_fraction to carve a public split out of the training data."
            )
    else:
        return train, None
    if d.max_public_records is not None:
        public = cap(public, d.max_public_records, key, "max_public_records")[0]
    return train, public
