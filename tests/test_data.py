"""Tests for jbyz.data: loaders (on small files written here), search order, splits, sampling."""

from __future__ import annotations

import gzip
import importlib.util
import pickle
import struct
import tarfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jbyz import data as D
from jbyz.registry import ConfigError

DEBIAN_FMNIST = Path("/usr/share/datasets/fashion-mnist")
ENV_VARS = ("JBYZ_DATA_DIR", "JBYZ_MNIST_DIR", "JBYZ_FASHION_MNIST_DIR", "JBYZ_CIFAR10_DIR",
            "JBYZ_CIFAR100_DIR")


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    for v in ENV_VARS:
        monkeypatch.delenv(v, raising=False)


# --------------------------------------------------------------------------------- writers
def idx_bytes(arr: np.ndarray) -> bytes:
    """The real IDX layout: 0, 0, type code, ndim, big-endian uint32 dims, big-endian data."""
    codes = {np.dtype(np.uint8): 0x08, np.dtype(np.int8): 0x09, np.dtype(">i2"): 0x0B,
             np.dtype(">i4"): 0x0C, np.dtype(">f4"): 0x0D, np.dtype(">f8"): 0x0E}
    arr = np.asarray(arr)
    be = arr.astype(arr.dtype.newbyteorder(">")) if arr.dtype.itemsize > 1 else arr
    code = codes[np.dtype(be.dtype.str)] if be.dtype.itemsize > 1 else codes[arr.dtype]
    head = bytes([0, 0, code, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    return head + be.tobytes()


def write_idx_set(folder: Path, *, n_train=6, n_test=4, hw=(5, 4), label_offset=0, gz=True,
                  dotted=False) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(label_offset)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, *hw), dtype=np.uint8),
        "train-labels-idx1-ubyte": ((np.arange(n_train) + label_offset) % 10).astype(np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, *hw), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": ((np.arange(n_test) * 3 + label_offset) % 10).astype(np.uint8),
    }
    for stem, arr in arrays.items():
        name = stem.replace("-idx", ".idx") if dotted else stem
        payload = idx_bytes(arr)
        if gz:
            with gzip.open(folder / (name + ".gz"), "wb") as fh:
                fh.write(payload)
        else:
            (folder / name).write_bytes(payload)
    return arrays


def cifar_batch(n, seed, label_keys):
    rng = np.random.default_rng(seed)
    d = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8)}
    for k in label_keys:
        d[k] = list(rng.integers(0, 10, n))
    return d


def write_cifar10(root: Path, as_tar: bool) -> dict:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    batches = {f"data_batch_{i}": cifar_batch(3, i, [b"labels"]) for i in range(1, 6)}
    batches["test_batch"] = cifar_batch(2, 9, [b"labels"])
    for name, d in batches.items():
        with open(folder / name, "wb") as fh:
            pickle.dump(d, fh)
    if as_tar:
        with tarfile.open(root / "cifar-10-python.tar.gz", "w:gz") as tar:
            tar.add(folder, arcname="cifar-10-batches-py")
        for p in folder.iterdir():
            p.unlink()
        folder.rmdir()
    return batches


# --------------------------------------------------------------------------------- digits
def test_digits_offline_split_and_normalisation():
    ds = D.load_dataset("digits")
    assert (len(ds.y_train), len(ds.y_test)) == (1437, 360)
    assert ds.x_train.shape == (1437, 8, 8, 1) and ds.x_train.dtype == np.float32
    assert ds.y_train.dtype == np.int32 and ds.input_shape == (8, 8, 1)
    assert ds.num_classes == 10 and ds.task == "classification"
    assert abs(float(ds.x_train.mean())) < 1e-4 and abs(float(ds.x_train.std()) - 1) < 1e-4
    # stratified: every class in the test split in proportion (~36 each)
    counts = np.bincount(ds.y_test, minlength=10)
    assert counts.min() >= 34 and counts.max() <= 38
    again = D.load_dataset("digits")
    np.testing.assert_array_equal(ds.x_test, again.x_test)
    small = D.load_dataset("digits", limit_train=100, limit_test=50)
    assert (len(small.y_train), len(small.y_test)) == (100, 50)
    np.testing.assert_array_equal(small.y_train, D.load_dataset("digits", limit_train=100).y_train)
    with pytest.raises(ConfigError):
        D.load_dataset("digits", limit_train=0)


def test_unknown_dataset_and_option():
    with pytest.raises(ConfigError, match="digits"):
        D.load_dataset("digitz")
    with pytest.raises(ConfigError, match="colour"):
        D.load_dataset("digits", colour=True)


# --------------------------------------------------------------------------------- IDX
@pytest.mark.parametrize("gz", [True, False])
def test_read_idx_roundtrip(tmp_path, gz):
    for arr in (np.arange(24, dtype=np.uint8).reshape(2, 3, 4),
                np.arange(6, dtype=np.int32).reshape(6) - 3,
                np.linspace(-1, 1, 10).astype(np.float32).reshape(2, 5)):
        p = tmp_path / ("a.idx.gz" if gz else "a.idx")
        payload = idx_bytes(arr)
        if gz:
            with gzip.open(p, "wb") as fh:
                fh.write(payload)
        else:
            p.write_bytes(payload)
        out = D.read_idx(p)
        np.testing.assert_array_equal(out, arr)
        assert out.dtype.isnative


def test_read_idx_rejects_garbage(tmp_path):
    (tmp_path / "bad").write_bytes(b"\x01\x02\x08\x01" + b"\x00" * 8)
    with pytest.raises(ConfigError, match="IDX"):
        D.read_idx(tmp_path / "bad")
    (tmp_path / "short").write_bytes(idx_bytes(np.zeros((4, 4), np.uint8))[:-3])
    with pytest.raises(ConfigError, match="truncated"):
        D.read_idx(tmp_path / "short")


@pytest.mark.parametrize("gz,dotted", [(True, False), (False, False), (False, True)])
def test_mnist_from_idx_folder(tmp_path, gz, dotted):
    arrays = write_idx_set(tmp_path / "m", gz=gz, dotted=dotted)
    ds = D.load_dataset("mnist", data_dir=str(tmp_path / "m"))
    assert ds.x_train.shape == (6, 5, 4, 1) and ds.input_shape == (5, 4, 1)
    raw = arrays["train-images-idx3-ubyte"].astype(np.float32)[..., None] / 255
    np.testing.assert_allclose(ds.x_train, (raw - 0.1307) / 0.3081, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(ds.y_test, arrays["t10k-labels-idx1-ubyte"])
    assert ds.y_train.dtype == np.int32


def test_fashion_mnist_normalisation_constants(tmp_path):
    arrays = write_idx_set(tmp_path / "fashion-mnist")
    ds = D.load_dataset("fashion_mnist", data_dir=str(tmp_path))  # finds data_dir/fashion-mnist
    raw = arrays["t10k-images-idx3-ubyte"].astype(np.float32)[..., None] / 255
    np.testing.assert_allclose(ds.x_test, (raw - 0.2860) / 0.3530, rtol=1e-6, atol=1e-6)


def test_search_order(tmp_path, monkeypatch):
    write_idx_set(tmp_path / "root" / "fashion-mnist", label_offset=1)
    write_idx_set(tmp_path / "specific", label_offset=2)
    write_idx_set(tmp_path / "arg", label_offset=3)

    def first_label(**kw):
        return int(D.load_dataset("fashion_mnist", **kw).y_train[0])

    monkeypatch.setenv("JBYZ_DATA_DIR", str(tmp_path / "root"))
    assert first_label() == 1
    monkeypatch.setenv("JBYZ_FASHION_MNIST_DIR", str(tmp_path / "specific"))
    assert first_label() == 2  # dataset-specific variable before JBYZ_DATA_DIR
    assert first_label(data_dir=str(tmp_path / "arg")) == 3  # the argument before both
    # a dataset-specific variable pointing at an empty folder falls through to JBYZ_DATA_DIR
    (tmp_path / "empty").mkdir()
    monkeypatch.setenv("JBYZ_FASHION_MNIST_DIR", str(tmp_path / "empty"))
    assert first_label() == 1
    # an explicit data_dir never falls back
    with pytest.raises(ConfigError):
        D.load_dataset("fashion_mnist", data_dir=str(tmp_path / "empty"))


def test_missing_files_name_the_paths(tmp_path, monkeypatch):
    monkeypatch.setitem(D.SYSTEM_DIRS, "mnist", (str(tmp_path / "sys-mnist"),))
    monkeypatch.setenv("JBYZ_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("JBYZ_MNIST_DIR", str(tmp_path / "mn"))
    with pytest.raises(ConfigError) as err:
        D.load_dataset("mnist")
    msg = str(err.value)
    for p in (tmp_path / "mn", tmp_path / "data" / "mnist", tmp_path / "sys-mnist"):
        assert str(p) in msg
    assert "JBYZ_MNIST_DIR" in msg
    # a partial set of files is not enough
    write_idx_set(tmp_path / "partial")
    (tmp_path / "partial" / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(ConfigError, match="partial"):
        D.load_dataset("mnist", data_dir=str(tmp_path / "partial"))
    with pytest.raises(ConfigError, match="dataset-fashion-mnist"):
        D.load_dataset("fashion_mnist", data_dir=str(tmp_path / "nowhere"))


# --------------------------------------------------------------------------------- CIFAR
@pytest.mark.parametrize("as_tar", [False, True])
def test_cifar10_folder_and_tar(tmp_path, as_tar, monkeypatch):
    batches = write_cifar10(tmp_path, as_tar)
    monkeypatch.setenv("JBYZ_DATA_DIR", str(tmp_path))
    ds = D.load_dataset("cifar10")
    assert ds.x_train.shape == (15, 32, 32, 3) and ds.x_test.shape == (2, 32, 32, 3)
    assert ds.input_shape == (32, 32, 3) and ds.num_classes == 10
    np.testing.assert_array_equal(
        ds.y_train, np.concatenate([batches[f"data_batch_{i}"][b"labels"] for i in range(1, 6)])
    )
    # CHW rows -> HWC images, per-channel normalisation
    flat = batches["test_batch"][b"data"][1]
    r, c, ch = 2, 7, 1
    raw = flat[ch * 1024 + r * 32 + c] / 255.0
    assert ds.x_test[1, r, c, ch] == pytest.approx((raw - 0.4822) / 0.1994, rel=1e-5)
    direct = D.load_dataset("cifar10", data_dir=str(tmp_path), normalize=False)
    assert direct.x_test[1, r, c, ch] == pytest.approx(raw, rel=1e-6)


def test_cifar100_labels(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    for name, n in (("train", 4), ("test", 3)):
        with open(folder / name, "wb") as fh:
            pickle.dump(cifar_batch(n, n, [b"fine_labels", b"coarse_labels"]), fh)
    fine = D.load_dataset("cifar100", data_dir=str(tmp_path))
    coarse = D.load_dataset("cifar100", data_dir=str(folder), label_mode="coarse")
    assert fine.num_classes == 100 and coarse.num_classes == 20
    assert fine.x_train.shape == (4, 32, 32, 3)
    with pytest.raises(ConfigError, match="label_mode"):
        D.load_dataset("cifar100", data_dir=str(tmp_path), label_mode="medium")


def test_cifar_missing(tmp_path):
    with pytest.raises(ConfigError, match="cifar-10-python.tar.gz"):
        D.load_dataset("cifar10", data_dir=str(tmp_path))


# --------------------------------------------------------------------------------- tfds
@pytest.mark.skipif(importlib.util.find_spec("tensorflow_datasets") is not None,
                    reason="tensorflow-datasets is installed")
def test_tfds_absent_gives_config_error():
    with pytest.raises(ConfigError, match=r"jbyz\[tfds\]"):
        D.load_dataset("tfds", tfds_name="mnist")


@pytest.mark.skipif(not (DEBIAN_FMNIST / "train-images-idx3-ubyte.gz").is_file(),
                    reason="Debian package dataset-fashion-mnist not installed")
def test_fashion_mnist_from_debian_path():
    ds = D.load_dataset("fashion_mnist")
    assert (len(ds.y_train), len(ds.y_test)) == (60000, 10000)
    assert ds.x_train.shape == (60000, 28, 28, 1) and ds.input_shape == (28, 28, 1)
    assert np.bincount(ds.y_train).tolist() == [6000] * 10
    # the documented constants are the training set's pixel mean / std
    assert abs(float(ds.x_train.mean())) < 1e-3 and abs(float(ds.x_train.std()) - 1) < 1e-3


# --------------------------------------------------------------------------------- synthetic
def test_synthetic_datasets():
    c = D.load_dataset("synthetic_classification", n_samples=500, n_test=100, dim=7, classes=4,
                       seed=1)
    assert c.x_train.shape == (500, 7) and c.input_shape == (7,) and c.num_classes == 4
    assert set(np.unique(c.y_train)) == {0, 1, 2, 3}
    c2 = D.load_dataset("synthetic_classification", n_samples=500, n_test=100, dim=7, classes=4,
                        seed=1)
    np.testing.assert_array_equal(c.x_train, c2.x_train)
    r = D.load_dataset("synthetic_regression", n_samples=400, n_test=50, dim=5, noise=0.01)
    assert r.task == "regression" and r.num_classes == 0 and r.y_train.dtype == np.float32
    a = np.c_[r.x_train, np.ones(len(r.x_train))]
    coef, *_ = np.linalg.lstsq(a, r.y_train, rcond=None)
    resid = r.y_test - np.c_[r.x_test, np.ones(len(r.x_test))] @ coef
    assert float(np.sqrt(np.mean(resid**2))) < 0.02


# --------------------------------------------------------------------------------- splits
def _labels(n=600, classes=10, seed=0):
    return np.random.default_rng(seed).integers(0, classes, n).astype(np.int32)


def _check_partition(split, n):
    assert split.indices.dtype == np.int32 and split.sizes.dtype == np.int32
    assert split.indices.shape == (split.n_workers, split.sizes.max())
    assert split.sizes.min() >= 1
    allidx = np.concatenate([split.worker(i) for i in range(split.n_workers)])
    np.testing.assert_array_equal(np.sort(allidx), np.arange(n))  # each sample exactly once
    for i in range(split.n_workers):  # padding repeats valid entries
        assert set(split.indices[i]) <= set(split.worker(i))


def test_iid_and_shared_splits():
    y = _labels(103)
    s = D.split_workers(y, 10, "iid", seed=3)
    _check_partition(s, 103)
    assert s.sizes.max() - s.sizes.min() <= 1
    assert not np.array_equal(s.indices, D.split_workers(y, 10, "iid", seed=4).indices)
    sh = D.split_workers(y, 4, "shared")
    assert sh.indices.shape == (4, 103) and (sh.sizes == 103).all()
    np.testing.assert_array_equal(sh.indices[2], np.arange(103))


def test_dirichlet_split_heterogeneity_depends_on_alpha():
    y = _labels(2000)

    def mean_max_share(alpha):
        s = D.split_workers(y, 10, "dirichlet", alpha=alpha, seed=0)
        _check_partition(s, len(y))
        shares = [np.bincount(y[s.worker(i)], minlength=10).max() / s.sizes[i]
                  for i in range(10)]
        return float(np.mean(shares))

    low, mid, high = mean_max_share(0.05), mean_max_share(1.0), mean_max_share(1000.0)
    assert low > 0.6 > mid > high and high < 0.2
    # extreme skew with many workers still gives everyone a sample
    s = D.split_workers(_labels(60), 40, "dirichlet", alpha=0.01, seed=1)
    _check_partition(s, 60)


def test_extreme_split_is_label_sorted():
    y = _labels(300)
    s = D.split_workers(y, 7, "extreme")
    _check_partition(s, 300)
    concat = np.concatenate([y[s.worker(i)] for i in range(7)])
    assert np.all(np.diff(concat) >= 0)
    # balanced labels, one shard per class: each worker holds exactly one class
    yb = np.random.default_rng(0).permutation(np.repeat(np.arange(10), 30))
    sb = D.split_workers(yb, 10, "extreme")
    assert all(len(np.unique(yb[sb.worker(i)])) == 1 for i in range(10))


def test_split_errors():
    y = _labels(20)
    with pytest.raises(ConfigError, match="dirichlet"):
        D.split_workers(y, 3, "drichlet")
    with pytest.raises(ConfigError, match="alpha"):
        D.split_workers(y, 3, "dirichlet", alpha=0.0)
    with pytest.raises(ConfigError):
        D.split_workers(y, 0)
    with pytest.raises(ConfigError, match="21 workers"):
        D.split_workers(y, 21, "iid")
    with pytest.raises(ConfigError, match="integer"):
        D.split_workers(np.linspace(0, 1, 20), 3, "dirichlet")


# --------------------------------------------------------------------------------- sampling
def test_sample_indices_within_rows_and_uniform():
    y = _labels(57)
    s = D.split_workers(y, 5, "dirichlet", alpha=0.5, seed=2)
    keys = jax.random.split(jax.random.key(0), 5)
    draw = jax.jit(jax.vmap(D.sample_indices, in_axes=(0, 0, 0, None)), static_argnums=3)
    idx = np.asarray(draw(keys, jnp.asarray(s.indices), jnp.asarray(s.sizes), 64))
    assert idx.shape == (5, 64)
    for i in range(5):
        assert set(idx[i]) <= set(s.worker(i))
    # uniform over a 10-entry row (padded to 16): chi-square with 9 dof, loose bound
    row = np.r_[np.arange(100, 110), np.arange(100, 106)].astype(np.int32)
    n = 20_000
    got = np.asarray(D.sample_indices(jax.random.key(7), row, 10, n))
    counts = np.bincount(got - 100, minlength=10)
    assert counts.sum() == n and len(counts) == 10
    chi2 = float(((counts - n / 10) ** 2 / (n / 10)).sum())
    assert chi2 < 40.0  # P(chi2_9 > 40) ~ 7e-6
    # a size-1 worker always returns its only sample
    np.testing.assert_array_equal(D.sample_indices(jax.random.key(1), row, 1, 8), 100)


def test_flip_labels():
    np.testing.assert_array_equal(D.flip_labels(np.array([0, 3, 9], np.int32), 10), [9, 6, 0])
    out = jax.jit(D.flip_labels, static_argnums=1)(jnp.array([0, 1, 2]), 3)
    np.testing.assert_array_equal(out, [2, 1, 0])
    assert D.flip_labels(np.array([1], np.int32), 10).dtype == np.int32


def test_augment_images_flip_and_crop():
    import jax

    from jbyz.data import augment_images

    x = np.arange(64 * 6 * 5 * 2, dtype=np.float32).reshape(64, 6, 5, 2)
    out = np.asarray(augment_images(jax.random.key(0), x, "flip"))
    same = np.all(out == x, axis=(1, 2, 3))
    mirrored = np.all(out == x[:, :, ::-1, :], axis=(1, 2, 3))
    assert np.all(same | mirrored)
    assert 16 < mirrored.sum() < 48  # p = 1/2 per image
    np.testing.assert_array_equal(np.asarray(augment_images(jax.random.key(0), x, "none")), x)
    # crop_flip: every image is a window of its zero-padded (possibly mirrored) original
    out = np.asarray(augment_images(jax.random.key(1), x, "crop_flip", pad=2))
    assert out.shape == x.shape
    offsets = set()
    for i in range(64):
        found = False
        for src in (x[i], x[i, :, ::-1]):
            xp = np.pad(src, ((2, 2), (2, 2), (0, 0)))
            for a in range(5):
                for b in range(5):
                    if np.array_equal(xp[a:a + 6, b:b + 5], out[i]):
                        found = True
                        offsets.add((a, b))
        assert found
    assert len(offsets) > 5  # random offsets, not one fixed window
    # leading axes (workers) are kept
    xw = x.reshape(4, 16, 6, 5, 2)
    assert augment_images(jax.random.key(2), xw, "crop_flip").shape == xw.shape


def test_stand_in_has_the_real_datasets_shapes_and_says_what_it_knows():
    from jbyz import data
    from jbyz.registry import ConfigError

    ds = data.stand_in("cifar100", seed=3)
    assert ds.x_train.shape == (50_000, 32, 32, 3) and ds.x_train.dtype == np.float32
    assert ds.x_test.shape == (10_000, 32, 32, 3) and ds.num_classes == 100
    assert ds.y_train.max() < 100 and ds.y_train.min() >= 0
    assert np.array_equal(ds.y_test, data.stand_in("cifar100", seed=3).y_test)  # seeded
    with pytest.raises(ConfigError, match=r"no stand-in for dataset 'digits'; one of \['cifar10'"):
        data.stand_in("digits")
