"""Length-grouped batches, dynamic padding and the step arithmetic of the training loop."""

from __future__ import annotations

import random

import torch

from kdrun.config import TrainConfig
from kdrun.data.batching import PaddingCollator, length_grouped_batches, sorted_eval_batches
from kdrun.train import planned_steps


def _lengths(n: int = 1000, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    return [rng.randint(3, 120) for _ in range(n)]


def test_every_example_once_per_epoch() -> None:
    lengths = _lengths()
    batches = length_grouped_batches(lengths, 32, seed=7)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(len(lengths)))
    assert len(batches) == 32  # ceil(1000 / 32)


def test_same_seed_same_batches_other_seed_other_order() -> None:
    lengths = _lengths()
    assert length_grouped_batches(lengths, 32, seed=1) == length_grouped_batches(lengths, 32, seed=1)
    assert length_grouped_batches(lengths, 32, seed=1) != length_grouped_batches(lengths, 32, seed=2)


def test_grouping_cuts_padding() -> None:
    lengths = _lengths()

    def padded_tokens(batches: list[list[int]]) -> int:
        return sum(max(lengths[i] for i in b) * len(b) for b in batches)

    grouped = padded_tokens(length_grouped_batches(lengths, 32, seed=3, group_by_length=True))
    plain = padded_tokens(length_grouped_batches(lengths, 32, seed=3, group_by_length=False))
    assert grouped < 0.7 * plain
    assert grouped >= sum(lengths)


def test_eval_batches_sorted_by_length() -> None:
    lengths = [5, 1, 4, 2, 3]
    assert sorted_eval_batches(lengths, 2) == [[1, 3], [4, 2], [0]]


class _Tokenizer:
    pad_token_id = 0


def test_collator_pads_to_longest_and_keeps_ids() -> None:
    features = [
        {"id": 10, "label": 1, "input_ids": [101, 7, 102], "token_type_ids": [0, 0, 0], "attention_mask": [1, 1, 1]},
        {"id": 11, "label": 0, "input_ids": [101, 102], "token_type_ids": [0, 0], "attention_mask": [1, 1]},
    ]
    batch = PaddingCollator(_Tokenizer())(features)
    assert batch["input_ids"].tolist() == [[101, 7, 102], [101, 102, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch["example_id"].tolist() == [10, 11]
    assert batch["labels"].dtype == torch.long
    regression = PaddingCollator(_Tokenizer(), label_dtype=torch.float32)([{**features[0], "label": 3.5}])
    assert regression["labels"].tolist() == [3.5]


def test_planned_steps() -> None:
    assert planned_steps(100, TrainConfig(epochs=3)) == (100, 300)
    assert planned_steps(100, TrainConfig(epochs=3, grad_accum_steps=4)) == (25, 75)
    assert planned_steps(101, TrainConfig(epochs=1, grad_accum_steps=4)) == (26, 26)
    assert planned_steps(100, TrainConfig(epochs=3, max_steps=120)) == (100, 120)
    assert planned_steps(100, TrainConfig(epochs=0.5)) == (100, 50)


def test_tokenised_rows_are_fingerprinted_by_what_the_encoding_depends_on(tiny_bert_dir) -> None:
    """The tokenised dataset's fingerprint (datasets' cache key) follows the rows, the tokenizer's definition
    and the length, not what the tokenizer's last call left set, and the rows are what the tokenizer gives."""
    import datasets
    from transformers import AutoTokenizer

    from kdrun.data.batching import tokenize_examples

    rows = datasets.Dataset.from_dict({"id": [0, 1], "text_a": ["a good film", "a bad one"], "text_b": ["", ""], "label": [1, 0]})
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert_dir)
    first = tokenize_examples(rows, tokenizer, 8)
    tokenizer(["something else entirely"], truncation=True, max_length=3)  # leaves other truncation set
    assert tokenize_examples(rows, tokenizer, 8)._fingerprint == first._fingerprint
    assert tokenize_examples(rows, tokenizer, 4)._fingerprint != first._fingerprint
    other_rows = rows.map(lambda row: {"text_a": row["text_a"].upper()})
    assert tokenize_examples(other_rows, tokenizer, 8)._fingerprint != first._fingerprint
    other = AutoTokenizer.from_pretrained(tiny_bert_dir)
    other.add_tokens(["filmmaking"])
    assert tokenize_examples(rows, other, 8)._fingerprint != first._fingerprint
    assert first["input_ids"] == tokenizer(["a good film", "a bad one"], truncation=True, max_length=8)["input_ids"]
    assert first["length"] == [len(ids) for ids in first["input_ids"]]
