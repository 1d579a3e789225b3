"""Seeded non-IID split of the training records over clients.

With ``by`` a record field (the bundled corpus has ``kind``: clinic_note, portal_message,
support_ticket, referral_letter, lab_notice), the records of each field value are divided
among the ``K`` clients in proportions drawn from ``Dirichlet(alpha, ..., alpha)``: small
``alpha`` gives each client a few dominant kinds, large ``alpha`` approaches an IID split.
``by=None`` is a uniform random (IID) split.  Every record goes to exactly one client, so
each client's records are disjoint and their privacy accounting is independent.
"""

from __future__ import annotations

import numpy as np

from ..data import DataError, TextDataset, bundled_path
from ..data.loading import NoFieldsError, canonical_id, load_field, missing_field

MAX_DRAWS = 100


def record_labels(
    path: str,
    field: str,
    ids: list[str],
    format: str | None = None,
    text_field: str = "text",
) -> list[str]:
    """The value of ``field`` for each record id in ``ids`` (read from the same data file;
    ids are those :func:`~dptrain.data.load_texts` gives with ``text_field``, which may be content-derived)."""
    source = bundled_path(path.split(":")[1]) if path.startswith("bundled:") else path
    try:
        records, values = load_field(source, field, text_field=text_field, format=format)
    except NoFieldsError as e:
        raise DataError(f"federated.partition.by: {e}") from None
    by_id: dict[str, str] = {}
    for rid, (where, value) in zip(records.ids, values, strict=True):
        label = canonical_id(value, where, field)  # 1, 1.0 and "1" are one label
        if label is not None:
            by_id[rid] = label
    missing = [i for i in ids if i not in by_id]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise missing_field(
            f"{path}: records {missing[:3]}{more} (the value is missing, null or empty)",
            field,
            None,
            key="federated.partition.by",
            holds="each record's label",
            other_fix=", give every record a label, or set federated.partition.by: null (an IID "
            "split)",
        )
    return [by_id[i] for i in ids]


def split_indices(
    n: int,
    clients: int,
    *,
    labels: list[str] | None,
    alpha: float,
    seed: int,
    min_size: int = 2,
) -> list[list[int]]:
    """Indices ``0..n-1`` divided over ``clients``: Dirichlet over ``labels``, or IID if None.

    Draws again (up to :data:`MAX_DRAWS` times) until every client has ``min_size`` records.
    """
    if n < clients * min_size:
        raise DataError(
            f"{n} training records cannot give {clients} clients {min_size} records each; "
            "lower federated.clients or training.batch_size, or use more data"
        )
    rng = np.random.default_rng(seed)
    for _ in range(MAX_DRAWS):
        parts: list[list[int]] = [[] for _ in range(clients)]
        if labels is None:
            for k, chunk in enumerate(np.array_split(rng.permutation(n), clients)):
                parts[k] = chunk.tolist()
        else:
            for value in sorted(set(labels)):
                idx = rng.permutation([i for i, v in enumerate(labels) if v == value])
                cuts = (np.cumsum(rng.dirichlet([alpha] * clients))[:-1] * len(idx)).astype(int)
                for k, chunk in enumerate(np.split(idx, cuts)):
                    parts[k].extend(chunk.tolist())
        if min(len(p) for p in parts) >= min_size:
            return [sorted(p) for p in parts]
    raise DataError(
        f"no Dirichlet(alpha={alpha}) split in {MAX_DRAWS} draws gives each of {clients} clients "
        f"{min_size} records; raise federated.partition.alpha or lower federated.clients"
    )


def partition(
    train: TextDataset,
    clients: int,
    *,
    path: str,
    by: str | None,
    alpha: float,
    seed: int,
    min_size: int = 2,
    format: str | None = None,
    text_field: str = "text",
) -> list[TextDataset]:
    """The clients' datasets (see the module docstring)."""
    labels = record_labels(path, by, train.ids, format, text_field) if by else None
    parts = split_indices(
        len(train), clients, labels=labels, alpha=alpha, seed=seed, min_size=min_size
    )
    return [train.subset(p) for p in parts]
