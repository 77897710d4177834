"""Data: split sizes and stratification, determinism, MNIST-1D shapes, the strict IDX reader."""

import gzip
import os
import random
import struct

import numpy as np
import pytest

from neuralode import data


def test_digits_split_is_fixed_stratified_and_scaled():
    ds = data.load_digits()
    assert ds.x_train.shape == (1437, 8, 8, 1) and ds.x_test.shape == (360, 8, 8, 1)
    assert ds.y_train.shape == (1437,) and ds.y_test.shape == (360,)
    assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int32
    assert ds.x_train.min() == 0.0 and ds.x_train.max() == 1.0
    assert ds.num_classes == 10 and ds.name == "digits"
    # Stratified: each class holds 1/5 of its examples in the test split, to within one example.
    total = np.bincount(ds.y_train, minlength=10) + np.bincount(ds.y_test, minlength=10)
    assert total.sum() == 1797
    np.testing.assert_allclose(np.bincount(ds.y_test, minlength=10), total * 360 / 1797, atol=1)
    again = data.load_digits()
    np.testing.assert_array_equal(ds.x_train, again.x_train)
    np.testing.assert_array_equal(ds.y_test, again.y_test)
    # No image is in both splits.
    train_rows = {row.tobytes() for row in ds.x_train.reshape(1437, -1)}
    test_rows = [row.tobytes() for row in ds.x_test.reshape(360, -1)]
    assert sum(row in train_rows for row in test_rows) < 10  # sklearn digits holds a few duplicates


def test_mnist1d_defaults_shapes_and_determinism():
    np.random.seed(123)
    random.seed(123)
    expected_np, expected_py = np.random.rand(), random.random()
    np.random.seed(123)
    random.seed(123)
    ds = data.load_mnist1d()
    # The generator's global reseeding does not leak out.
    assert np.random.rand() == expected_np and random.random() == expected_py
    assert ds.x_train.shape == (4000, 40, 1) and ds.x_test.shape == (1000, 40, 1)
    assert ds.y_train.shape == (4000,) and ds.y_test.shape == (1000,)
    assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int32
    assert set(np.unique(ds.y_train)) == set(range(10)) and ds.num_classes == 10
    # 500 examples per class over both splits; standardised over the whole set.
    counts = np.bincount(ds.y_train, minlength=10) + np.bincount(ds.y_test, minlength=10)
    np.testing.assert_array_equal(counts, np.full(10, 500))
    everything = np.concatenate([ds.x_train, ds.x_test]).astype(np.float64)
    assert abs(everything.mean()) < 1e-5 and abs(everything.std() - 1) < 1e-5
    np.testing.assert_array_equal(ds.x_train, data.load_mnist1d(seed=42).x_train)
    other = data.load_mnist1d(seed=7)
    assert not np.array_equal(ds.x_train, other.x_train)


def test_random_shift_translates_each_example_with_zero_fill():
    x = np.arange(2 * 5 * 4, dtype=np.float32).reshape(2, 5, 4, 1) + 1
    shifted = data.random_shift(x, 1, np.random.default_rng(0))
    assert shifted.shape == x.shape and shifted.dtype == x.dtype
    for original, moved in zip(x[..., 0], shifted[..., 0]):
        # moved[i, j] = original[i + di, j + dj] with zeros outside, for one (di, dj) in [-1, 1]^2
        matches = []
        for di in (-1, 0, 1):
            for dj in (-1, 0, 1):
                expected = np.zeros_like(original)
                src = original[max(di, 0):5 + min(di, 0), max(dj, 0):4 + min(dj, 0)]
                expected[max(-di, 0):5 + min(-di, 0), max(-dj, 0):4 + min(-dj, 0)] = src
                matches.append(np.array_equal(moved, expected))
        assert sum(matches) == 1
    np.testing.assert_array_equal(shifted, data.random_shift(x, 1, np.random.default_rng(0)))
    # every offset in [-s, s] occurs, on sequences too (N, L, C)
    seq = np.ones((400, 6, 1), np.float32)
    zeros_at_ends = data.random_shift(seq, 2, np.random.default_rng(1))[..., 0]
    lead = (zeros_at_ends[:, :2] == 0).sum(1) - (zeros_at_ends[:, -2:] == 0).sum(1)
    assert set(lead) == {-2, -1, 0, 1, 2}
    assert data.random_shift(x, 0, np.random.default_rng(0)) is x
    for bad in (-1, True, 1.5):
        with pytest.raises(ValueError, match="max_shift"):
            data.random_shift(x, bad, np.random.default_rng(0))


def test_batches_cover_every_example_once_and_are_deterministic():
    x = np.arange(10, dtype=np.float32)[:, None]
    y = np.arange(10, dtype=np.int32)
    first = list(data.batches(x, y, 4, np.random.default_rng(3)))
    second = list(data.batches(x, y, 4, np.random.default_rng(3)))
    assert [len(b) for b, _ in first] == [4, 4, 2] and data.num_batches(10, 4) == 3
    for (xa, ya), (xb, yb) in zip(first, second):
        np.testing.assert_array_equal(xa, xb)
        np.testing.assert_array_equal(ya, yb)
        np.testing.assert_array_equal(xa[:, 0], ya)  # inputs stay with their labels
    order = np.concatenate([yb for _, yb in first])
    np.testing.assert_array_equal(np.sort(order), y)
    assert not np.array_equal(order, y)  # shuffled
    resumed = list(data.batches(x, y, 4, np.random.default_rng(3), start=2))
    np.testing.assert_array_equal(resumed[0][1], first[2][1])
    in_order = np.concatenate([yb for _, yb in data.batches(x, y, 3)])
    np.testing.assert_array_equal(in_order, y)
    # filled: the last batch completed by the first examples of the same order (one batch shape)
    filled = list(data.batches(x, y, 4, np.random.default_rng(3), fill=True))
    assert [len(b) for b, _ in filled] == [4, 4, 4]
    np.testing.assert_array_equal(np.concatenate([yb for _, yb in filled]), np.r_[order, order[:2]])
    np.testing.assert_array_equal(list(data.batches(x, y, 4, fill=True, start=2))[0][1], [8, 9, 0, 1])
    with pytest.raises(ValueError, match="batch_size: 11 is more than the 10 examples"):
        next(data.batches(x, y, 11, fill=True))
    assert [len(b) for b, _ in data.batches(x, y, 11)] == [10]  # unfilled: one short batch
    with pytest.raises(ValueError, match="batch_size"):
        next(data.batches(x, y, 0))
    with pytest.raises(ValueError, match="10 inputs but 9 labels"):
        next(data.batches(x, y[:9], 2))


def test_load_dataset_dispatch_and_errors():
    assert data.load_dataset("digits").x_train.shape == (1437, 8, 8, 1)
    with pytest.raises(ValueError, match=r"unknown dataset 'cifar'.*'digits', 'mnist1d', 'mnist'"):
        data.load_dataset("cifar")
    with pytest.raises(ValueError, match="needs mnist_dir"):
        data.load_dataset("mnist")


# --- IDX files --------------------------------------------------------------------------------


def idx_bytes(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_mnist(directory, *, n_train=6, n_test=4, gz=False, seed=0):
    rng = np.random.default_rng(seed)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28)),
        "train-labels-idx1-ubyte": rng.integers(0, 10, n_train),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28)),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test),
    }
    for name, array in arrays.items():
        raw = idx_bytes(array)
        if gz:
            with gzip.open(os.path.join(directory, name + ".gz"), "wb") as f:
                f.write(raw)
        else:
            with open(os.path.join(directory, name), "wb") as f:
                f.write(raw)
    return arrays


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_idx_round_trip(tmp_path, gz):
    arrays = write_mnist(tmp_path, gz=gz)
    ds = data.load_dataset("mnist", mnist_dir=tmp_path)
    assert ds.x_train.shape == (6, 28, 28, 1) and ds.x_test.shape == (4, 28, 28, 1)
    assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int32
    np.testing.assert_array_equal(ds.x_train[..., 0] * 255, arrays["train-images-idx3-ubyte"])
    np.testing.assert_array_equal(ds.x_test[..., 0] * 255, arrays["t10k-images-idx3-ubyte"])
    np.testing.assert_array_equal(ds.y_train, arrays["train-labels-idx1-ubyte"])
    np.testing.assert_array_equal(ds.y_test, arrays["t10k-labels-idx1-ubyte"])
    data.validate_dataset(ds)


def overwrite(path, raw, gz=False):
    opener = gzip.open if gz else open
    with opener(path, "wb") as f:
        f.write(raw)


def test_mnist_missing_directory_and_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="mnist_dir: .*nowhere.* is not a directory"):
        data.load_mnist(tmp_path / "nowhere")
    write_mnist(tmp_path)
    os.remove(tmp_path / "t10k-labels-idx1-ubyte")
    with pytest.raises(FileNotFoundError, match=r"no t10k-labels-idx1-ubyte or t10k-labels-idx1-ubyte\.gz"):
        data.load_mnist(tmp_path)


def test_mnist_truncated_trailing_and_corrupt_files(tmp_path):
    arrays = write_mnist(tmp_path)
    images = tmp_path / "train-images-idx3-ubyte"
    full = idx_bytes(arrays["train-images-idx3-ubyte"])
    overwrite(images, full[:-5])
    with pytest.raises(ValueError, match=r"truncated, 4715 bytes, expected 4720 for dimensions \(6, 28, 28\)"):
        data.load_mnist(tmp_path)
    overwrite(images, full + b"\0")
    with pytest.raises(ValueError, match="trailing bytes, 4721 bytes, expected 4720"):
        data.load_mnist(tmp_path)
    overwrite(images, full[:10])
    with pytest.raises(ValueError, match="truncated header, 10 bytes, expected 16"):
        data.load_mnist(tmp_path)
    overwrite(images, b"\x00\x00\x08\x01" + full[4:])  # a labels header on an images file
    with pytest.raises(ValueError, match="magic number 0x00000801, expected 0x00000803"):
        data.load_mnist(tmp_path)
    overwrite(images, b"\x00\x00\x0d\x03" + full[4:])  # float type code
    with pytest.raises(ValueError, match="magic number 0x00000d03, expected 0x00000803"):
        data.load_mnist(tmp_path)
    wrong_size = np.zeros((6, 27, 28))
    overwrite(images, idx_bytes(wrong_size))
    with pytest.raises(ValueError, match=r"images of \(27, 28\), expected \(28, 28\)"):
        data.load_mnist(tmp_path)


def test_mnist_corrupt_and_truncated_gzip(tmp_path):
    arrays = write_mnist(tmp_path, gz=True)
    labels = tmp_path / "train-labels-idx1-ubyte.gz"
    compressed = gzip.compress(idx_bytes(arrays["train-labels-idx1-ubyte"]))
    labels.write_bytes(compressed[: len(compressed) // 2])
    with pytest.raises(ValueError, match="train-labels-idx1-ubyte.gz: cannot be read"):
        data.load_mnist(tmp_path)
    labels.write_bytes(b"this is not gzip data at all")
    with pytest.raises(ValueError, match="train-labels-idx1-ubyte.gz: cannot be read"):
        data.load_mnist(tmp_path)


def test_mnist_count_mismatch_and_label_range(tmp_path):
    write_mnist(tmp_path)
    labels = tmp_path / "t10k-labels-idx1-ubyte"
    overwrite(labels, idx_bytes(np.array([1, 2, 3])))
    with pytest.raises(ValueError, match="test split: 4 images in .* but 3 labels in .*, expected equal counts"):
        data.load_mnist(tmp_path)
    overwrite(labels, idx_bytes(np.array([1, 2, 12, 3])))
    with pytest.raises(ValueError, match="label 12 found, expected labels 0..9"):
        data.load_mnist(tmp_path)


def test_validate_dataset_names_the_problem():
    ds = data.load_digits()
    data.validate_dataset(ds)
    bad = ds._replace(y_test=ds.y_test + 5)
    with pytest.raises(ValueError, match=r"y_test: labels in \[5, 14\], but the data set has 10 classes, so they must lie in \[0, 9\]"):
        data.validate_dataset(bad)
    with pytest.raises(ValueError, match=r"x_train \(1437, 8, 8, 1\) and y_train \(1436,\) must hold the same "
                                         r"number of examples \(their first axes\)"):
        data.validate_dataset(ds._replace(y_train=ds.y_train[:-1]))
    with pytest.raises(TypeError, match="dataset: expected a neuralode.data.Dataset, found tuple"):
        data.validate_dataset(tuple(ds))
    with pytest.raises(ValueError, match="dataset 'digits': x_train holds no examples; training needs at least one"):
        data.validate_dataset(ds._replace(x_train=ds.x_train[:0], y_train=ds.y_train[:0]))
    empty_test = ds._replace(x_test=ds.x_test[:0], y_test=ds.y_test[:0])
    data.validate_dataset(empty_test)  # training without a test split is allowed


def test_validate_dataset_takes_any_targets_without_labels():
    """Regression data: float targets of shape (N, k), as many as the inputs. Only the default
    classification loss needs integer labels, and the message says so (not "example counts")."""
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(20, 3)), rng.normal(size=(20, 2))
    regression = data.Dataset(x[:15], y[:15], x[15:], y[15:], 0, "regression")
    data.validate_dataset(regression, labels=False)
    with pytest.raises(ValueError, match=r"dataset 'regression': y_train of shape \(15, 2\) and dtype float64: the "
                                         r"default classification loss needs one integer label per example, shape "
                                         r"\(N,\) \(pass a loss_fn to train on other targets\)"):
        data.validate_dataset(regression)
    floats = data.load_digits()._replace(y_train=data.load_digits().y_train.astype(np.float32))
    with pytest.raises(ValueError, match="y_train of shape \\(1437,\\) and dtype float32"):
        data.validate_dataset(floats)
    with pytest.raises(ValueError, match=r"x_test \(5, 3\) and y_test \(4, 2\) must hold the same number"):
        data.validate_dataset(regression._replace(y_test=y[16:]), labels=False)
