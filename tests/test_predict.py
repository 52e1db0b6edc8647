"""Batched inference: row order survives length-sorted batching, and long predictions report progress."""

from __future__ import annotations

import logging
from types import SimpleNamespace
from typing import Any

import datasets
import numpy as np
import torch
from torch import nn

from kdrun.predict import predict_logits


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
