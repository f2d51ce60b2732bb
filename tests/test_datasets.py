"""Offline dataset loaders (common.datasets) and the local-file loader (common.localfile)."""

from __future__ import annotations

import gzip
import time
from pathlib import Path

import numpy as np
import pytest

from common.datasets import (
    DATASETS,
    FASHION_MNIST_DIR,
    OOV_ID,
    SEQ_LEN,
    SHAKESPEARE_ALPHABET,
    WINDOW_STRIDE,
    DataError,
    encode_text,
    load_dataset,
    parse_play,
)
from common.localfile import load_local_file

FASHION_FILES = (
    "train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)
needs_fashion = pytest.mark.skipif(
    not all((FASHION_MNIST_DIR / f).is_file() for f in FASHION_FILES),
    reason=f"Debian package dataset-fashion-mnist not installed ({FASHION_MNIST_DIR}); run `make data`",
)


# ---------------------------------------------------------------- scikit-learn datasets


def test_digits_shapes_scaling_and_stratified_split() -> None:
    ds = load_dataset("digits")
    assert ds.x_train.shape == (1437, 1, 8, 8) and ds.x_test.shape == (360, 1, 8, 8)
    assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int64 and ds.y_test.dtype == np.int64
    assert ds.x_train.min() == 0.0 and ds.x_train.max() == 1.0
    assert (ds.spec.input_shape, ds.spec.num_classes, ds.spec.vocab_size) == ((1, 8, 8), 10, None)
    assert ds.groups is None and ds.class_names == tuple(str(d) for d in range(10))
    # Stratified: every class's share of the test set is within one example of 20%.
    train_counts, test_counts = np.bincount(ds.y_train), np.bincount(ds.y_test)
    assert np.all(np.abs(test_counts - 0.2 * (train_counts + test_counts)) <= 1)


def test_breast_cancer_standardized_with_train_statistics() -> None:
    ds = load_dataset("breast-cancer")
    assert ds.x_train.shape == (455, 30) and ds.x_test.shape == (114, 30)
    assert ds.x_train.dtype == np.float32 and set(np.unique(ds.y_train)) == {0, 1}
    np.testing.assert_allclose(ds.x_train.mean(axis=0), 0.0, atol=1e-5)
    np.testing.assert_allclose(ds.x_train.std(axis=0), 1.0, atol=1e-4)
    # Test rows use the training statistics, so they are not exactly standardized themselves.
    assert np.abs(ds.x_test.mean(axis=0)).max() > 1e-3
    assert ds.spec.num_classes == 2 and ds.class_names == ("malignant", "benign")


def test_loads_are_cached_deterministic_and_read_only() -> None:
    a, b = load_dataset("digits"), load_dataset("digits", data_dir="/ignored/for/digits")
    assert a is b
    with pytest.raises(ValueError, match="read-only"):
        a.x_train[0, 0, 0, 0] = 5.0
    # Indexing a client's share gives a writable copy, as training code needs.
    assert a.x_train[np.arange(3)].flags.writeable


def test_unknown_dataset_lists_the_choices() -> None:
    with pytest.raises(DataError, match="unknown dataset 'mnist'; choose one of: digits, breast-cancer"):
        load_dataset("mnist")
    assert DATASETS == ("digits", "breast-cancer", "fashion-mnist", "shakespeare", "vader-sentiment")


# ---------------------------------------------------------------- Fashion-MNIST


@needs_fashion
def test_fashion_mnist_from_the_debian_files() -> None:
    ds = load_dataset("fashion-mnist")
    assert ds.x_train.shape == (60000, 1, 28, 28) and ds.x_test.shape == (10000, 1, 28, 28)
    assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int64
    assert np.all(np.bincount(ds.y_train) == 6000) and np.all(np.bincount(ds.y_test) == 1000)
    # Normalized with the training set's own mean and std.
    assert abs(float(ds.x_train.mean())) < 0.01 and abs(float(ds.x_train.std()) - 1.0) < 0.01
    assert ds.x_train.min() == pytest.approx(-0.2860 / 0.3530, abs=1e-5)
    assert ds.class_names[0] == "T-shirt/top" and ds.class_names[9] == "Ankle boot"


@needs_fashion
def test_fashion_mnist_loads_in_about_a_second(tmp_path: Path) -> None:
    for name in FASHION_FILES:  # a folder of its own so that the process cache does not answer
        (tmp_path / name).symlink_to(FASHION_MNIST_DIR / name)
    start = time.perf_counter()
    ds = load_dataset("fashion-mnist", tmp_path)
    elapsed = time.perf_counter() - start
    assert len(ds.y_train) == 60000
    assert elapsed < 4.0, f"fashion-mnist took {elapsed:.1f} s to load"


@needs_fashion
def test_truncated_gz_names_the_file(tmp_path: Path) -> None:
    for name in FASHION_FILES[1:]:
        (tmp_path / name).symlink_to(FASHION_MNIST_DIR / name)
    good = (FASHION_MNIST_DIR / FASHION_FILES[0]).read_bytes()
    (tmp_path / FASHION_FILES[0]).write_bytes(good[: len(good) // 3])
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte\.gz is corrupt or truncated") as err:
        load_dataset("fashion-mnist", tmp_path)
    assert "\n" not in str(err.value)


def _write_idx(path: Path, magic: int, array: np.ndarray, *, gz: bool) -> None:
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    data = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(data) if gz else data)


def _write_tiny_fashion(folder: Path, *, gz: bool) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(6, 28, 28))
    labels = np.array([0, 1, 2, 9, 9, 3])
    suffix = ".gz" if gz else ""
    for prefix, n in (("train", 4), ("t10k", 2)):
        sl = slice(0, n) if prefix == "train" else slice(4, 6)
        _write_idx(folder / f"{prefix}-images-idx3-ubyte{suffix}", 2051, images[sl], gz=gz)
        _write_idx(folder / f"{prefix}-labels-idx1-ubyte{suffix}", 2049, labels[sl], gz=gz)
    return images, labels


@pytest.mark.parametrize("gz", [False, True])
def test_idx_files_raw_or_gzipped_parse_exactly(tmp_path: Path, gz: bool) -> None:
    images, labels = _write_tiny_fashion(tmp_path, gz=gz)
    ds = load_dataset("fashion-mnist", tmp_path)
    assert ds.x_train.shape == (4, 1, 28, 28) and ds.x_test.shape == (2, 1, 28, 28)
    np.testing.assert_array_equal(ds.y_train, labels[:4])
    np.testing.assert_array_equal(ds.y_test, labels[4:])
    expected = (images[:4, None] / 255.0 - 0.2860) / 0.3530
    np.testing.assert_allclose(ds.x_train, expected, atol=1e-5)


def test_idx_file_with_wrong_size_or_magic(tmp_path: Path) -> None:
    _write_tiny_fashion(tmp_path, gz=False)
    labels = tmp_path / "train-labels-idx1-ubyte"
    labels.write_bytes(labels.read_bytes()[:-1])
    with pytest.raises(DataError, match=r"labels-idx1-ubyte holds 11 bytes but its header \(4,\) needs 12"):
        load_dataset("fashion-mnist", tmp_path)
    labels.write_bytes(b"\x00\x00\x08\x03" + b"\x00" * 8)
    with pytest.raises(DataError, match="train-labels-idx1-ubyte is not an IDX file with magic number 2049"):
        load_dataset("fashion-mnist", tmp_path)


def test_missing_folder_and_missing_file_name_the_fix(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    fix = r"apt-get install dataset-fashion-mnist.*--data-dir DIR"
    with pytest.raises(DataError, match=f"folder {missing} does not exist; install it with .*{fix}"):
        load_dataset("fashion-mnist", missing)
    _write_tiny_fashion(tmp_path, gz=True)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError, match=rf"labels-idx1-ubyte\(\.gz\) is missing from {tmp_path}; .*{fix}"):
        load_dataset("fashion-mnist", tmp_path)


# ---------------------------------------------------------------- Shakespeare

# "~" stands for the two trailing spaces of a Markdown hard line break (kept out of the source).
PLAY = """# A Play

## ACT I

### SCENE I. A room.

_Enter ALICE and BOB, with
attendants_

**ALICE**~
Good morrow,~
sweet Bob\\--how now?

**BOB**~
_\\[Aside]_~
Alas.

_Exit ALICE_

I am alone _\\[To himself]_ at last.

### SCENE II. Elsewhere.

Stray text that no one speaks.

**ALICE**~
A prose line that wraps
onto the next line.
""".replace("~", "  ")


def test_parse_play_keeps_speech_and_drops_stage_directions() -> None:
    assert parse_play(PLAY) == {
        "ALICE": "Good morrow,\nsweet Bob--how now?\nA prose line that wraps onto the next line.",
        "BOB": "Alas.\nI am alone at last.",
    }


def test_encode_text_maps_unknown_characters_to_one_id() -> None:
    ids = encode_text("Ab\n—_")
    assert ids.dtype == np.int64
    alphabet = SHAKESPEARE_ALPHABET
    assert ids.tolist() == [alphabet.index("A"), alphabet.index("b"), alphabet.index("\n"), OOV_ID, OOV_ID]
    assert len(SHAKESPEARE_ALPHABET) == 80 == OOV_ID


def test_shakespeare_windows_targets_and_groups() -> None:
    ds = load_dataset("shakespeare")
    n = len(ds.y_train)
    assert 100_000 <= n <= 300_000 and 0.1 * n <= len(ds.y_test) <= 0.3 * n
    assert ds.x_train.shape == (n, SEQ_LEN) and ds.x_test.shape[1] == SEQ_LEN
    assert ds.x_train.dtype == np.int64 and ds.y_train.dtype == np.int64
    assert (ds.spec.input_shape, ds.spec.num_classes, ds.spec.vocab_size) == ((SEQ_LEN,), 81, 81)
    assert ds.x_train.max() <= OOV_ID and ds.y_test.max() <= OOV_ID and len(ds.class_names) == 81
    assert ds.groups is not None and len(ds.groups) == n
    roles = np.unique(ds.groups)
    assert 500 <= len(roles) <= 1426 and "hamlet/HAMLET" in roles and "othello/IAGO" in roles
    assert all(g.count("/") >= 1 for g in roles[:50])
    # Consecutive windows of one role are the same text shifted by the stride, and each target is the
    # character that follows its window.
    same = np.flatnonzero(ds.groups[:-1] == ds.groups[1:])[:2000]
    overlap = SEQ_LEN - WINDOW_STRIDE
    np.testing.assert_array_equal(ds.x_train[same, WINDOW_STRIDE:], ds.x_train[same + 1, :overlap])
    np.testing.assert_array_equal(ds.y_train[same], ds.x_train[same + 1, overlap])
    # Every kept role has at least two training windows.
    assert np.unique(ds.groups, return_counts=True)[1].min() >= 2


def test_text_stride_sets_the_training_windows_only() -> None:
    """text-stride 10: twice the training windows, from the same roles; the test windows stay at the default
    stride, and every second window at stride 10 is a window at 20."""
    base, dense = load_dataset("shakespeare"), load_dataset("shakespeare", stride=10)
    assert dense.x_train.shape[1] == SEQ_LEN and 1.9 < len(dense.y_train) / len(base.y_train) < 2.1
    np.testing.assert_array_equal(np.unique(dense.groups), np.unique(base.groups))
    np.testing.assert_array_equal(dense.x_test, base.x_test)
    np.testing.assert_array_equal(dense.y_test, base.y_test)
    role = "hamlet/HAMLET"
    a, b = dense.x_train[dense.groups == role], base.x_train[base.groups == role]
    np.testing.assert_array_equal(a[::2][:len(b)], b)
    np.testing.assert_array_equal(a[:-1, 10:], a[1:, :SEQ_LEN - 10])
    for bad in (0, SEQ_LEN + 1, 2.5, True):
        with pytest.raises(DataError, match=f"text-stride {bad!r} is not allowed; use an int from 1 to {SEQ_LEN}"):
            load_dataset("shakespeare", stride=bad)


# ---------------------------------------------------------------- local files


def test_npz_round_trip(tmp_path: Path) -> None:
    x = np.arange(5 * 2 * 3).reshape(5, 2, 3)
    y = np.array([0, 1, 2, 1, 0])
    np.savez(tmp_path / "mine.npz", x=x, y=y)
    got_x, got_y = load_local_file(tmp_path / "mine.npz")
    assert got_x.dtype == np.float32 and got_x.shape == (5, 2, 3) and got_y.dtype == np.int64
    np.testing.assert_array_equal(got_x, x)
    np.testing.assert_array_equal(got_y, y)


def test_csv_round_trip_with_label_column_anywhere(tmp_path: Path) -> None:
    path = tmp_path / "mine.csv"
    path.write_text("a,target,b\n1.5,1,2\n-3,0,4e-1\n\n")
    x, y = load_local_file(str(path), label_column="target")
    np.testing.assert_allclose(x, [[1.5, 2.0], [-3.0, 0.4]])
    assert x.dtype == np.float32 and y.tolist() == [1, 0] and y.dtype == np.int64


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("data.txt", "1,2", r"data\.txt: unknown file type '\.txt'; use a \.npz"),
        ("empty.csv", "", r"empty\.csv: the file is empty"),
        ("header.csv", "a,label\n", r"header\.csv: the file holds no examples"),
        ("nolabel.csv", "a,b\n1,2\n", r"nolabel\.csv: no 'label' column \(columns: a, b\)"),
        ("text.csv", "a,label\n1,0\nseven,1\n", r"text\.csv: line 3, column 'a' holds 'seven', not a number"),
        ("ragged.csv", "a,label\n1,0,5\n", r"ragged\.csv: line 2 has 3 fields, the header has 2"),
        ("frac.csv", "a,label\n1,0.5\n", r"frac\.csv: values of column 'label' include non-integer values"),
        ("neg.csv", "a,label\n1,-1\n", r"neg\.csv: values of column 'label' include negative values"),
        ("junk.npz", "not a zip", r"junk\.npz: not a readable \.npz file"),
    ],
)
def test_local_file_errors_are_one_line(tmp_path: Path, name: str, content: str, message: str) -> None:
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(DataError, match=message) as err:
        load_local_file(path)
    assert "\n" not in str(err.value) and str(path) in str(err.value)


def test_npz_missing_array_length_mismatch_and_missing_file(tmp_path: Path) -> None:
    np.savez(tmp_path / "noy.npz", x=np.zeros((3, 2)))
    with pytest.raises(DataError, match=r"noy\.npz: missing array\(s\) y \(found: x\); save with np\.savez"):
        load_local_file(tmp_path / "noy.npz")
    np.savez(tmp_path / "short.npz", x=np.zeros((3, 2)), y=np.array([0, 1]))
    with pytest.raises(DataError, match=r"short\.npz: 3 examples but 2 labels"):
        load_local_file(tmp_path / "short.npz")
    np.savez(tmp_path / "strings.npz", x=np.array([["a", "b"]]), y=np.array([0]))
    with pytest.raises(DataError, match=r"strings\.npz: array x has dtype <U1, not numeric"):
        load_local_file(tmp_path / "strings.npz")
    with pytest.raises(DataError, match=r"gone\.npz: no such file"):
        load_local_file(tmp_path / "gone.npz")


@pytest.mark.parametrize("name", ["digits", "breast-cancer", "fashion-mnist", "shakespeare"])
def test_dataset_spec_is_the_loaded_datasets_spec(name: str) -> None:
    from common.datasets import dataset_spec

    assert dataset_spec(name) == load_dataset(name).spec


def test_dataset_spec_of_text_and_of_an_unknown_name() -> None:
    from common.datasets import dataset_spec
    from models.minilm import VOCAB_SIZE

    assert dataset_spec("vader-sentiment", 32).input_shape == (32,)
    assert dataset_spec("vader-sentiment", 32).vocab_size == VOCAB_SIZE
    with pytest.raises(DataError, match="text-max-length 2 is not allowed"):
        dataset_spec("vader-sentiment", 2)
    with pytest.raises(DataError, match="unknown dataset 'cifar'"):
        dataset_spec("cifar")


def test_a_data_owners_file_needs_no_public_copy_of_the_data(tmp_path: Path) -> None:
    """A deployed client checks its file against the task's spec: no Fashion-MNIST on its machine needed."""
    from common.config import DataConfig
    from common.task import file_data

    path = tmp_path / "mine.npz"
    np.savez(path, x=np.zeros((10, 1, 28, 28), dtype=np.float32), y=np.arange(10))
    data = file_data(path, DataConfig(dataset="fashion-mnist", data_dir=str(tmp_path / "no-such-folder")))
    assert data.spec.input_shape == (1, 28, 28) and len(data.y_train) + len(data.y_val) == 10
