"""Tokenised features, dynamic padding and length-grouped batches.

Padding every batch to ``max_seq_length`` wastes most of a CPU step on GLUE's short
sentences; grouping examples of similar length and padding each batch only to
its longest member does the same work in a fraction of the time. Batches are
formed from a seeded, per-epoch order that depends on nothing else, so a resumed
run can skip exactly the batches it has already trained on.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from collections.abc import Iterator, Sequence
from typing import Any

import datasets
import torch
from transformers import PreTrainedTokenizerBase

MODEL_INPUTS = ("input_ids", "token_type_ids", "attention_mask")


def tokenize_examples(
    examples: datasets.Dataset, tokenizer: PreTrainedTokenizerBase, max_seq_length: int
) -> datasets.Dataset:
    """Add model inputs and a ``length`` column; keeps ``id`` and ``label`` for losses and caches."""
    is_pair = any(text for text in examples[:64]["text_b"]) if len(examples) else False

    def encode(batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
        pair = batch["text_b"] if is_pair else None
        encoded = tokenizer(batch["text_a"], pair, truncation=True, max_length=max_seq_length)
        encoded["length"] = [len(ids) for ids in encoded["input_ids"]]
        return encoded

    drop = [c for c in examples.column_names if c not in ("id", "label")]
    fingerprint = _encoding_fingerprint(examples, tokenizer, max_seq_length, is_pair)
    return examples.map(encode, batched=True, batch_size=2000, remove_columns=drop, desc=None, new_fingerprint=fingerprint)


def _encoding_fingerprint(examples: datasets.Dataset, tokenizer: PreTrainedTokenizerBase, max_seq_length: int, is_pair: bool) -> str | None:
    """The tokenised dataset's fingerprint from what the encoding depends on: the rows' own fingerprint, the
    fast tokenizer's whole definition (vocabulary, normaliser, special-token template) and the length.

    Without it, ``datasets`` fingerprints ``encode`` by pickling its closure, tokenizer included: over a
    tenth to half a second per call for a 30k-word vocabulary, paid by every stage that tokenises (kdrun never
    changes a tokenizer after loading it, so its definition is hashed once). A tokenizer without a
    serialisable backend (the BiLSTM's word tokenizer) keeps the library's own hashing (None)."""
    definition = _tokenizer_definition(tokenizer)
    if definition is None:
        return None
    digest = hashlib.sha256()
    for part in (examples._fingerprint, type(tokenizer).__name__, definition, str(max_seq_length), str(is_pair)):
        digest.update(part.encode())
        digest.update(b"\0")
    return digest.hexdigest()[:32]


_DEFINITION = "_kdrun_definition_sha256"


def _tokenizer_definition(tokenizer: PreTrainedTokenizerBase) -> str | None:
    """SHA-256 of a fast tokenizer's definition without the truncation and padding its last call left set
    (each encoding passes its own), computed once per tokenizer object; None without a serialisable backend."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    known = getattr(tokenizer, _DEFINITION, None)
    if known is None:
        definition = json.loads(backend.to_str())
        for state in ("truncation", "padding"):
            definition.pop(state, None)
        known = hashlib.sha256(json.dumps(definition, sort_keys=True).encode()).hexdigest()
        setattr(tokenizer, _DEFINITION, known)
    return known


class PaddingCollator:
    """Pads a list of features to the longest one in the batch."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, label_dtype: torch.dtype | None = None):
        self.pad_id = tokenizer.pad_token_id or 0
        self.label_dtype = label_dtype

    def __call__(self, features: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        width = max(len(f["input_ids"]) for f in features)
        batch: dict[str, torch.Tensor] = {}
        for name in MODEL_INPUTS:
            if name not in features[0]:
                continue
            fill = self.pad_id if name == "input_ids" else 0
            rows = [list(f[name]) + [fill] * (width - len(f[name])) for f in features]
            batch[name] = torch.tensor(rows, dtype=torch.long)
        if "id" in features[0]:
            batch["example_id"] = torch.tensor([f["id"] for f in features], dtype=torch.long)
        if "label" in features[0]:
            batch["labels"] = torch.tensor([f["label"] for f in features], dtype=self.label_dtype)
        return batch


def length_grouped_batches(
    lengths: Sequence[int], batch_size: int, seed: int, group_by_length: bool = True, mega_batch_factor: int = 50
) -> list[list[int]]:
    """One epoch's batches of example indices.

    Shuffle, cut into mega-batches of ``mega_batch_factor * batch_size``, sort each
    by length (longest first) and cut into batches, then shuffle the batches:
    near-uniform lengths within a batch, randomness across the epoch. With
    ``group_by_length=False`` it is a plain seeded shuffle.
    """
    rng = random.Random(seed)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    if not group_by_length:
        return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    mega = batch_size * mega_batch_factor
    batches: list[list[int]] = []
    for start in range(0, len(order), mega):
        chunk = sorted(order[start : start + mega], key=lambda i: -lengths[i])
        batches.extend(chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size))
    rng.shuffle(batches)
    return batches


class EpochBatchSampler(torch.utils.data.Sampler[list[int]]):
    """Yields :func:`length_grouped_batches` for the current epoch (set with :meth:`set_epoch`)."""

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int, group_by_length: bool = True):
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.seed = seed
        self.group_by_length = group_by_length
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[list[int]]:
        yield from length_grouped_batches(self.lengths, self.batch_size, self.seed + self.epoch, self.group_by_length)

    def __len__(self) -> int:
        return math.ceil(len(self.lengths) / self.batch_size)


def sorted_eval_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Evaluation order: by length, so that padding is minimal; predictions are re-ordered after."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
