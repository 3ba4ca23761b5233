"""Datasets, worker splits, on-device batch sampling and label flipping.

Datasets load into a frozen :class:`Dataset` of numpy arrays (float32 inputs, normalised; images
NHWC). The simulator moves them to the device once and samples each worker's batch inside the
jitted step with :func:`sample_indices`, using the padded per-worker index table of
:func:`split_workers`; no Python data loader runs in the loop.

Registered datasets (``DATASETS``):

* ``digits``: scikit-learn's bundled 8x8 handwritten digits (1797 images, no download; the
  bundled CSV is read directly); deterministic stratified 1437 / 360 train / test split
  (``seed=0``), pixels scaled to [0, 1] and then standardised with the training split's scalar
  mean and std. Shape (8, 8, 1).
* ``mnist`` (LeCun et al. 1998) and ``fashion_mnist`` (Xiao et al. 2017): the standard IDX files
  (``train-images-idx3-ubyte.gz``, ``train-labels-idx1-ubyte.gz``, ``t10k-images-idx3-ubyte.gz``,
  ``t10k-labels-idx1-ubyte.gz``; uncompressed files and the ``train-images.idx3-ubyte`` spelling
  are accepted too). Pixels / 255, then ``(x - mean) / std`` with MNIST (0.1307, 0.3081) as in
  El-Mhamdi et al. (2021) and Fashion-MNIST (0.2860, 0.3530), the training set's pixel mean and std
  (computed from the 60,000 training images: 0.28604, 0.35302). Shape (28, 28, 1).
  ``normalize=False`` keeps the pixels in [0, 1] (El-Mhamdi et al.'s code does not normalise
  Fashion-MNIST).
* ``cifar10`` / ``cifar100`` (Krizhevsky 2009): the python-pickle archives (``cifar-10-batches-py``
  / ``cifar-100-python`` folders or the ``cifar-10-python.tar.gz`` / ``cifar-100-python.tar.gz``
  files, read without extracting). Per-channel normalisation of El-Mhamdi et al. (2021): means
  (0.4914, 0.4822, 0.4465), stds (0.2023, 0.1994, 0.2010), used for both (as in that code).
  Shape (32, 32, 3). ``cifar100`` takes ``label_mode="fine"`` (100 classes) or ``"coarse"`` (20).
* ``tfds``: any tensorflow-datasets image classification set (``tfds_name="mnist"``), when the
  optional extra is installed (``pip install 'jbyz[tfds]'``); pixels / 255, standardised per
  channel with the training split's statistics.
* ``synthetic_classification``: a Gaussian mixture; ``synthetic_regression``: a noisy linear model.

Where files are looked for (first folder holding all four / all needed files wins):

1. the ``data_dir`` argument, if given: ``data_dir`` itself and ``data_dir/<folder>`` (only these:
   an explicit folder is never silently replaced by another);
2. the dataset's own variable: ``JBYZ_MNIST_DIR``, ``JBYZ_FASHION_MNIST_DIR``,
   ``JBYZ_CIFAR10_DIR``, ``JBYZ_CIFAR100_DIR`` (the folder holding the files, or its parent);
3. ``$JBYZ_DATA_DIR/<folder>`` with ``<folder>`` = ``mnist``, ``fashion-mnist``,
   ``cifar-10-batches-py`` (or the ``.tar.gz`` there), ``cifar-100-python``;
4. system locations: ``/usr/share/datasets/fashion-mnist`` (Debian ``dataset-fashion-mnist``)
   and ``/usr/share/datasets/mnist``.

A missing dataset raises :class:`~jbyz.registry.ConfigError` listing every path searched.

References:
  LeCun, Bottou, Bengio & Haffner (1998), Gradient-based learning applied to document recognition.
  Xiao, Rasul & Vollgraf (2017), Fashion-MNIST: a novel image dataset for benchmarking machine
  learning algorithms. arXiv:1708.07747.
  Krizhevsky (2009), Learning multiple layers of features from tiny images.
  Hsu, Qi & Brown (2019), Measuring the effects of non-identical data distribution for federated
  visual classification. arXiv:1909.06335.
  McMahan, Moore, Ramage, Hampson & Agüera y Arcas (2017), Communication-efficient learning of
  deep networks from decentralized data (AISTATS): the pathological ``shards`` split.
  González, Guerraoui, Pinot, Rizk, Stephan & Taïani (2025), ByzFL: research framework for
  robust federated learning. arXiv:2505.24802: the ``gamma_similarity`` split.
  Li, Ngai, Ye, Ju, Zhang & Voigt (2024), Blades: a unified benchmark suite for Byzantine attacks
  and defenses in federated learning: its ``ShardPartitioner`` (in fedlib).
  El-Mhamdi, Guerraoui & Rouault (2021), Distributed momentum for Byzantine-resilient SGD (ICLR).
"""

from __future__ import annotations

import dataclasses
import gzip
import io
import os
import pickle
import struct
import tarfile
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jbyz.config import CHOICES
from jbyz.registry import ConfigError, Registry

DATASETS = Registry("dataset")

__all__ = [
    "DATASETS",
    "Dataset",
    "WorkerSplit",
    "load_dataset",
    "split_workers",
    "split_training_set",
    "hold_out",
    "sample_indices",
    "flip_labels",
    "read_idx",
    "MNIST_MEAN_STD",
    "FASHION_MNIST_MEAN_STD",
    "CIFAR_MEAN",
    "CIFAR_STD",
]

MNIST_MEAN_STD = (0.1307, 0.3081)
FASHION_MNIST_MEAN_STD = (0.2860, 0.3530)
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2023, 0.1994, 0.2010)

SYSTEM_DIRS = {
    "fashion-mnist": ("/usr/share/datasets/fashion-mnist",),
    "mnist": ("/usr/share/datasets/mnist",),
}


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
    """An in-memory dataset.

    Attributes:
      name: registry name.
      x_train: float32 ``[N, *input_shape]``, normalised; images NHWC.
      y_train: int32 ``[N]`` class labels (classification) or float32 ``[N]`` targets (regression).
      x_test: float32 ``[N_test, *input_shape]``.
      y_test: like ``y_train``.
      num_classes: number of classes; 0 for regression.
      input_shape: shape of one input.
      task: ``"classification"`` or ``"regression"``.
    """

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    input_shape: tuple[int, ...]
    task: str

    def __repr__(self) -> str:
        return (
            f"Dataset({self.name!r}, train={len(self.y_train)}, test={len(self.y_test)}, "
            f"input_shape={self.input_shape}, num_classes={self.num_classes}, task={self.task!r})"
        )


# --------------------------------------------------------------------------------------------
# file readers
# --------------------------------------------------------------------------------------------

_IDX_DTYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Reads an IDX file (gzip-compressed if the name ends in ``.gz``).

    Format (LeCun et al.): two zero bytes, a type byte (0x08 ubyte, 0x09 byte, 0x0B int16, 0x0C
    int32, 0x0D float32, 0x0E float64), the number of dimensions, then each dimension as a
    big-endian uint32, then the data in C order, big-endian.

    Args:
      path: the file.

    Returns:
      The array, in native byte order.

    Raises:
      ConfigError: not an IDX file, or truncated.
    """
    path = Path(path)
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rb") as fh:
        raw = fh.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ConfigError(f"{path} is not an IDX file (bad magic number {raw[:4]!r})")
    dtype, ndim = _IDX_DTYPES[raw[2]], raw[3]
    header = 4 + 4 * ndim
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    count = int(np.prod(shape)) if ndim else 1
    if len(raw) < header + count * dtype.itemsize:
        raise ConfigError(f"{path} is truncated: header says shape {shape}")
    arr = np.frombuffer(raw, dtype=dtype, count=count, offset=header).reshape(shape)
    return arr.astype(dtype.newbyteorder("="), copy=False)


_IDX_FILES = {
    "x_train": "train-images-idx3-ubyte",
    "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte",
    "y_test": "t10k-labels-idx1-ubyte",
}


def _idx_file(folder: Path, stem: str) -> Path | None:
    alt = stem.replace("-idx", ".idx")  # e.g. train-images.idx3-ubyte
    for name in (stem + ".gz", stem, alt + ".gz", alt):
        if (folder / name).is_file():
            return folder / name
    return None


def _has_idx(folder: Path) -> bool:
    return all(_idx_file(folder, stem) is not None for stem in _IDX_FILES.values())


def _candidates(
    folder_name: str, env_var: str, data_dir: str | None, extra_names: tuple[str, ...] = ()
) -> list[Path]:
    """Folders (or archive files) to try, in the documented search order."""
    names = (folder_name, *extra_names)
    if data_dir is not None:
        base = Path(data_dir).expanduser()
        return [base, *(base / n for n in names)]
    out: list[Path] = []
    if os.environ.get(env_var):
        base = Path(os.environ[env_var]).expanduser()
        out += [base, *(base / n for n in names)]
    if os.environ.get("JBYZ_DATA_DIR"):
        base = Path(os.environ["JBYZ_DATA_DIR"]).expanduser()
        out += [base / n for n in names]
    out += [Path(p) for p in SYSTEM_DIRS.get(folder_name, ())]
    return out


def _missing(name: str, searched: list[Path], how: str) -> ConfigError:
    paths = "\n  ".join(str(p) for p in searched) or "(none)"
    return ConfigError(f"dataset {name!r}: files not found. Searched:\n  {paths}\n{how}")


def _load_idx_dataset(
    name: str, folder_name: str, env_var: str, mean_std, data_dir, how: str,
    normalize: bool = True,
) -> Dataset:
    searched = _candidates(folder_name, env_var, data_dir)
    folder = next((p for p in searched if p.is_dir() and _has_idx(p)), None)
    if folder is None:
        raise _missing(name, searched, how)
    arrays = {k: read_idx(_idx_file(folder, stem)) for k, stem in _IDX_FILES.items()}
    mean, std = mean_std

    def images(a):
        if a.ndim != 3:
            raise ConfigError(f"{folder}: expected [N, H, W] images, got shape {a.shape}")
        x = a.astype(np.float32)[..., None] / 255.0
        return (x - np.float32(mean)) / np.float32(std) if normalize else x

    for split in ("train", "test"):
        if len(arrays[f"x_{split}"]) != len(arrays[f"y_{split}"]):
            raise ConfigError(f"{folder}: {split} images and labels differ in length")
    x_train = images(arrays["x_train"])
    return Dataset(
        name=name,
        x_train=x_train,
        y_train=arrays["y_train"].astype(np.int32),
        x_test=images(arrays["x_test"]),
        y_test=arrays["y_test"].astype(np.int32),
        num_classes=10,
        input_shape=tuple(x_train.shape[1:]),
        task="classification",
    )


def _unpickle(fh) -> dict:
    return pickle.load(fh, encoding="bytes")


def _cifar_arrays(source: Path, members: dict[str, list[str]], label_key: bytes):
    """Reads CIFAR batches from a folder or a .tar.gz; returns {split: (x uint8 NCHW-flat, y)}."""
    out = {}
    if source.is_dir():
        for split, names in members.items():
            xs, ys = [], []
            for n in names:
                with open(source / n, "rb") as fh:
                    d = _unpickle(fh)
                xs.append(np.asarray(d[b"data"], np.uint8))
                ys.append(np.asarray(d[label_key]))
            out[split] = (np.concatenate(xs), np.concatenate(ys))
        return out
    with tarfile.open(source, "r:*") as tar:
        by_base = {}
        for m in tar.getmembers():
            if m.isfile():
                by_base[Path(m.name).name] = m
        for split, names in members.items():
            xs, ys = [], []
            for n in names:
                if n not in by_base:
                    raise ConfigError(f"{source}: archive has no member {n!r}")
                d = _unpickle(io.BytesIO(tar.extractfile(by_base[n]).read()))
                xs.append(np.asarray(d[b"data"], np.uint8))
                ys.append(np.asarray(d[label_key]))
            out[split] = (np.concatenate(xs), np.concatenate(ys))
    return out


def _load_cifar(
    name: str,
    folder_name: str,
    archive_name: str,
    env_var: str,
    members: dict[str, list[str]],
    label_key: bytes,
    num_classes: int,
    data_dir,
    normalize: bool,
) -> Dataset:
    searched = _candidates(folder_name, env_var, data_dir, extra_names=(archive_name,))
    needed = [n for names in members.values() for n in names]
    source = None
    for p in searched:
        if p.is_dir() and all((p / n).is_file() for n in needed):
            source = p
            break
        if p.is_file() and p.name.endswith((".tar.gz", ".tgz", ".tar")):
            source = p
            break
    if source is None:
        raise _missing(
            name,
            searched,
            f"Download {archive_name} from https://www.cs.toronto.edu/~kriz/cifar.html and put it "
            f"(or its extracted {folder_name}/ folder) in $JBYZ_DATA_DIR, or set {env_var}, or "
            "pass data_dir=.",
        )
    arrays = _cifar_arrays(source, members, label_key)

    def images(flat):
        x = flat.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1).astype(np.float32) / 255.0
        if normalize:
            x = (x - np.asarray(CIFAR_MEAN, np.float32)) / np.asarray(CIFAR_STD, np.float32)
        return x

    return Dataset(
        name=name,
        x_train=images(arrays["train"][0]),
        y_train=arrays["train"][1].astype(np.int32),
        x_test=images(arrays["test"][0]),
        y_test=arrays["test"][1].astype(np.int32),
        num_classes=num_classes,
        input_shape=(32, 32, 3),
        task="classification",
    )


# --------------------------------------------------------------------------------------------
# registry entries
# --------------------------------------------------------------------------------------------


@DATASETS.register(
    "digits",
    "scikit-learn's bundled 8x8 handwritten digits (offline); 1437/360 stratified split.",
    "Alpaydin & Kaynak 1998 (UCI optical digits)",
)
def digits(data_dir: str | None = None, test_size: int = 360, seed: int = 0) -> Dataset:
    x, y = _digits_arrays()
    if not 10 <= test_size <= len(y) - 10:
        raise ConfigError(f"digits test_size must be in [10, {len(y) - 10}], got {test_size}")
    test = _stratified_test_indices(y, test_size, seed)
    train = np.setdiff1d(np.arange(len(y)), test)
    x = (x.astype(np.float32) / 16.0).reshape(-1, 8, 8, 1)
    mean, std = x[train].mean(), x[train].std()
    x = ((x - mean) / std).astype(np.float32)
    return Dataset(
        "digits", x[train], y[train], x[test], y[test], 10, (8, 8, 1), "classification"
    )


def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """The 1797 x 64 pixel values (0..16) and labels, read from scikit-learn's bundled CSV
    without importing scikit-learn (which takes seconds); falls back to ``load_digits``."""
    import importlib.util

    spec = importlib.util.find_spec("sklearn")
    for loc in (spec.submodule_search_locations or []) if spec else []:
        path = Path(loc) / "datasets" / "data" / "digits.csv.gz"
        if path.is_file():
            a = np.loadtxt(path, delimiter=",", dtype=np.float32)
            return a[:, :64], a[:, 64].astype(np.int32)
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:  # pragma: no cover - scikit-learn is a dependency
        raise ConfigError("dataset 'digits' needs scikit-learn: pip install scikit-learn") from e
    d = load_digits()
    return d.data.astype(np.float32), d.target.astype(np.int32)


def _stratified_test_indices(y: np.ndarray, test_size: int, seed: int) -> np.ndarray:
    """``test_size`` indices with class proportions as in ``y`` (largest-remainder quotas)."""
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(y, return_counts=True)
    exact = counts * test_size / len(y)
    quota = np.floor(exact).astype(int)
    extra = test_size - quota.sum()
    quota[np.argsort(-(exact - quota), kind="stable")[:extra]] += 1
    picks = [rng.permutation(np.flatnonzero(y == c))[:q] for c, q in zip(classes, quota)]
    return np.sort(np.concatenate(picks))


@DATASETS.register(
    "mnist",
    "MNIST from the IDX files; normalised (0.1307, 0.3081), or pixels in [0, 1] with "
    "normalize=false.",
    "LeCun et al. 1998",
)
def mnist(data_dir: str | None = None, normalize: bool = True) -> Dataset:
    return _load_idx_dataset(
        "mnist",
        "mnist",
        "JBYZ_MNIST_DIR",
        MNIST_MEAN_STD,
        data_dir,
        "Put the four IDX files (train-images-idx3-ubyte.gz, ...; from "
        "http://yann.lecun.com/exdb/mnist/ or a mirror) in $JBYZ_DATA_DIR/mnist, or set "
        "JBYZ_MNIST_DIR, or pass data_dir=; or use load_dataset('tfds', tfds_name='mnist').",
        normalize=bool(normalize),
    )


@DATASETS.register(
    "fashion_mnist",
    "Fashion-MNIST from the IDX files (Debian: /usr/share/datasets/fashion-mnist); "
    "normalised (0.2860, 0.3530), or pixels in [0, 1] with normalize=false (as El Mhamdi et al.'s "
    "code).",
    "Xiao et al. 2017",
)
def fashion_mnist(data_dir: str | None = None, normalize: bool = True) -> Dataset:
    return _load_idx_dataset(
        "fashion_mnist",
        "fashion-mnist",
        "JBYZ_FASHION_MNIST_DIR",
        FASHION_MNIST_MEAN_STD,
        data_dir,
        "Install the Debian/Ubuntu package dataset-fashion-mnist (apt-get install "
        "dataset-fashion-mnist), or put the four IDX files from "
        "https://github.com/zalandoresearch/fashion-mnist in $JBYZ_DATA_DIR/fashion-mnist, or set "
        "JBYZ_FASHION_MNIST_DIR, or pass data_dir=.",
        normalize=bool(normalize),
    )


@DATASETS.register(
    "cifar10",
    "CIFAR-10 from the python pickle batches (folder or .tar.gz); per-channel normalisation.",
    "Krizhevsky 2009",
)
def cifar10(data_dir: str | None = None, normalize: bool = True) -> Dataset:
    return _load_cifar(
        "cifar10",
        "cifar-10-batches-py",
        "cifar-10-python.tar.gz",
        "JBYZ_CIFAR10_DIR",
        {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]},
        b"labels",
        10,
        data_dir,
        normalize,
    )


@DATASETS.register(
    "cifar100",
    "CIFAR-100 from the python pickle files (folder or .tar.gz); label_mode 'fine' or 'coarse'.",
    "Krizhevsky 2009",
)
def cifar100(
    data_dir: str | None = None, label_mode: str = "fine", normalize: bool = True
) -> Dataset:
    if label_mode not in ("fine", "coarse"):
        raise ConfigError(f"cifar100 label_mode must be 'fine' or 'coarse', got {label_mode!r}")
    return _load_cifar(
        "cifar100",
        "cifar-100-python",
        "cifar-100-python.tar.gz",
        "JBYZ_CIFAR100_DIR",
        {"train": ["train"], "test": ["test"]},
        b"fine_labels" if label_mode == "fine" else b"coarse_labels",
        100 if label_mode == "fine" else 20,
        data_dir,
        normalize,
    )


@DATASETS.register(
    "tfds",
    "Any tensorflow-datasets image classification set (tfds_name=...); needs jbyz[tfds].",
    "-",
)
def tfds(
    tfds_name: str = "mnist",
    data_dir: str | None = None,
    train_split: str = "train",
    test_split: str = "test",
) -> Dataset:
    try:
        import tensorflow_datasets as tfds_mod  # noqa: PLC0415 (optional, imported on use)
    except ImportError as e:
        raise ConfigError(
            "dataset 'tfds' needs tensorflow-datasets, which is not installed: "
            "pip install 'jbyz[tfds]'  (or use the offline datasets: "
            f"{', '.join(n for n in DATASETS.names() if n != 'tfds')})"
        ) from e
    splits = {}
    for split in (train_split, test_split):
        x, y = tfds_mod.as_numpy(
            tfds_mod.load(
                tfds_name, split=split, batch_size=-1, as_supervised=True, data_dir=data_dir
            )
        )
        splits[split] = (np.asarray(x), np.asarray(y))
    info = tfds_mod.builder(tfds_name, data_dir=data_dir).info
    num_classes = int(info.features["label"].num_classes)
    x_tr = splits[train_split][0].astype(np.float32) / 255.0
    axes = tuple(range(x_tr.ndim - 1))
    mean, std = x_tr.mean(axis=axes), x_tr.std(axis=axes) + 1e-8
    norm = lambda a: ((a.astype(np.float32) / 255.0 - mean) / std).astype(np.float32)  # noqa: E731
    return Dataset(
        f"tfds:{tfds_name}",
        norm(splits[train_split][0]),
        splits[train_split][1].astype(np.int32),
        norm(splits[test_split][0]),
        splits[test_split][1].astype(np.int32),
        num_classes,
        tuple(x_tr.shape[1:]),
        "classification",
    )


@DATASETS.register(
    "synthetic_classification",
    "Gaussian mixture: class means ~ N(0, separation^2 I / dim) "
    "(||mu_i - mu_j|| ~ 1.4 separation), unit-variance clusters.",
    "-",
)
def synthetic_classification(
    n_samples: int = 2048,
    n_test: int = 512,
    dim: int = 20,
    classes: int = 10,
    separation: float = 3.0,
    seed: int = 0,
    data_dir: str | None = None,
) -> Dataset:
    if n_samples < 1 or n_test < 1 or dim < 1 or classes < 2:
        raise ConfigError(
            "synthetic_classification needs n_samples >= 1, n_test >= 1, dim >= 1, classes >= 2"
        )
    rng = np.random.default_rng(seed)
    means = rng.normal(size=(classes, dim)) * (separation / np.sqrt(dim))

    def draw(n):
        y = rng.integers(0, classes, size=n)
        x = means[y] + rng.normal(size=(n, dim))
        return x.astype(np.float32), y.astype(np.int32)

    x_tr, y_tr = draw(n_samples)
    x_te, y_te = draw(n_test)
    return Dataset(
        "synthetic_classification", x_tr, y_tr, x_te, y_te, int(classes), (int(dim),),
        "classification",
    )


@DATASETS.register(
    "synthetic_regression",
    "Linear regression y = <w*, x> + b* + noise, x ~ N(0, I), w* ~ N(0, I / dim).",
    "-",
)
def synthetic_regression(
    n_samples: int = 2048,
    n_test: int = 512,
    dim: int = 20,
    noise: float = 0.1,
    seed: int = 0,
    data_dir: str | None = None,
) -> Dataset:
    if n_samples < 1 or n_test < 1 or dim < 1 or noise < 0:
        raise ConfigError("synthetic_regression needs n_samples, n_test, dim >= 1 and noise >= 0")
    rng = np.random.default_rng(seed)
    w = rng.normal(size=dim) / np.sqrt(dim)
    b = rng.normal()

    def draw(n):
        x = rng.normal(size=(n, dim))
        y = x @ w + b + noise * rng.normal(size=n)
        return x.astype(np.float32), y.astype(np.float32)

    x_tr, y_tr = draw(n_samples)
    x_te, y_te = draw(n_test)
    return Dataset("synthetic_regression", x_tr, y_tr, x_te, y_te, 0, (int(dim),), "regression")


# Shapes of the file-backed datasets: (training size, test size, image shape, classes).
SHAPES = {"mnist": (60_000, 10_000, (28, 28, 1), 10), "fashion_mnist": (60_000, 10_000, (28, 28, 1), 10),
          "cifar10": (50_000, 10_000, (32, 32, 3), 10), "cifar100": (50_000, 10_000, (32, 32, 3), 100)}


def stand_in(name: str, seed: int = 0) -> Dataset:
    """Random data of a file-backed dataset's exact shapes and sizes (standard normal pixels,
    uniform labels), for measuring speed, memory or FLOPs where the files are absent: a step
    costs the same on it, and no accuracy on it means anything.

    Args:
      name: one of ``SHAPES`` (``mnist``, ``fashion_mnist``, ``cifar10``, ``cifar100``).
      seed: numpy seed of the random values.

    Example::

      >>> ds = stand_in("mnist")
      >>> ds.x_train.shape, ds.x_test.shape, ds.num_classes
      ((60000, 28, 28, 1), (10000, 28, 28, 1), 10)
    """
    if name not in SHAPES:
        raise ConfigError(f"no stand-in for dataset {name!r}; one of {sorted(SHAPES)}")
    n_tr, n_te, shape, classes = SHAPES[name]
    rng = np.random.default_rng(seed)
    return Dataset(name, rng.standard_normal((n_tr, *shape), np.float32),
                   rng.integers(0, classes, n_tr).astype(np.int32),
                   rng.standard_normal((n_te, *shape), np.float32),
                   rng.integers(0, classes, n_te).astype(np.int32), classes, shape, "classification")


def _subsample(n: int, limit: int | None, seed: int) -> np.ndarray | None:
    if limit is None or limit >= n:
        return None
    if int(limit) < 1:
        raise ConfigError(f"limit_train / limit_test must be >= 1, got {limit}")
    rng = np.random.default_rng(seed)
    return np.sort(rng.permutation(n)[: int(limit)])


def load_dataset(
    name: str,
    data_dir: str | None = None,
    *,
    limit_train: int | None = None,
    limit_test: int | None = None,
    **kwargs: Any,
) -> Dataset:
    """Loads a registered dataset.

    Args:
      name: a name in ``DATASETS`` (``digits``, ``mnist``, ``fashion_mnist``, ``cifar10``,
        ``cifar100``, ``tfds``, ``synthetic_classification``, ``synthetic_regression``).
      data_dir: folder to read the files from (overrides the environment variables and system
        folders; see the module docstring for the search order).
      limit_train: keep this many training samples (a fixed random subset, original order kept).
      limit_test: likewise for the test set.
      **kwargs: the dataset's own options (e.g. ``tfds_name=``, ``label_mode=``, ``seed=``).

    Returns:
      A :class:`Dataset`.

    Raises:
      ConfigError: unknown dataset or option, missing files (the message lists the paths
        searched and how to provide them), optional dependency missing.
    """
    ds = DATASETS.build(name, data_dir=data_dir, **kwargs)
    changes = {}
    idx = _subsample(len(ds.y_train), limit_train, seed=0)
    if idx is not None:
        changes.update(x_train=ds.x_train[idx], y_train=ds.y_train[idx])
    idx = _subsample(len(ds.y_test), limit_test, seed=1)
    if idx is not None:
        changes.update(x_test=ds.x_test[idx], y_test=ds.y_test[idx])
    return dataclasses.replace(ds, **changes) if changes else ds


# --------------------------------------------------------------------------------------------
# worker splits and sampling
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class WorkerSplit:
    """Which training samples each worker holds, as a padded index table.

    Attributes:
      indices: int32 ``[n_workers, m_max]``: row ``i``'s first ``sizes[i]`` entries are worker
        ``i``'s dataset indices; the rest is padding (copies of valid entries, never sampled).
      sizes: int32 ``[n_workers]``, each >= 1.
    """

    indices: np.ndarray
    sizes: np.ndarray

    @property
    def n_workers(self) -> int:
        return int(self.sizes.shape[0])

    def worker(self, i: int) -> np.ndarray:
        """Dataset indices of worker ``i`` (without padding)."""
        return self.indices[i, : self.sizes[i]]


def _pack(shards: list[np.ndarray]) -> WorkerSplit:
    sizes = np.array([len(s) for s in shards], dtype=np.int32)
    m = int(sizes.max())
    table = np.stack([np.resize(np.asarray(s, np.int32), m) for s in shards]).astype(np.int32)
    return WorkerSplit(indices=table, sizes=sizes)


def _dirichlet_shards(y: np.ndarray, n: int, alpha: float, rng) -> list[np.ndarray]:
    classes = np.unique(y)
    shards: list[list[np.ndarray]] = [[] for _ in range(n)]
    for c in classes:
        idx = rng.permutation(np.flatnonzero(y == c))
        p = rng.dirichlet(np.full(n, alpha))
        cuts = (np.cumsum(p)[:-1] * len(idx)).round().astype(int)
        for w, part in enumerate(np.split(idx, cuts)):
            shards[w].append(part)
    return [np.sort(np.concatenate(s)) for s in shards]


def split_workers(
    y, n_workers: int, kind: str = "iid", *, alpha: float = 1.0, gamma: float = 0.5,
    shards_per_worker: int = 2, seed: int = 0
) -> WorkerSplit:
    r"""Assigns training samples to workers.

    Kinds:

    * ``"shared"``: every worker samples the whole training set (El-Mhamdi et al. 2021).
    * ``"iid"``: a random permutation cut into ``n_workers`` shards whose sizes differ by at most 1.
    * ``"dirichlet"``: for each class, the fractions of its samples given to the workers are drawn
      from ``Dir(alpha * 1_n)`` (Hsu et al. 2019): small ``alpha`` -> each worker sees few classes,
      large ``alpha`` -> close to iid. Every sample is assigned exactly once; a draw that leaves a
      worker empty is redrawn (up to 100 times), after which samples are moved to empty workers from
      the largest ones.
    * ``"extreme"``: samples sorted by label (stable), cut into contiguous shards: each worker sees
      one or two classes.
    * ``"gamma_similarity"``: ByzFL's ``gamma_similarity_niid`` (``DataDistributor``, LPD-EPFL/byzfl
      at 69bd1ac): a random :math:`\lfloor \gamma N \rfloor` of the samples (the first ones of a
      random permutation, as ByzFL's benchmark, whose training set is a shuffled ``random_split``)
      are dealt as ``"iid"``, the other :math:`N - \lfloor \gamma N \rfloor` as ``"extreme"``
      (sorted by label, then by index; contiguous shards); worker ``i`` gets its iid shard and
      its label-sorted shard. ``gamma = 1`` is exactly ``"iid"`` (same seed), ``gamma = 0`` holds
      the same samples per worker as ``"extreme"``.
    * ``"shards"``: the pathological non-iid split of McMahan et al. (2017), as Blades'
      ``ShardPartitioner`` (fedlib at 3f95f0a): samples sorted by label (stable) are cut into
      ``shards_per_worker * n_workers`` contiguous shards whose sizes differ by at most 1 (the
      first ``N mod (k n)`` one longer), the shards are shuffled and worker ``i`` gets shards
      ``k i .. k i + k - 1`` of that order: exactly ``k = shards_per_worker`` shards each, so at
      most ``k`` classes when the shards do not straddle a class boundary (up to ``2k``
      otherwise). fedlib instead gives each shuffled shard to the worker holding the fewest
      samples so far: the same shards, also ``k`` per worker when every shard holds at least
      ``k`` samples, another (equally random) pairing.

    Args:
      y: ``[N]`` labels (any array-like; regression targets are allowed for every kind except
        ``dirichlet``: they are sorted by value).
      n_workers: number of workers, ``1 <= n_workers <= N`` (except ``shared``).
      kind: one of ``jbyz.config.CHOICES["split"]``: ``"shared"``, ``"iid"``, ``"dirichlet"``,
        ``"extreme"``, ``"gamma_similarity"``, ``"shards"``.
      alpha: Dirichlet concentration (> 0).
      gamma: the iid fraction of ``gamma_similarity``, in ``[0, 1]``.
      shards_per_worker: ``k`` of ``shards`` (an integer >= 1; ``k * n_workers <= N``).
      seed: numpy seed of the split.

    Returns:
      A :class:`WorkerSplit` with an int32 ``[n_workers, m_max]`` index table.

    Raises:
      ConfigError: unknown kind, ``n_workers`` out of range, ``alpha <= 0``, ``gamma`` outside
        ``[0, 1]``, ``shards_per_worker`` < 1 or more shards than samples, a worker left without
        samples by ``gamma_similarity`` (``N < 2 n_workers``), or non-integer labels for
        ``dirichlet``.
    """
    y = np.asarray(y)
    if y.ndim != 1:
        raise ConfigError(f"split_workers needs labels of shape [N], got {y.shape}")
    n_samples = len(y)
    kinds = CHOICES["split"]  # the one list of split kinds (RunConfig.split)
    if kind not in kinds:
        raise ConfigError(f"unknown split kind {kind!r}; valid: {', '.join(kinds)}")
    if int(n_workers) != n_workers or n_workers < 1:
        raise ConfigError(f"n_workers must be a positive integer, got {n_workers!r}")
    n_workers = int(n_workers)
    if n_samples < 1:
        raise ConfigError("split_workers needs at least one sample")
    if kind == "shared":
        row = np.arange(n_samples, dtype=np.int32)
        return WorkerSplit(
            indices=np.broadcast_to(row, (n_workers, n_samples)).copy(),
            sizes=np.full(n_workers, n_samples, np.int32),
        )
    if n_workers > n_samples:
        raise ConfigError(
            f"cannot split {n_samples} samples over {n_workers} workers with >= 1 sample each"
        )
    rng = np.random.default_rng(seed)
    if kind == "iid":
        return _pack([np.sort(s) for s in np.array_split(rng.permutation(n_samples), n_workers)])
    if kind == "extreme":
        order = np.argsort(y, kind="stable")
        return _pack(list(np.array_split(order, n_workers)))
    if kind == "gamma_similarity":
        if isinstance(gamma, bool) or not 0.0 <= gamma <= 1.0:
            raise ConfigError(f"gamma_similarity split needs 0 <= gamma <= 1, got {gamma!r}")
        perm = rng.permutation(n_samples)
        n_iid = int(n_samples * gamma)  # ByzFL: int(len(idx) * gamma)
        rest = np.sort(perm[n_iid:])
        rest = rest[np.argsort(y[rest], kind="stable")]  # by label, then by index
        parts = [np.sort(np.concatenate([a, b])) for a, b in zip(
            np.array_split(perm[:n_iid], n_workers), np.array_split(rest, n_workers))]
        empty = [i for i, s in enumerate(parts) if len(s) == 0]
        if empty:
            raise ConfigError(
                f"gamma_similarity split of {n_samples} samples over {n_workers} workers (gamma="
                f"{gamma}) leaves worker(s) {empty} without samples; use n_workers <= "
                f"{n_samples // 2} or gamma in {{0, 1}}")
        return _pack(parts)
    if kind == "shards":
        k = shards_per_worker
        if isinstance(k, bool) or int(k) != k or k < 1:
            raise ConfigError(f"shards split needs shards_per_worker >= 1 (an integer), got {k!r}")
        n_shards = int(k) * n_workers
        if n_shards > n_samples:
            raise ConfigError(
                f"shards split: {int(k)} shards per worker x {n_workers} workers = {n_shards} "
                f"shards, more than the {n_samples} samples; use shards_per_worker <= "
                f"{n_samples // n_workers}")
        shards = np.array_split(np.argsort(y, kind="stable"), n_shards)
        order = rng.permutation(n_shards)
        return _pack([np.sort(np.concatenate([shards[j] for j in order[i * k:(i + 1) * k]]))
                      for i in range(n_workers)])
    # dirichlet
    if not alpha > 0:
        raise ConfigError(f"dirichlet split needs alpha > 0, got {alpha!r}")
    if not np.issubdtype(y.dtype, np.integer):
        if np.all(np.mod(y, 1) == 0):
            y = y.astype(np.int64)
        else:
            raise ConfigError("dirichlet split needs integer class labels (not regression targets)")
    for _ in range(100):
        shards = _dirichlet_shards(y, n_workers, float(alpha), rng)
        if min(len(s) for s in shards) >= 1:
            return _pack(shards)
    # Fallback for tiny alpha / many workers: move one sample at a time from the largest shard.
    shards = [list(s) for s in shards]
    for w in range(n_workers):
        if not shards[w]:
            donor = max(range(n_workers), key=lambda i: len(shards[i]))
            shards[w].append(shards[donor].pop())
    return _pack([np.sort(np.asarray(s, np.int64)) for s in shards])


# Salt of the validation hold-out's numpy stream (a stream apart from the split's own draws).
_SALT_HOLD_OUT = 0x7A11D


def hold_out(n: int, size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A uniform random subset of ``size`` of ``range(n)`` and the rest, both sorted (int64).

    The draw is its own numpy stream, keyed by ``seed`` (a run's split seed), so the samples
    held out do not depend on the split drawn from the rest.

    Raises:
      ConfigError: ``size`` not an integer in ``[0, n)`` (at least one sample must remain).
    """
    if isinstance(size, bool) or int(size) != size or not 0 <= size < n:
        raise ConfigError(
            f"validation_size={size!r} must be an integer >= 0 and below the {n} training samples "
            "it is taken from (after the server's server_validation samples)")
    rng = np.random.default_rng([_SALT_HOLD_OUT, int(seed) % 2**32])
    held = np.zeros(n, bool)
    held[rng.permutation(n)[: int(size)]] = True
    return np.flatnonzero(held), np.flatnonzero(~held)


def split_training_set(
    y, n_workers: int, kind: str = "iid", *, validation_size: int = 0, seed: int = 0, **kwargs
) -> tuple[WorkerSplit, np.ndarray]:
    """Holds ``validation_size`` samples out of ``y`` (:func:`hold_out`), splits the rest over
    the workers (:func:`split_workers`, with ``kind``, ``seed`` and ``kwargs``).

    Returns:
      ``(split, held)``: the :class:`WorkerSplit` in indices of ``y`` (never a held-out one) and
      the int32 held-out indices (empty for ``validation_size=0``, when ``split`` is exactly
      ``split_workers(y, n_workers, kind, seed=seed, **kwargs)``).
    """
    y = np.asarray(y)
    if not validation_size:
        return split_workers(y, n_workers, kind, seed=seed, **kwargs), np.zeros(0, np.int32)
    held, kept = hold_out(len(y), validation_size, seed)
    split = split_workers(y[kept], n_workers, kind, seed=seed, **kwargs)
    return (WorkerSplit(indices=kept[split.indices].astype(np.int32), sizes=split.sizes),
            held.astype(np.int32))


def sample_indices(key, indices_row, size, batch_size: int) -> jax.Array:
    """Draws a worker's minibatch: uniform with replacement among its first ``size`` entries.

    Pure and traceable: ``jax.vmap(sample_indices, in_axes=(0, 0, 0, None))(keys, split.indices,
    split.sizes, B)`` samples every worker's batch inside a jitted step.

    Args:
      key: PRNG key.
      indices_row: int32 ``[m_max]``, one row of :attr:`WorkerSplit.indices`.
      size: int32 scalar, the number of valid entries in the row (>= 1).
      batch_size: static batch size ``B``.

    Returns:
      int32 ``[B]`` dataset indices.
    """
    pos = jax.random.randint(key, (batch_size,), 0, jnp.asarray(size, jnp.int32))
    return jnp.asarray(indices_row)[pos]


def _mix32(x):
    """A 32-bit integer mixing function (the murmur3 finaliser); uint32 in, uint32 out."""
    x = x ^ (x >> 16)
    x = x * jnp.uint32(0x85EBCA6B)
    x = x ^ (x >> 13)
    x = x * jnp.uint32(0xC2B2AE35)
    return x ^ (x >> 16)


def permute_index(key, p, n: int, rounds: int = 4):
    """Position ``p`` of a pseudo-random permutation of ``range(n)`` chosen by ``key``.

    A keyed Feistel network (``rounds`` rounds; Luby & Rackoff, SIAM J. Comput. 1988) permutes
    ``[0, 4^w)`` with ``4^w >= n``; cycle walking (re-applying it while the value is ``>= n``;
    Black & Rogaway, CT-RSA 2002) restricts it to a permutation of ``[0, n)``. So any position of
    a shuffled epoch is computed on its own, in O(1), without materialising or sorting the
    ``n``-element permutation: a mini-batch costs O(batch) inside the jitted step. The expected
    number of walks is at most ``4^w / n < 4``.

    Args:
      key: PRNG key (one per epoch).
      p: int32 array of positions in ``[0, n)``.
      n: the domain size (static).

    Returns:
      int32 array of the same shape: the permuted indices, distinct for distinct ``p``.
    """
    n = int(n)
    w = max(1, (max(n - 1, 1).bit_length() + 1) // 2)
    mask = jnp.uint32((1 << w) - 1)
    ks = jax.random.bits(key, (rounds,), jnp.uint32)

    def feistel(x):
        left, right = x >> w, x & mask
        for r in range(rounds):
            left, right = right, left ^ (_mix32(right ^ ks[r]) & mask)
        return (left << w) | right

    x = feistel(jnp.asarray(p, jnp.uint32))
    x = jax.lax.while_loop(lambda x: jnp.any(x >= n),
                           lambda x: jnp.where(x >= n, feistel(x), x), x)
    return x.astype(jnp.int32)


def stream_batch(key, b, n: int, batch_size: int):
    """Batch number ``b`` of an endless stream of shuffled epochs over ``range(n)``.

    The stream is what a shuffled PyTorch ``DataLoader`` (``drop_last=False``) yields, restarted
    at each epoch: every epoch is a fresh permutation (:func:`permute_index` with
    ``fold_in(key, epoch)``) cut into ``ceil(n / B)`` batches, the last one holding the
    ``n mod B`` remaining examples. Batch ``b`` is batch ``b mod ceil(n / B)`` of epoch
    ``b // ceil(n / B)``. Traceable (``b`` may be traced).

    Returns:
      ``(indices int32 [B], mask bool [B])``: ``mask`` is ``False`` on the positions past the end
      of a short last batch (their index is a valid but unused example).
    """
    nb = -(-int(n) // int(batch_size))
    b = jnp.asarray(b, jnp.int32)
    epoch, k = b // nb, b % nb
    pos = k * batch_size + jnp.arange(batch_size, dtype=jnp.int32)
    mask = pos < n
    idx = permute_index(jax.random.fold_in(key, epoch), jnp.where(mask, pos, 0), n)
    return idx, mask


def augment_images(key, x, kind: str, pad: int = 4):
    """Random augmentation of a batch of NHWC images, one draw per image (traceable).

    ``flip``: mirror each image left-right with probability 1/2. ``crop_flip``: zero-pad ``pad``
    pixels on each side, crop a random window of the original size, then ``flip`` (the standard
    CIFAR augmentation; zero is the mean pixel after jbyz's normalisation, where torchvision pads
    raw pixels with black). ``none`` returns ``x``.

    Args:
      key: PRNG key.
      x: ``[B, H, W, C]`` images (any leading axes are flattened into ``B`` and restored).
      kind: ``"none"``, ``"flip"`` or ``"crop_flip"``.

    Returns:
      The augmented images, same shape and dtype.
    """
    if kind == "none":
        return x
    valid = CHOICES["augment"]  # the one list of augmentation names (RunConfig.augment)
    if kind not in valid:
        raise ConfigError(f"unknown augmentation {kind!r}; valid: {', '.join(map(repr, valid))}")
    shape = x.shape
    x = x.reshape((-1,) + shape[-3:])
    b, h, w, _ = x.shape
    k_flip, k_crop = jax.random.split(key)
    if kind == "crop_flip":
        xp = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
        off = jax.random.randint(k_crop, (b, 2), 0, 2 * pad + 1)
        x = jax.vmap(lambda im, o: jax.lax.dynamic_slice(im, (o[0], o[1], 0), (h, w, im.shape[-1])))(xp, off)
    mirror = jax.random.bernoulli(k_flip, 0.5, (b,))
    x = jnp.where(mirror[:, None, None, None], x[:, :, ::-1, :], x)
    return x.reshape(shape)


def flip_labels(y, num_classes):
    """Label-flipping attack: ``y -> num_classes - 1 - y``.

    Works on numpy and JAX integer arrays (and inside jit).

    Args:
      y: integer labels in ``[0, num_classes)``.
      num_classes: number of classes ``C``.

    Returns:
      ``C - 1 - y``, same dtype as ``y``.
    """
    return (num_classes - 1 - y).astype(y.dtype) if hasattr(y, "astype") else num_classes - 1 - y
