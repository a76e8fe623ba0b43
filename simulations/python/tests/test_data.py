"""fedrec.data: the CLI's loaders and splits, as numpy arrays."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

import fedrec
from fedrec import data


def test_synthetic_columns_are_numpy_arrays(small: data.Dataset) -> None:
    cols = small.columns()
    assert small.n_users == 200 and small.n_items <= 80
    assert len(small) == len(cols["user"]) == len(cols["item"]) == len(cols["rating"])
    assert cols["user"].dtype == np.int64 and cols["item"].dtype == np.int64
    assert cols["rating"].dtype == np.float32
    assert cols["user"].max() == small.n_users - 1
    assert cols["timestamp"].dtype == np.int64 and len(cols["timestamp"]) == len(small)
    assert set(np.unique(cols["rating"])) <= {1.0, 2.0, 3.0, 4.0, 5.0}


def test_synthetic_is_seeded() -> None:
    a, b, c = data.synthetic(50, 60, seed=3), data.synthetic(50, 60, seed=3), data.synthetic(50, 60, seed=4)
    assert np.array_equal(a.columns()["item"], b.columns()["item"])
    assert not np.array_equal(a.columns()["item"], c.columns()["item"])


def test_split_holds_out_a_fraction_per_user(small: data.Dataset, small_split: data.Split) -> None:
    tr, te = small_split.train, small_split.test
    assert len(tr["user"]) + len(te["user"]) == len(small)
    assert 0.15 < len(te["user"]) / len(small) < 0.25
    assert small_split.kind == "random" and small_split.n_items == small.n_items
    again = small.split(0.2, "random", 11)
    assert np.array_equal(again.test["item"], te["item"])
    assert not np.array_equal(small.split(0.2, "random", 12).test["item"], te["item"])
    info = small_split.info()
    assert info["n_train"] == len(tr["user"]) and info["split"] == "random"


def test_a_temporal_split_holds_out_the_latest(tmp_path: Path) -> None:
    f = tmp_path / "u.data"
    f.write_text("".join(f"1\t{i}\t{1 + i % 5}\t{1000 + i}\n" for i in range(10)))
    s = data.load_ratings(f).split(0.3, "temporal", 1)
    assert sorted(s.test["timestamp"].tolist()) == [1007, 1008, 1009]


def test_ratings_files_in_the_cli_formats(tmp_path: Path) -> None:
    (tmp_path / "u.data").write_text("196\t242\t3\t881250949\n186\t302\t3\t891717742\n196\t302\t5\t881250950\n")
    (tmp_path / "ratings.dat").write_text("1::1193::5::978300760\n1::661::3::978302109\n")
    (tmp_path / "ratings.csv").write_text("userId,movieId,rating,timestamp\n1,31,2.5,1260759144\n2,31,4.0,1260759179\n")
    u = data.load_ratings(tmp_path / "u.data")
    assert (u.n_users, u.n_items, len(u)) == (2, 2, 3)
    assert u.user_ids == ["196", "186"] and u.item_ids == ["242", "302"]
    assert u.columns()["timestamp"].tolist() == [881250949, 891717742, 881250950]
    assert len(data.load_ratings(tmp_path / "ratings.dat")) == 2
    csv = data.load_ratings(os.fspath(tmp_path / "ratings.csv"))
    assert csv.columns()["rating"].tolist() == [2.5, 4.0]


def test_a_malformed_file_names_file_and_line(tmp_path: Path) -> None:
    f = tmp_path / "bad.tsv"
    f.write_text("1\t2\t3\n1\t3\tlots\n")
    with pytest.raises(fedrec.MalformedDataError) as err:
        data.load_ratings(f)
    assert f"{f}:2:" in str(err.value)
    assert isinstance(err.value, fedrec.DataError)


def test_a_missing_file_is_a_data_error(tmp_path: Path) -> None:
    with pytest.raises(fedrec.DataError, match="cannot access"):
        data.load_ratings(tmp_path / "nope.tsv")


def test_train_test_files_share_one_index_space(tmp_path: Path) -> None:
    (tmp_path / "train.tsv").write_text("a\tx\t4\nb\ty\t3\n")
    (tmp_path / "test.tsv").write_text("a\tz\t5\n")
    s = data.load_train_test(tmp_path / "train.tsv", tmp_path / "test.tsv")
    assert s.kind == "given" and s.item_ids == ["x", "y", "z"]
    assert s.train["timestamp"] is None
    assert s.test["item"].tolist() == [2]


def test_from_arrays_follows_the_loader_rules() -> None:
    ds = data.from_arrays(["u1", "u2", "u1", "u1"], [10, 10, 20, 10], [4, 3, 2, 5], name="mine")
    cols = ds.columns()
    # The repeated (u1, 10) keeps its last occurrence, at that position.
    assert ds.user_ids == ["u1", "u2"] and ds.item_ids == ["10", "20"]
    assert cols["user"].tolist() == [1, 0, 0] and cols["rating"].tolist() == [3.0, 2.0, 5.0]
    with pytest.raises(fedrec.DataError, match="finite"):
        data.from_arrays([1], [1], [float("nan")])
    with pytest.raises(fedrec.ConfigError, match="different lengths"):
        data.from_arrays([1, 2], [1], [3.0, 4.0])


def test_split_rejects_a_bad_fraction(small: data.Dataset) -> None:
    with pytest.raises(fedrec.ConfigError, match=r"test fraction must be in \[0, 1\)"):
        small.split(1.0)
    with pytest.raises(fedrec.ConfigError, match="unknown split kind"):
        small.split(0.2, "sideways")  # type: ignore[arg-type]


def test_ml100k_is_fetched_and_checked_as_the_cli_does(tmp_path: Path) -> None:
    """Downloads recbole==1.2.1 from PyPI (or uses $FEDREC_DATA); skipped when offline."""
    data_dir = Path(os.environ.get("FEDREC_DATA") or tmp_path)
    try:
        ds = data.ml100k(data_dir)
    except fedrec.FetchError as e:
        pytest.skip(f"MovieLens-100K cannot be fetched here: {e}")
    assert (ds.name, ds.n_users, ds.n_items, len(ds)) == ("ml-100k", 943, 1682, 100_000)
    assert ds.columns()["timestamp"] is not None
    assert data.RECBOLE_VERSION == "1.2.1" and len(data.RECBOLE_WHEEL_SHA256) == 64
