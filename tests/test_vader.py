"""The VADER sentiment corpus (common/vader.py): counts, labels, split, partitions and its one-line errors.

Needs the sdist in data/vader/ (`make data` fetches it) and the MiniLM wheel (its tokenizer).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from common import vader
from common.datasets import DataError, load_dataset
from common.partitions import partition_indices
from simulations.cli import main

# Texts per domain after dropping score 0, and how many of them are positive: counted from the four
# gold-standard files (4200 + 10605 + 3708 + 5190 = 23,703 lines; 4 + 37 + 98 + 244 = 383 scored 0).
COUNTS = {"amazon-reviews": (3610, 2128), "movie-reviews": (10568, 5242), "nyt-editorials": (4946, 2204),
          "tweets": (4196, 2897)}


@pytest.fixture(scope="module")
def corpus():
    return load_dataset("vader-sentiment")


def test_counts_per_domain_and_label_balance(corpus) -> None:
    assert len(corpus.y_train) + len(corpus.y_test) == 23_320
    assert corpus.spec.num_classes == 2 and corpus.spec.vocab_size == 30522 and corpus.x_train.shape[1] == 64
    for domain, (total, positive) in COUNTS.items():
        train, test = corpus.groups == domain, corpus.test_groups == domain
        assert train.sum() + test.sum() == total, domain
        assert corpus.y_train[train].sum() + corpus.y_test[test].sum() == positive, domain
        # 20% of each (domain, label) cell is test data, so the test set has every domain's label mix
        assert abs(test.sum() / total - 0.2) < 0.002, domain
        assert abs(corpus.y_test[test].mean() - positive / total) < 0.01, domain
    # the split is fixed (seeded), not drawn anew per load
    labels = np.r_[corpus.y_train, corpus.y_test]
    domains = np.r_[corpus.groups, corpus.test_groups]
    first, second = vader.split(labels, domains), vader.split(labels, domains)
    assert all(np.array_equal(a, b) for a, b in zip(first, second, strict=True))


def test_natural_partition_is_one_client_per_domain(corpus) -> None:
    parts = partition_indices(corpus.y_train, "natural", 4, seed=0, groups=corpus.groups)
    assert len(parts) == 4
    domains = [set(corpus.groups[p].tolist()) for p in parts]
    assert sorted(d.pop() for d in domains if len(d) == 1) == sorted(COUNTS)
    assert sum(len(p) for p in parts) == len(corpus.y_train)
    with pytest.raises(DataError, match="more than the 4 natural clients"):
        partition_indices(corpus.y_train, "natural", 5, seed=0, groups=corpus.groups)


@pytest.mark.parametrize("spec", ["iid", "dirichlet:0.3"])
def test_iid_and_dirichlet_partitions(corpus, spec: str) -> None:
    parts = partition_indices(corpus.y_train, spec, 4, seed=1)
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(len(corpus.y_train)))


def _write_corpus(folder: Path, lines: dict[str, list[str]]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for domain, name in vader.DOMAINS.items():
        (folder / name).write_text("\r\n".join(lines.get(domain, ["1\t1.0\tfine", "2\t-1.0\tbad"])) + "\r\n")
    return folder


def test_zero_scores_are_dropped_and_text_is_cleaned(tmp_path: Path) -> None:
    folder = _write_corpus(tmp_path / "v", {"tweets": ["1\t2.5\tI love it &amp; more", "2\t0\tmeh",
                                                       "3\t-0.1\tnot great", "junk line"]})
    texts, labels, domains = vader.load_texts(folder)
    tweets = [t for t, d in zip(texts, domains, strict=True) if d == "tweets"]
    assert tweets == ["I love it & more", "not great"]  # score 0 and the malformed line are gone
    assert labels[domains == "tweets"].tolist() == [1, 0]
    ids = vader.tokenize(["a " * 50], 8)
    assert ids.shape == (1, 8) and ids[0, 0] == 101 and ids[0, -1] == 102  # [CLS] ... cut ... [SEP]


def test_missing_corpus_names_the_command(tmp_path: Path, capsys) -> None:
    with pytest.raises(DataError) as err:
        load_dataset("vader-sentiment", tmp_path)
    message = str(err.value)
    assert "\n" not in message and "make data" in message
    assert "pip download --no-deps --no-binary :all: -d data/vader vaderSentiment==3.3.2" in message
    assert main(["simulate", "--dataset", "vader-sentiment", "--data-dir", str(tmp_path), "--model", "minilm",
                 "--rounds", "1", "--num-clients", "2", "--out", str(tmp_path / "run")]) == 2
    err_line = capsys.readouterr().err.strip()
    assert len(err_line.splitlines()) == 1 and "make data" in err_line
    assert not (tmp_path / "run" / "metrics.json").exists()


def test_text_max_length_is_checked() -> None:
    with pytest.raises(DataError, match="text-max-length 2 is not allowed"):
        load_dataset("vader-sentiment", max_length=2)
