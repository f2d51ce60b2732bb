"""The VADER gold-standard sentiment corpus (Hutto & Gilbert, ICWSM 2014) as a binary, 4-domain text task.

Source: the `vaderSentiment==3.3.2` sdist (MIT), whose nested `additional_resources/hutto_ICWSM_2014.tar.gz`
holds four `*_GroundTruth.txt` files of `id <TAB> mean human score (-4..4) <TAB> text`: 4200 tweets, 10605
movie-review snippets, 3708 Amazon review snippets, 5190 NYT editorial snippets (23,703 texts). `make data`
downloads the sdist into data/vader/; `--data-dir DIR` names another folder holding either the sdist or the
four extracted files (a smaller copy, say).

Label: 1 if the score is > 0, 0 if < 0. The 383 texts scored exactly 0 (raters split evenly, or judged
them neutral) have no binary label and are left out: 23,320 texts remain.

Split: per domain, a seeded stratified 80/20 train/test split, so the server's test set holds every domain
(and per-domain scores can be read from it). Texts are tokenized once per process with MiniLM's WordPiece
tokenizer (the same files as the model; models/minilm.py), right-padded with id 0 to a fixed length, so the
pretrained model and the from-scratch Transformer see the same token ids.
"""

from __future__ import annotations

import html
import io
import tarfile
from pathlib import Path

import numpy as np

SDIST = "vaderSentiment-3.3.2.tar.gz"
DOWNLOAD = "pip download --no-deps --no-binary :all: -d data/vader vaderSentiment==3.3.2"
DEFAULT_DIR = Path(__file__).resolve().parents[1] / "data" / "vader"
NESTED = "additional_resources/hutto_ICWSM_2014.tar.gz"
# Natural client id -> the gold-standard file of that domain.
DOMAINS: dict[str, str] = {
    "amazon-reviews": "amazonReviewSnippets_GroundTruth.txt",
    "movie-reviews": "movieReviewSnippets_GroundTruth.txt",
    "nyt-editorials": "nytEditorialSnippets_GroundTruth.txt",
    "tweets": "tweets_GroundTruth.txt",
}
CLASS_NAMES = ("negative", "positive")
TEST_FRACTION = 0.2
SPLIT_SEED = 0
MAX_LENGTH = 64  # WordPiece tokens; about 1% of the texts are longer (cut), most are 10-40


class VaderError(ValueError):
    """The corpus is missing or unreadable; common.datasets turns this into its DataError."""


def _missing(folder: Path) -> VaderError:
    return VaderError(f"VADER sentiment corpus not found in {folder} (neither {SDIST} nor the four "
                      f"*_GroundTruth.txt files); run `make data` or `{DOWNLOAD}`, or pass --data-dir DIR holding one")


def read_files(folder: Path) -> dict[str, bytes]:
    """Domain -> raw bytes of its gold-standard file, from extracted files or from the sdist."""
    if all((folder / name).is_file() for name in DOMAINS.values()):
        return {domain: (folder / name).read_bytes() for domain, name in DOMAINS.items()}
    sdist = folder / SDIST
    if not sdist.is_file():
        raise _missing(folder)
    try:
        with tarfile.open(sdist) as outer:
            member = next((m for m in outer.getmembers() if m.name.endswith(NESTED)), None)
            if member is None:
                raise VaderError(f"{sdist} has no {NESTED}; download it again with `{DOWNLOAD}`")
            nested = outer.extractfile(member).read()  # type: ignore[union-attr]
        with tarfile.open(fileobj=io.BytesIO(nested)) as inner:
            by_name = {Path(m.name).name: m for m in inner.getmembers() if m.isfile()}
            missing = [name for name in DOMAINS.values() if name not in by_name]
            if missing:
                raise VaderError(f"{sdist} lacks {', '.join(missing)}; download it again with `{DOWNLOAD}`")
            return {domain: inner.extractfile(by_name[name]).read()  # type: ignore[union-attr]
                    for domain, name in DOMAINS.items()}
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise VaderError(f"{sdist} is corrupt ({exc}); download it again with `{DOWNLOAD}`") from None


def parse(raw: bytes) -> tuple[list[str], np.ndarray]:
    """(texts, scores) of one gold-standard file; lines that are not `id<TAB>score<TAB>text` are skipped."""
    texts, scores = [], []
    for line in raw.decode("utf-8", errors="replace").splitlines():
        parts = line.split("\t")
        if len(parts) < 3:
            continue
        try:
            score = float(parts[1])
        except ValueError:
            continue
        # Tweets carry HTML entities (&amp;); the rest is plain text. Tabs inside a text are kept as spaces.
        texts.append(html.unescape(" ".join(parts[2:])).strip())
        scores.append(score)
    return texts, np.asarray(scores, dtype=np.float64)


def load_texts(folder: Path) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(texts, labels, domains) of every text with a non-zero score, domains in DOMAINS order."""
    texts: list[str] = []
    labels, domains = [], []
    for domain, raw in read_files(folder).items():
        domain_texts, scores = parse(raw)
        keep = scores != 0  # score 0: no binary label (see the module docstring)
        texts.extend(t for t, k in zip(domain_texts, keep, strict=True) if k)
        labels.append((scores[keep] > 0).astype(np.int64))
        domains.append(np.full(int(keep.sum()), domain))
    if not texts:
        raise VaderError(f"no scored texts in the VADER files of {folder}; download them again with `{DOWNLOAD}`")
    return texts, np.concatenate(labels), np.concatenate(domains)


def split(labels: np.ndarray, domains: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) indices: per domain, a seeded split stratified by label (sorted int64)."""
    rng = np.random.default_rng(SPLIT_SEED)
    train, test = [], []
    for domain in DOMAINS:
        for label in (0, 1):
            rows = np.flatnonzero((domains == domain) & (labels == label))
            rows = rows[rng.permutation(len(rows))]
            cut = int(round(TEST_FRACTION * len(rows)))
            test.append(rows[:cut])
            train.append(rows[cut:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def tokenize(texts: list[str], max_length: int) -> np.ndarray:
    """(N, max_length) int64 WordPiece ids, [CLS] ... [SEP] then [PAD] (0), cut at max_length."""
    from models.minilm import load_tokenizer

    tokenizer = load_tokenizer()
    encoded = tokenizer(texts, max_length=max_length, truncation=True, padding="max_length",
                        return_attention_mask=False, return_token_type_ids=False)
    return np.asarray(encoded["input_ids"], dtype=np.int64)
