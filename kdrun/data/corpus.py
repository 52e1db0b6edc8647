"""Plain-text corpora for general distillation, packed into fixed-length sequences.

The layout is BERT's pre-training text: one paragraph per line, documents
separated by blank lines. Text is read line by line and tokenised in chunks,
and the packed sequences are written to an on-disk Arrow dataset through
``datasets.Dataset.from_generator``, so memory stays flat whatever the size of
the corpus.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import datasets
from transformers import PreTrainedTokenizerBase


class CorpusNotFound(FileNotFoundError):
    """No corpus was configured, or the configured path has no text."""


HUB_PREFIX = "hf:"
# What general distillation streams when no corpus is set and the hub is reachable: English Wikipedia
# articles, the domain of BERT's own pre-training text.
DEFAULT_HUB_CORPUS = "hf:wikitext:wikitext-103-raw-v1"


def hub_reachable(timeout: float = 5.0) -> bool:
    """Whether the Hugging Face hub answers (and offline mode is off): one HEAD request, at most ``timeout`` s."""
    import urllib.error
    import urllib.request

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    try:
        urllib.request.urlopen(urllib.request.Request(constants.ENDPOINT, method="HEAD"), timeout=timeout)
    except urllib.error.HTTPError:
        return True  # it answered
    except (OSError, ValueError):
        return False
    return True


def default_corpus(corpus: str | None, reachable: Callable[[], bool] | None = None) -> str | None:
    """``corpus`` when set; else :data:`DEFAULT_HUB_CORPUS` when the hub is reachable, else None (the stage's
    check then says how to set one)."""
    if corpus:
        return corpus
    return DEFAULT_HUB_CORPUS if (reachable or hub_reachable)() else None


def corpus_files(corpus: str | None) -> list[Path]:
    """The text files of ``corpus`` (a file, or a directory searched for ``*.txt``), checked."""
    if not corpus:
        raise CorpusNotFound(
            "General distillation needs a plain-text corpus (one paragraph per line, a blank line "
            "between documents), and none is configured. Set data.corpus=/path/to/corpus.txt (a file "
            "or a directory of .txt files), export KDRUN_CORPUS=/path/to/corpus.txt, or, where the "
            "Hugging Face hub is reachable, data.corpus=hf:<dataset>[:<config>] (e.g. "
            "hf:wikitext:wikitext-103-raw-v1; kdrun picks that one itself when the hub is reachable)."
        )
    path = Path(corpus).expanduser()
    files = sorted(path.rglob("*.txt")) if path.is_dir() else [path] if path.is_file() else []
    if not files:
        raise CorpusNotFound(f"data.corpus={corpus} is neither a text file nor a directory containing .txt files.")
    if not any(_has_text(file) for file in files):
        what = "is empty" if path.is_file() else f"holds only empty .txt files ({len(files)})"
        raise CorpusNotFound(
            f"data.corpus={corpus} {what}: the corpus has no text to distil on. Point data.corpus (or "
            "KDRUN_CORPUS) at a text file with one paragraph per line, or a directory of such files."
        )
    return files


def _has_text(path: Path) -> bool:
    """Whether ``path`` has a non-blank line; reads only up to the first one, so a large file costs nothing."""
    try:
        with path.open(encoding="utf-8") as handle:
            return any(line.strip() for line in handle)
    except UnicodeDecodeError as error:
        raise CorpusNotFound(f"Corpus file {path} is not UTF-8 text ({error.reason}); convert it to UTF-8.") from error


def check_corpus(corpus: str | None) -> None:
    """Fail before training when a local corpus is missing or has no text (a hub corpus is checked when streamed)."""
    if not str(corpus or "").startswith(HUB_PREFIX):
        corpus_files(corpus)


def _hub_rows(corpus: str) -> Iterator[str]:
    """The ``text`` field of a hub dataset's train split, streamed (never downloaded whole)."""
    name, _, config = corpus[len(HUB_PREFIX) :].partition(":")
    try:
        rows = datasets.load_dataset(name, config or None, split="train", streaming=True)
        for row in rows:
            yield row["text"]
    except Exception as error:  # the hub raises many types; the user needs one message
        raise CorpusNotFound(
            f"data.corpus={corpus}: the dataset could not be streamed from the Hugging Face hub "
            f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}). Use a local "
            "text file instead: data.corpus=/path/to/corpus.txt (one paragraph per line, blank line "
            "between documents)."
        ) from error


def _paragraphs(corpus: str | list[Path]) -> Iterator[str | None]:
    """Paragraphs in order, ``None`` marking a document boundary (a blank line, a file's or a row's end)."""
    if isinstance(corpus, str):
        for text in _hub_rows(corpus):
            for line in text.splitlines():
                yield line.strip() or None
            yield None
        return
    for path in corpus:
        with path.open(encoding="utf-8") as handle:
            for line in handle:
                yield line.strip() or None
        yield None


def _paragraph_chunks(corpus: str | list[Path], chunk_lines: int) -> Iterator[list[str | None]]:
    """:func:`_paragraphs` in chunks, for batched tokenising."""
    chunk: list[str | None] = []
    for paragraph in _paragraphs(corpus):
        chunk.append(paragraph)
        if len(chunk) >= chunk_lines:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def packed_sequences(
    source: str | list[Path],
    tokenizer: PreTrainedTokenizerBase,
    max_seq_length: int,
    max_sequences: int | None = None,
    chunk_lines: int = 2000,
) -> Iterator[dict[str, Any]]:
    """``[CLS] tokens [SEP]`` sequences of up to ``max_seq_length`` tokens from ``source`` (text
    files, or an ``hf:`` hub dataset name), filled greedily
    within a document (a sequence never spans two documents); documents shorter than a
    sequence give one shorter sequence."""
    body = max_seq_length - 2
    buffer: list[int] = []
    produced = 0

    def emit(tokens: list[int]) -> dict[str, Any]:
        ids = [tokenizer.cls_token_id, *tokens, tokenizer.sep_token_id]
        return {"id": produced, "input_ids": ids, "token_type_ids": [0] * len(ids), "attention_mask": [1] * len(ids), "length": len(ids)}

    for chunk in _paragraph_chunks(source, chunk_lines):
        texts = [t for t in chunk if t is not None]
        encoded = iter(tokenizer(texts, add_special_tokens=False)["input_ids"]) if texts else iter(())
        for item in chunk:
            if item is None:  # document boundary: flush what is left of the document
                if buffer:
                    yield emit(buffer)
                    produced += 1
                    buffer = []
            else:
                buffer.extend(next(encoded))
            while len(buffer) >= body:
                yield emit(buffer[:body])
                produced += 1
                buffer = buffer[body:]
            if max_sequences is not None and produced >= max_sequences:
                return
    if buffer and (max_sequences is None or produced < max_sequences):
        yield emit(buffer)


def corpus_dataset(
    corpus: str | None,
    tokenizer: PreTrainedTokenizerBase,
    max_seq_length: int,
    max_sequences: int | None,
    cache_dir: Path,
) -> datasets.Dataset:
    """The packed corpus as a memory-mapped Arrow dataset under ``cache_dir``."""
    source: str | list[Path] = corpus if corpus and corpus.startswith(HUB_PREFIX) else corpus_files(corpus)
    features = datasets.Features(
        {
            "id": datasets.Value("int64"),
            "input_ids": datasets.Sequence(datasets.Value("int32")),
            "token_type_ids": datasets.Sequence(datasets.Value("int8")),
            "attention_mask": datasets.Sequence(datasets.Value("int8")),
            "length": datasets.Value("int32"),
        }
    )
    return datasets.Dataset.from_generator(
        packed_sequences,
        gen_kwargs={"source": source, "tokenizer": tokenizer, "max_seq_length": max_seq_length, "max_sequences": max_sequences},
        features=features,
        cache_dir=str(cache_dir),
    )
