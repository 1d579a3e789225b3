"""The splits of a recipe's data: training, validation, public, unused (all keyed per record).

Every split is a per-record keyed decision of the run key (:func:`dptrain.data.split`), so
adding a record to the file changes the training set by at most that record; ``max_records``
is the exception (a count: see :func:`dptrain.plan.guarantee_numbers`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import RecipeError
from ..secret import RunKey
from ..tasks import task_for
from .canaries import Canary, insert_canaries
from .loading import TextDataset, cap, split

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
    else:
        train, val = split(texts, d.validation_fraction, key, "validation")
    unused = TextDataset([], [])
    if d.max_records is not None:
        train, unused = cap(train, d.max_records, key, "max_records")
    if d.max_validation_records is not None:
        val, rest = cap(val, d.max_validation_records, key, "max_validation_records")
        unused = TextDataset(unused.texts + rest.texts, unused.ids + rest.ids)
    if d.canaries is not None:
        train = insert_canaries(train, d.canaries, key, canaries)
    return train, val, unused


def read_data(
    recipe: Recipe, key: RunKey, *, canaries: list[Canary] | None = None
) -> tuple[TextDataset, TextDataset]:
    """``(train, validation)`` of :func:`split_data`."""
    train, val, _ = split_data(recipe, key, canaries=canaries)
    return train, val


def read_public(
    recipe: Recipe, train: TextDataset, key: RunKey
) -> tuple[TextDataset, TextDataset | None]:
    """``(private, public)``: the split the recipe declares public (``data.public_fraction``:
    each training record is public by a per-record keyed decision, and removed from the
    private records; or ``data.public_path``); the DP guarantee covers only the private records."""
    d = recipe.data
    if d.public_fraction is not None:
        train, public = split(train, d.public_fraction, key, "public")
    elif d.public_path is not None:
        public = task_for(recipe).load(
            d.public_path, d.text_field, d.format, text_records=d.text_records
        )
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
