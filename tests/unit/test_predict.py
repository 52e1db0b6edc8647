"""Batched inference: row order survives length-sorted batching, and long predictions report progress."""

from __future__ import annotations

import logging
from types import SimpleNamespace
from typing import Any

import datasets
import numpy as np
import pytest
import torch
from sklearn.metrics import accuracy_score, f1_score
from torch import nn

from kdrun.data.tasks import get_task
from kdrun.predict import predict_logits, score_dev_sets, single_class_predictions


class _SumOfIds(nn.Module):
    """Logits that identify their row: (sum of token ids, length)."""

    def __init__(self) -> None:
        super().__init__()
        self.unused = nn.Parameter(torch.zeros(1))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> SimpleNamespace:
        total = (input_ids * attention_mask).sum(-1).float()
        return SimpleNamespace(logits=torch.stack([total, attention_mask.sum(-1).float()], dim=-1))


def _collate(rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    width = max(len(row["input_ids"]) for row in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row["input_ids"])] = torch.tensor(row["input_ids"])
        mask[i, : len(row["input_ids"])] = 1
    return {"input_ids": ids, "attention_mask": mask}


def _features(n: int) -> datasets.Dataset:
    generator = np.random.default_rng(0)
    rows = [generator.integers(1, 100, size=int(generator.integers(1, 20))).tolist() for _ in range(n)]
    return datasets.Dataset.from_dict({"input_ids": rows, "length": [len(r) for r in rows]})


def test_logits_come_back_in_row_order() -> None:
    features = _features(37)
    logits = predict_logits(_SumOfIds(), features, _collate, batch_size=8)
    expected = np.array([[sum(r), len(r)] for r in features["input_ids"]], dtype=np.float32)
    np.testing.assert_array_equal(logits, expected)


def test_described_predictions_log_each_tenth(caplog: Any) -> None:
    features = _features(50)
    with caplog.at_level(logging.INFO, logger="kdrun.predict"):
        predict_logits(_SumOfIds(), features, _collate, batch_size=5, description="teacher logits")
    lines = [r.getMessage() for r in caplog.records if r.name == "kdrun.predict"]
    assert [line.split(" (")[0] for line in lines] == [f"teacher logits: {n}/50 rows" for n in range(5, 55, 5)]


def test_undescribed_predictions_are_silent(caplog: Any) -> None:
    with caplog.at_level(logging.INFO, logger="kdrun.predict"):
        predict_logits(_SumOfIds(), _features(20), _collate, batch_size=4)
    assert not [r for r in caplog.records if r.name == "kdrun.predict"]


class _FirstTokenParity(nn.Module):
    """A classifier that reads its input: class 1 when the first token id is odd (or always, if told)."""

    def __init__(self, always_positive: bool = False) -> None:
        super().__init__()
        self.unused = nn.Parameter(torch.zeros(1))
        self.always_positive = always_positive

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> SimpleNamespace:
        positive = torch.ones(len(input_ids)) if self.always_positive else (input_ids[:, 0] % 2).float()
        return SimpleNamespace(logits=torch.stack([1 - positive, positive], dim=-1))


def _labelled(first_tokens: list[int], labels: list[int] | list[float]) -> datasets.Dataset:
    rows = [[token, 7, 8] for token in first_tokens]
    return datasets.Dataset.from_dict({"input_ids": rows, "length": [3] * len(rows), "label": labels})


def test_a_constant_classifier_is_scored_but_not_selectable() -> None:
    mrpc = get_task("mrpc")
    dev = {"dev": _labelled([1, 2, 3, 5], [1, 1, 0, 1])}
    evaluation = score_dev_sets(_FirstTokenParity(always_positive=True), mrpc, dev, _collate, batch_size=3)
    gold, predicted = [1, 1, 0, 1], [1, 1, 1, 1]
    assert evaluation.metrics == pytest.approx({"f1": f1_score(gold, predicted), "accuracy": accuracy_score(gold, predicted)})
    assert evaluation.metrics["f1"] == pytest.approx(6 / 7)  # better than the reader below, which is why it matters
    assert evaluation.not_selectable_because == "it predicts 'equivalent' for all 4 dev examples"


def test_a_classifier_that_reads_its_input_is_selectable() -> None:
    mrpc = get_task("mrpc")
    dev = {"dev": _labelled([1, 2, 3, 5], [1, 1, 0, 1])}
    evaluation = score_dev_sets(_FirstTokenParity(), mrpc, dev, _collate, batch_size=3)
    gold, predicted = [1, 1, 0, 1], [1, 0, 1, 1]
    assert evaluation.metrics == pytest.approx({"f1": f1_score(gold, predicted), "accuracy": accuracy_score(gold, predicted)})
    assert evaluation.not_selectable_because is None


def test_single_class_predictions_names_each_constant_split_and_ignores_regression() -> None:
    mnli = get_task("mnli")
    predictions = {"dev_matched": np.array([0, 2, 1]), "dev_mismatched": np.array([2, 2, 2])}
    assert single_class_predictions(mnli, predictions) == f"it predicts '{mnli.label_names[2]}' for all 3 dev_mismatched examples"
    assert single_class_predictions(mnli, {"dev_matched": np.array([0, 2])}) is None
    assert single_class_predictions(get_task("stsb"), {"dev": np.array([3.0, 3.0, 3.0])}) is None
