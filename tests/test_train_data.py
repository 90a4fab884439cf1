"""Data loading: the digits split and standardization, CIFAR-10 pickles (fake files)."""

import os
import pickle

import numpy as np
import pytest

from train import cli, data


def _write_batch(path, n, *, rng, data_=None, labels=None):
    d = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8) if data_ is None else data_,
         b"labels": list(rng.integers(0, 10, n)) if labels is None else labels,
         b"batch_label": b"fake"}
    with open(path, "wb") as f:
        pickle.dump(d, f)


@pytest.fixture
def cifar_dir(tmp_path):
    rng = np.random.default_rng(0)
    for name in data.CIFAR_TRAIN_FILES:
        _write_batch(tmp_path / name, 40, rng=rng)
    _write_batch(tmp_path / data.CIFAR_TEST_FILE, 30, rng=rng)
    return tmp_path


def test_digits_split_is_fixed_stratified_and_standardized_on_train():
    a, b = data.load_digits(), data.load_digits()
    np.testing.assert_array_equal(a.x_train, b.x_train)
    assert a.x_train.shape == (1437, 64) and a.x_test.shape == (360, 64)
    assert a.x_train.dtype == np.float32 and a.y_train.dtype == np.int32
    ctrain = np.bincount(a.y_train) / len(a.y_train)
    ctest = np.bincount(a.y_test) / len(a.y_test)
    np.testing.assert_allclose(ctrain, ctest, atol=0.01)  # stratified
    np.testing.assert_allclose(a.x_train.mean(0), 0, atol=1e-5)  # training stats only
    std = a.x_train.std(0)
    assert np.all((np.abs(std - 1) < 1e-4) | (std == 0))
    assert np.abs(a.x_test.mean(0)).max() > 1e-3  # test set is not re-standardized


def test_cifar_loader_reads_pickles(cifar_dir):
    ds = data.load_cifar10(cifar_dir)
    assert ds.x_train.shape == (200, 3072) and ds.x_test.shape == (30, 3072)
    assert ds.y_train.dtype == np.int32 and ds.num_classes == 10
    np.testing.assert_allclose(ds.x_train.mean(0), 0, atol=1e-5)


@pytest.mark.slow
def test_cifar_trains_end_to_end(cifar_dir, tmp_path):
    out = str(tmp_path / "run")
    rc = cli.main(["--dataset", "cifar10", "--data-dir", str(cifar_dir), "--epochs", "1",
                   "--batch-size", "32", "--hidden", "16", "--quiet", "--no-plots",
                   "--out", out])
    assert rc == 0
    assert os.path.exists(os.path.join(out, "metrics.json"))


def test_cifar_missing_files_are_named(cifar_dir, tmp_path, capsys):
    os.remove(cifar_dir / "data_batch_3")
    os.remove(cifar_dir / "test_batch")
    with pytest.raises(data.DataError, match="lacks data_batch_3, test_batch"):
        data.load_cifar10(cifar_dir)
    with pytest.raises(data.DataError, match="does not exist.*data_batch_1"):
        data.load_cifar10(tmp_path / "nowhere")
    with pytest.raises(data.DataError, match="--data-dir"):
        data.load_cifar10(None)
    rc = cli.main(["--dataset", "cifar10", "--data-dir", str(cifar_dir), "--quiet",
                   "--out", str(tmp_path / "run")])
    assert rc == 2
    err = capsys.readouterr().err
    assert "data_batch_3" in err and "test_batch" in err


@pytest.mark.parametrize("breakage, match", [
    ("garbage", "not a readable Python pickle"),
    ("list", "expected a dict"),
    ("keys", "expected b'data'"),
    ("dtype", r"uint8 of shape \(N, 3072\)"),
    ("shape", r"uint8 of shape \(N, 3072\)"),
    ("labels", "integers in 0..9"),
])
def test_cifar_malformed_files_give_clear_errors(cifar_dir, breakage, match):
    rng = np.random.default_rng(1)
    path = cifar_dir / "data_batch_2"
    if breakage == "garbage":
        path.write_bytes(b"this is not a pickle")
    elif breakage == "list":
        with open(path, "wb") as f:
            pickle.dump([1, 2, 3], f)
    elif breakage == "keys":
        with open(path, "wb") as f:
            pickle.dump({b"images": np.zeros((2, 3072), np.uint8)}, f)
    elif breakage == "dtype":
        _write_batch(path, 4, rng=rng, data_=np.zeros((4, 3072), np.float32))
    elif breakage == "shape":
        _write_batch(path, 4, rng=rng, data_=np.zeros((4, 32, 32, 3), np.uint8))
    elif breakage == "labels":
        _write_batch(path, 4, rng=rng, labels=[0, 1, 2, 10])
    with pytest.raises(data.DataError, match=match) as e:
        data.load_cifar10(cifar_dir)
    assert "data_batch_2" in str(e.value)


def test_data_dir_is_refused_for_digits(tmp_path):
    with pytest.raises(data.DataError, match="only read by --dataset cifar10"):
        data.load("digits", data_dir=str(tmp_path))


def test_epoch_order_is_a_function_of_seed_and_epoch():
    a = data.epoch_order(3, 7, 100)
    np.testing.assert_array_equal(a, data.epoch_order(3, 7, 100))
    assert not np.array_equal(a, data.epoch_order(3, 8, 100))
    assert sorted(a) == list(range(100))
