"""Built-in datasets, user files, splits and batching."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from toolkit.data import batch_order, check_targets, curvature_subset, curves_dataset, load_data, shard_batch
from toolkit.spec.train_config import DataConfig

X64 = {"x": {"shape": [64]}}


def test_digits_vectors_in_unit_range_and_split_deterministically() -> None:
    a = load_data(DataConfig(builtin="digits"), X64, loss="cross_entropy", output_size=10)
    b = load_data(DataConfig(builtin="digits"), X64)
    c = load_data(DataConfig(builtin="digits", seed=1), X64)
    n = len(a.train) + len(a.val) + len(a.test)
    assert n == 1797 and len(a.test) == int(1797 * 0.2) and len(a.val) == int(1797 * 0.1)
    x = a.train.inputs["x"]
    assert x.shape[1:] == (64,) and x.dtype == np.float32 and x.min() >= 0.0 and x.max() <= 1.0
    np.testing.assert_array_equal(a.train.inputs["x"], b.train.inputs["x"])
    assert not np.array_equal(a.train.targets, c.train.targets)
    # the splits partition the data: every example appears once
    rows = np.concatenate([s.inputs["x"] for s in (a.train, a.val, a.test)])
    from sklearn.datasets import load_digits

    assert np.unique(rows, axis=0).shape == np.unique(load_digits().data / 16.0, axis=0).shape


def test_digits_images_and_reshape_to_the_spec() -> None:
    s = load_data(DataConfig(builtin="digits_images", limit=50), {"x": {"shape": [1, 8, 8]}})
    assert s.train.inputs["x"].shape[1:] == (1, 8, 8)
    s = load_data(DataConfig(builtin="digits", limit=50), {"x": {"shape": [1, 8, 8]}})
    assert s.train.inputs["x"].shape[1:] == (1, 8, 8)
    with pytest.raises(
        ValueError, match=r"builtin dataset 'digits': input 'x': expected examples of shape \[32\]"
    ):
        load_data(DataConfig(builtin="digits"), {"x": {"shape": [32]}})


def test_curves_are_deterministic_smooth_strokes() -> None:
    a, b, c = curves_dataset(20, seed=3), curves_dataset(20, seed=3), curves_dataset(20, seed=4)
    assert a.shape == (20, 1, 28, 28) and a.dtype == np.float32
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert a.min() >= 0.0 and a.max() <= 1.0
    bright = (a > 0.5).reshape(20, -1).mean(axis=1)
    assert np.all(bright > 0.01) and np.all(bright < 0.3)  # a thin stroke, not noise or blank
    s = load_data(DataConfig(builtin="curves", limit=40), {"x": {"shape": [784]}}, loss="sum_squared")
    np.testing.assert_array_equal(s.train.inputs["x"], s.train.targets.reshape(len(s.train), -1))


@pytest.mark.skipif(importlib.util.find_spec("mnist1d") is None, reason="mnist1d not installed")
def test_mnist1d_generates_offline() -> None:
    s = load_data(
        DataConfig(builtin="mnist1d", limit=200), {"x": {"shape": [40]}}, loss="cross_entropy", output_size=10
    )
    assert s.train.inputs["x"].shape[1:] == (40,) and len(s.train) + len(s.val) + len(s.test) == 200


def test_npz_inputs_targets_and_errors(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    p = tmp_path / "d.npz"
    np.savez(p, feats=rng.random((30, 4)), y=rng.integers(0, 3, 30))
    s = load_data(DataConfig(path=str(p), inputs={"x": "feats"}), {"x": {"shape": [4]}}, "cross_entropy", 3)
    assert s.train.inputs["x"].shape[1:] == (4,) and s.train.targets.dtype == np.int64
    with pytest.raises(FileNotFoundError, match=r"missing\.npz"):
        load_data(DataConfig(path=str(tmp_path / "missing.npz")), {"x": {"shape": [4]}})
    with pytest.raises(ValueError, match=r"d.npz: unknown column 'nope'; known: \['feats', 'y'\]"):
        load_data(DataConfig(path=str(p), inputs={"x": "nope"}), {"x": {"shape": [4]}})
    with pytest.raises(ValueError, match=r"expected labels in \[0, 2\) .* got labels in \[0, 2\]"):
        load_data(DataConfig(path=str(p), inputs={"x": "feats"}), {"x": {"shape": [4]}}, "cross_entropy", 2)
    with pytest.raises(ValueError, match=r"expected examples of shape \[5\] \(spec inputs\), got \[4\]"):
        load_data(DataConfig(path=str(p), inputs={"x": "feats"}), {"x": {"shape": [5]}})
    bad = rng.random((30, 4))
    bad[7, 2] = np.nan
    np.savez(tmp_path / "nan.npz", x=bad, y=np.zeros(30))
    with pytest.raises(
        ValueError,
        match=r"nan.npz: input 'x': expected finite values, got NaN/inf in 1 example\(s\), first at row 7",
    ):
        load_data(DataConfig(path=str(tmp_path / "nan.npz")), {"x": {"shape": [4]}})


def test_csv_named_columns(tmp_path: Path) -> None:
    p = tmp_path / "d.csv"
    p.write_text("a,b,c,label\n" + "\n".join(f"{i},{i * 2},{i % 3},{i % 2}" for i in range(20)) + "\n")
    s = load_data(
        DataConfig(
            path=str(p), inputs={"x": ["a", "c"]}, target="label", test_fraction=0.0, val_fraction=0.0
        ),
        {"x": {"shape": [2]}},
    )
    order = np.argsort(s.train.inputs["x"][:, 0])
    np.testing.assert_array_equal(s.train.inputs["x"][order], np.stack([np.arange(20), np.arange(20) % 3], 1))
    np.testing.assert_array_equal(s.train.targets[order], np.arange(20) % 2)
    s = load_data(
        DataConfig(path=str(p), target="label"), {"x": {"shape": [3]}}
    )  # default: all other columns
    assert s.train.inputs["x"].shape[1:] == (3,)
    with pytest.raises(ValueError, match=r"d.csv: unknown column 'z'; known: \['a', 'b', 'c', 'label'\]"):
        load_data(DataConfig(path=str(p), inputs={"x": ["a", "z"]}, target="label"), {"x": {"shape": [2]}})
    (tmp_path / "bad.csv").write_text("a,y\n1,2\nfoo,3\n")
    with pytest.raises(ValueError, match=r"bad.csv:3: expected numbers"):
        load_data(DataConfig(path=str(tmp_path / "bad.csv")), {"x": {"shape": [1]}})


def test_npy_plain_structured_and_autoencoder(tmp_path: Path) -> None:
    arr = np.arange(40, dtype=np.float64).reshape(10, 4)
    np.save(tmp_path / "p.npy", arr)
    s = load_data(
        DataConfig(path=str(tmp_path / "p.npy"), test_fraction=0.0, val_fraction=0.0), {"x": {"shape": [3]}}
    )
    np.testing.assert_array_equal(np.sort(s.train.targets), arr[:, -1])
    s = load_data(DataConfig(path=str(tmp_path / "p.npy"), target="input"), {"x": {"shape": [4]}}, loss="mse")
    np.testing.assert_array_equal(s.train.inputs["x"], s.train.targets)
    rec = np.zeros(6, dtype=[("u", "f4"), ("y", "i8")])
    rec["u"], rec["y"] = np.arange(6), np.arange(6) % 2
    np.save(tmp_path / "s.npy", rec)
    s = load_data(
        DataConfig(path=str(tmp_path / "s.npy"), inputs={"x": ["u"]}),
        {"x": {"shape": [1]}},
        "cross_entropy",
        2,
    )
    assert s.train.inputs["x"].shape[1:] == (1,)
    with pytest.raises(ValueError, match=r"expected a \.npz, \.npy or \.csv file, got '\.txt'"):
        (tmp_path / "d.txt").write_text("1")
        load_data(DataConfig(path=str(tmp_path / "d.txt")), {"x": {"shape": [1]}})


def test_target_checks() -> None:
    with pytest.raises(ValueError, match="expected finite values, got NaN/inf first at row 1"):
        check_targets("f", np.array([0.0, np.inf]), "mse")
    with pytest.raises(ValueError, match=r"expected values in \[0, 1\] for bce"):
        check_targets("f", np.array([0.0, 2.0]), "bce")
    with pytest.raises(ValueError, match="integer class labels"):
        check_targets("f", np.array([0.5, 1.0]), "cross_entropy", 3)


def test_batches_shards_and_curvature_subsets() -> None:
    a, b = batch_order(100, 32, seed=1, epoch=0), batch_order(100, 32, seed=1, epoch=0)
    assert len(a) == 3 and all(len(x) == 32 for x in a)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not np.array_equal(a[0], batch_order(100, 32, seed=1, epoch=1)[0])
    assert len(np.unique(np.concatenate(a))) == 96
    g = a[0]
    shards = [shard_batch(g, r, 2) for r in range(2)]
    c1 = curvature_subset(32, 32, 0.25, 1)
    c2 = curvature_subset(16, 32, 0.25, 2)
    # one process and two processes use the same curvature examples
    assert set(g[:c1]) == set(np.concatenate([s[:c2] for s in shards]))
    with pytest.raises(ValueError, match="multiple of the 3 processes"):
        shard_batch(g, 0, 3)
