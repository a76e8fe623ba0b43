"""Datasets as the CLI loads them, as numpy arrays.

Everything here calls ``fedrec_sim::data``, the code behind ``fedrec-sim``'s data flags:

- :func:`ml100k` — MovieLens-100K, fetched on first use from PyPI (the ``recbole==1.2.1``
  wheel, checked by SHA-256) into ``data_dir`` (default ``$FEDREC_DATA`` or ``./data``);
  ``--dataset ml-100k``.
- :func:`load_ratings` — a ratings file in any format the CLI reads: MovieLens ``u.data``,
  ``ratings.dat``, ``ratings.csv``, or ``user<TAB>item<TAB>rating[<TAB>timestamp]``; ``--ratings``.
- :func:`load_train_test` — explicit train and test files; ``--train``/``--test``.
- :func:`synthetic` — the generated MovieLens-like population; ``--dataset synthetic``.
- :meth:`Dataset.split` / :func:`split` — the per-user holdout; ``--test-fraction``,
  ``--split``, ``--seed``.
- :func:`from_arrays` — your own interactions (any hashable ids), under the loader's rules.

A :class:`Dataset` has ``columns()`` and a :class:`Split` has ``train`` and ``test``: dicts of
numpy arrays ``user``, ``item`` (int64 dense indices), ``rating`` (float32) and ``timestamp``
(int64 seconds, or ``None`` when the data has none), ready for ``pandas.DataFrame``.
Original ids are in ``user_ids`` / ``item_ids``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

from . import _fedrec
from ._fedrec import Dataset, Split

__all__ = [
    "RECBOLE_VERSION",
    "RECBOLE_WHEEL_SHA256",
    "Dataset",
    "Split",
    "SplitKind",
    "default_data_dir",
    "fetch_ml100k",
    "from_arrays",
    "load_ratings",
    "load_train_test",
    "ml100k",
    "split",
    "synthetic",
]

SplitKind = Literal["random", "temporal"]

RECBOLE_VERSION: str = _fedrec.RECBOLE_VERSION
"""The recbole release whose wheel carries MovieLens-100K."""
RECBOLE_WHEEL_SHA256: str = _fedrec.RECBOLE_WHEEL_SHA256
"""SHA-256 the downloaded wheel must have."""

PathLike = str | os.PathLike[str]


def default_data_dir() -> Path:
    """``$FEDREC_DATA`` or ``data``, as the CLI."""
    return Path(_fedrec.data_default_dir())


def fetch_ml100k(data_dir: PathLike | None = None) -> Path:
    """Downloads MovieLens-100K into ``data_dir/ml-100k/`` unless it is there; returns that folder.

    Needs ``python3 -m pip`` and PyPI. Raises :class:`fedrec.FetchError` when offline and
    :class:`fedrec.ChecksumError` when the wheel's SHA-256 is not the pinned one.
    """
    return Path(_fedrec.data_fetch_ml100k(None if data_dir is None else os.fspath(data_dir)))


def ml100k(data_dir: PathLike | None = None) -> Dataset:
    """MovieLens-100K (943 users, 1682 items, 100,000 ratings), fetched when missing."""
    return _fedrec.data_ml100k(None if data_dir is None else os.fspath(data_dir))


def load_ratings(path: PathLike) -> Dataset:
    """A ratings file in any format the CLI reads (detected from its first line).

    Raises :class:`fedrec.MalformedDataError` naming the file and line of a bad record.
    """
    return _fedrec.data_load_ratings(os.fspath(path))


def load_train_test(train: PathLike, test: PathLike) -> Split:
    """Explicit train and test files in one index space (train's ids first)."""
    return _fedrec.data_load_train_test(os.fspath(train), os.fspath(test))


def synthetic(
    users: int = 10_000,
    items: int = 1682,
    seed: int = 1,
    *,
    preference_strength: float | None = None,
    popularity_exponent: float | None = None,
) -> Dataset:
    """The MovieLens-like population ``fedrec-sim --dataset synthetic`` generates.

    The CLI seeds it with ``--seed``: pass the same ``seed`` here (and to :meth:`Dataset.split`
    and :func:`fedrec.simulate`) to reproduce a CLI run.
    """
    return _fedrec.data_synthetic(users, items, seed, preference_strength, popularity_exponent)


def split(dataset: Dataset, test_fraction: float = 0.2, kind: SplitKind = "random", seed: int = 1) -> Split:
    """The per-user holdout (the same as ``dataset.split(...)``)."""
    return dataset.split(test_fraction, kind, seed)


def _ids(column: Sequence[Any] | np.ndarray) -> list[str]:
    return [str(x) for x in np.asarray(column).tolist()]


def from_arrays(
    user: Sequence[Any] | np.ndarray,
    item: Sequence[Any] | np.ndarray,
    rating: Sequence[float] | np.ndarray,
    timestamp: Sequence[int] | np.ndarray | None = None,
    name: str = "arrays",
) -> Dataset:
    """A dataset from columns (numpy arrays, lists or pandas Series).

    Ids may be of any type; they are kept as strings (``str(id)``) and get dense indices in
    order of first appearance. As in the file loader, a repeated (user, item) pair keeps
    its last occurrence, and every rating must be finite.
    """
    ratings = np.ascontiguousarray(rating, dtype=np.float32)
    stamps = None if timestamp is None else np.ascontiguousarray(timestamp, dtype=np.int64)
    return _fedrec.data_from_columns(_ids(user), _ids(item), ratings, stamps, name)
