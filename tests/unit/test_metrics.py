"""Tests for GLUE metrics: agreement with sklearn/scipy plus hand-computed values."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

from kdrun.data.tasks import get_task
from kdrun.metrics import compute_metrics, main_metric_value

RNG = np.random.default_rng(1234)
LABELS = RNG.integers(0, 2, size=200)
PREDS = np.where(RNG.random(200) < 0.8, LABELS, 1 - LABELS)


def test_accuracy_hand_computed() -> None:
    m = compute_metrics(get_task("sst2"), np.array([0, 1, 0, 0]), np.array([0, 1, 1, 0]))
    assert m == {"accuracy": 0.75}
    assert type(m["accuracy"]) is float


def test_mcc_and_f1_hand_computed() -> None:
    # TP=2 FN=1 TN=2 FP=1 -> MCC = (2*2 - 1*1) / sqrt(3*3*3*3) = 1/3; P = R = F1 = 2/3.
    labels = np.array([1, 1, 1, 0, 0, 0])
    preds = np.array([1, 1, 0, 0, 0, 1])
    assert compute_metrics(get_task("cola"), preds, labels)["mcc"] == pytest.approx(1 / 3, abs=1e-12)
    m = compute_metrics(get_task("mrpc"), preds, labels)
    assert m["f1"] == pytest.approx(2 / 3, abs=1e-12)
    assert m["accuracy"] == pytest.approx(4 / 6, abs=1e-12)


def test_matches_sklearn() -> None:
    qqp = compute_metrics(get_task("qqp"), PREDS, LABELS)
    assert set(qqp) == {"f1", "accuracy"}
    assert qqp["accuracy"] == pytest.approx(accuracy_score(LABELS, PREDS), abs=1e-12)
    assert qqp["f1"] == pytest.approx(f1_score(LABELS, PREDS), abs=1e-12)
    cola = compute_metrics(get_task("cola"), PREDS, LABELS)
    assert cola == {"mcc": pytest.approx(matthews_corrcoef(LABELS, PREDS), abs=1e-12)}


def test_logits_equal_indices() -> None:
    labels = RNG.integers(0, 3, size=60)
    logits = RNG.normal(size=(60, 3))
    task = get_task("mnli")
    from_logits = compute_metrics(task, logits, labels)
    from_indices = compute_metrics(task, logits.argmax(axis=1), labels)
    assert from_logits == from_indices
    assert from_logits["accuracy"] == pytest.approx(
        accuracy_score(labels, logits.argmax(axis=1)), abs=1e-12
    )


def test_regression_matches_scipy() -> None:
    gold = RNG.uniform(0, 5, size=100)
    pred = gold + RNG.normal(scale=0.7, size=100)
    m = compute_metrics(get_task("stsb"), pred.reshape(-1, 1).astype(np.float32), gold)
    assert set(m) == {"pearson", "spearman"}
    p32 = pred.astype(np.float32).astype(np.float64)
    assert m["pearson"] == pytest.approx(pearsonr(p32, gold)[0], abs=1e-9)
    assert m["spearman"] == pytest.approx(spearmanr(p32, gold)[0], abs=1e-9)


def test_regression_hand_computed() -> None:
    # Monotone but non-linear: Spearman exactly 1, Pearson below 1; linear -> Pearson 1.
    m = compute_metrics(get_task("stsb"), np.array([1.0, 2.0, 3.0, 4.0]), np.array([1.0, 4.0, 9.0, 16.0]))
    assert m["spearman"] == pytest.approx(1.0, abs=1e-12)
    assert m["pearson"] < 0.99
    m = compute_metrics(get_task("stsb"), np.array([1.0, 2.0, 3.0]), np.array([2.0, 4.0, 6.0]))
    assert m["pearson"] == pytest.approx(1.0, abs=1e-12)


def test_main_metric_value() -> None:
    assert main_metric_value(get_task("mrpc"), {"f1": 0.9, "accuracy": 0.8}) == 0.9
    assert main_metric_value(get_task("cola"), {"mcc": 0.5}) == 0.5
    with pytest.raises(ValueError, match="pearson"):
        main_metric_value(get_task("stsb"), {"spearman": 0.5})


def test_rejects_unlabeled_and_mismatched() -> None:
    with pytest.raises(ValueError, match="unlabeled"):
        compute_metrics(get_task("sst2"), np.array([0, 1]), np.array([-1, -1]))
    with pytest.raises(ValueError, match="unlabeled"):
        compute_metrics(get_task("stsb"), np.array([1.0, 2.0]), np.array([np.nan, 1.0]))
    with pytest.raises(ValueError, match="predictions"):
        compute_metrics(get_task("sst2"), np.array([0, 1, 1]), np.array([0, 1]))
