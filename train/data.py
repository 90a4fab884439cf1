"""Datasets as plain numpy arrays: UCI digits (bundled with scikit-learn) and CIFAR-10.

Inputs are flattened to ``(N, D)`` float32 and standardized with statistics of
the training split only (:func:`as_images` gives NHWC images); labels are int32.
"""

from __future__ import annotations

import os
import pickle
from typing import NamedTuple

import numpy as np

DATASETS = ("digits", "cifar10")
CIFAR_TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR_TEST_FILE = "test_batch"
CIFAR_FILES = CIFAR_TRAIN_FILES + (CIFAR_TEST_FILE,)


class Dataset(NamedTuple):
    x_train: np.ndarray  # (N_train, D) float32, standardized
    y_train: np.ndarray  # (N_train,) int32
    x_test: np.ndarray  # (N_test, D) float32, standardized with training statistics
    y_test: np.ndarray  # (N_test,) int32
    name: str
    num_classes: int


class DataError(ValueError):
    """A dataset is missing or malformed; the message says what was expected."""


def standardize(x_train: np.ndarray, x_test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-feature standardization with the training split's mean and std only.

    Constant features (std 0, e.g. the always-blank corner pixels of digits)
    are only centered.
    """
    mean = x_train.mean(axis=0, dtype=np.float64)
    std = x_train.std(axis=0, dtype=np.float64)
    std = np.where(std > 0, std, 1.0)
    f = lambda x: ((x - mean) / std).astype(np.float32)  # noqa: E731
    return f(x_train), f(x_test)


def load_digits(*, test_size: float = 0.2, split_seed: int = 0) -> Dataset:
    """UCI handwritten digits (1797 8x8 images), a fixed stratified split."""
    from sklearn.datasets import load_digits as _load
    from sklearn.model_selection import train_test_split

    x, y = _load(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=test_size, stratify=y, random_state=split_seed
    )
    x_train, x_test = standardize(x_train, x_test)
    return Dataset(x_train, y_train.astype(np.int32), x_test, y_test.astype(np.int32),
                   "digits", 10)


def _read_cifar_batch(path: str) -> tuple[np.ndarray, np.ndarray]:
    name = os.path.basename(path)
    try:
        with open(path, "rb") as f:
            batch = pickle.load(f, encoding="bytes")
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError,
            ImportError, IndexError) as e:
        raise DataError(
            f"CIFAR-10 file {path} is not a readable Python pickle ({type(e).__name__}: {e}). "
            "Expected the 'CIFAR-10 python version' files from "
            "https://www.cs.toronto.edu/~kriz/cifar.html."
        ) from e
    if not isinstance(batch, dict):
        raise DataError(
            f"CIFAR-10 file {path} holds a {type(batch).__name__}; expected a dict with keys "
            "b'data' and b'labels'."
        )
    data = batch.get(b"data", batch.get("data"))
    labels = batch.get(b"labels", batch.get("labels"))
    if data is None or labels is None:
        raise DataError(
            f"CIFAR-10 file {path} has keys {sorted(map(repr, batch))}; expected b'data' "
            "(uint8 array of shape (N, 3072)) and b'labels' (N ints in 0..9)."
        )
    data = np.asarray(data)
    labels = np.asarray(labels)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise DataError(
            f"CIFAR-10 file {name}: expected b'data' to be uint8 of shape (N, 3072), got "
            f"{data.dtype} of shape {data.shape}."
        )
    if labels.shape != (data.shape[0],) or not np.issubdtype(labels.dtype, np.integer) or (
        labels.size and (labels.min() < 0 or labels.max() > 9)
    ):
        raise DataError(
            f"CIFAR-10 file {name}: expected b'labels' to be {data.shape[0]} integers in 0..9, "
            f"got {labels.dtype} of shape {labels.shape}."
        )
    return data, labels.astype(np.int32)


def load_cifar10(data_dir: str | os.PathLike | None) -> Dataset:
    """CIFAR-10 from the standard python pickles in ``data_dir``.

    Expects ``data_batch_1`` .. ``data_batch_5`` and ``test_batch``, each a
    pickled dict with ``b"data"`` (uint8, ``(N, 3072)``) and ``b"labels"``.
    Nothing is downloaded.
    """
    expected = ", ".join(CIFAR_FILES)
    if data_dir is None:
        raise DataError(
            f"--dataset cifar10 needs --data-dir DIR, a directory holding {expected} "
            "(the extracted cifar-10-batches-py)."
        )
    data_dir = os.fspath(data_dir)
    if not os.path.isdir(data_dir):
        raise DataError(f"CIFAR-10 directory {data_dir} does not exist; expected a directory "
                        f"holding {expected}.")
    missing = [f for f in CIFAR_FILES if not os.path.isfile(os.path.join(data_dir, f))]
    if missing:
        raise DataError(
            f"CIFAR-10 directory {data_dir} lacks {', '.join(missing)}; expected {expected} "
            "(the extracted cifar-10-batches-py)."
        )
    parts = [_read_cifar_batch(os.path.join(data_dir, f)) for f in CIFAR_TRAIN_FILES]
    x_train = np.concatenate([p[0] for p in parts]).astype(np.float32) / 255.0
    y_train = np.concatenate([p[1] for p in parts])
    x_test, y_test = _read_cifar_batch(os.path.join(data_dir, CIFAR_TEST_FILE))
    x_train, x_test = standardize(x_train, x_test.astype(np.float32) / 255.0)
    return Dataset(x_train, y_train, x_test, y_test, "cifar10", 10)


def subset(ds: Dataset, *, train: int | None = None, test: int | None = None,
           seed: int = 0) -> Dataset:
    """The first ``train``/``test`` examples of a seeded shuffle (for quick runs and tests)."""
    rng = np.random.default_rng(seed)

    def take(x, y, n):
        if n is None or n >= len(y):
            return x, y
        idx = np.sort(rng.permutation(len(y))[:n])
        return x[idx], y[idx]

    x_train, y_train = take(ds.x_train, ds.y_train, train)
    x_test, y_test = take(ds.x_test, ds.y_test, test)
    return ds._replace(x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)


# (H, W, C) of each data set's images, and the order of its flattened pixels
IMAGE_SHAPES = {"digits": ((8, 8, 1), "hwc"), "cifar10": ((32, 32, 3), "chw")}


def as_images(ds: Dataset) -> Dataset:
    """``ds`` with its flattened inputs reshaped to NHWC images ``(N, H, W, C)``
    (CIFAR-10's pickles store the channels first)."""
    (h, w, c), order = IMAGE_SHAPES[ds.name]

    def f(x):
        return (x.reshape(-1, h, w, c) if order == "hwc"
                else x.reshape(-1, c, h, w).transpose(0, 2, 3, 1))

    return ds._replace(x_train=f(ds.x_train), x_test=f(ds.x_test))


def load(name: str, *, data_dir: str | None = None, split_seed: int = 0) -> Dataset:
    """Data set ``name``; ``data_dir`` is where CIFAR-10 lies (digits comes with scikit-learn,
    so a ``data_dir`` given with it is an error rather than silently ignored)."""
    if name == "digits":
        if data_dir is not None:
            raise DataError(f"--data-dir {data_dir} is only read by --dataset cifar10; the "
                            "digits data set (the default) is bundled with scikit-learn. Drop "
                            "--data-dir or add --dataset cifar10.")
        return load_digits(split_seed=split_seed)
    if name == "cifar10":
        return load_cifar10(data_dir)
    raise DataError(f"Unknown dataset {name!r}; expected one of {DATASETS}.")


def epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
    """The data order of one epoch: a pure function of ``(seed, epoch)``.

    This is the whole data-order state a checkpoint needs: resuming at epoch
    ``e`` replays exactly the permutation an uninterrupted run would draw.
    """
    return np.random.default_rng([seed, epoch]).permutation(n)
