"""The training loop's checkpoints when one process runs several loops (a pipeline, a sweep's joblib worker)."""

from __future__ import annotations

import logging
from pathlib import Path

import datasets
import pytest
import torch

from kdrun.config import DeviceConfig, TrainConfig
from kdrun.metrics import Evaluation
from kdrun.train import TrainingJob, _TrainingLoop, train


def _job(seed: int) -> TrainingJob:
    torch.manual_seed(seed)
    model = torch.nn.Linear(4, 2)
    features = datasets.Dataset.from_dict({"input_ids": torch.randn(16, 4).tolist(), "label": [0, 1] * 8, "length": [4] * 16})

    def collate(rows: list[dict]) -> dict[str, torch.Tensor]:
        return {"input_ids": torch.tensor([r["input_ids"] for r in rows]), "label": torch.tensor([r["label"] for r in rows])}

    def compute_loss(module: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(module(batch["input_ids"]), batch["label"])

    def save_model(module: torch.nn.Module, directory: Path) -> None:
        directory.mkdir(parents=True)
        torch.save(module.state_dict(), directory / "weights.pt")

    return TrainingJob(model, features, collate, compute_loss, save_model)


def test_a_later_loop_checkpoints_only_its_own_model_and_resumes(tmp_path: Path) -> None:
    cfg = TrainConfig(epochs=1, max_steps=4, batch_size=4, checkpoint_every_steps=1, warmup_ratio=0.0)
    device = DeviceConfig(type="cpu")
    train(_job(0), cfg, device, tmp_path / "first")  # an earlier stage in the same process
    # Then a second loop is interrupted after a checkpoint at step 2 (what a killed run leaves).
    loop = _TrainingLoop(_job(1), cfg, device, tmp_path / "second")
    loop.state["step"] = loop.state["batches_done"] = 2
    loop.checkpoints.save(loop.state)
    saved = sorted(p.name for p in (tmp_path / "second" / "checkpoint").iterdir())
    assert [n for n in saved if n.startswith("model")] == ["model.safetensors"]
    assert [n for n in saved if n.startswith(("optimizer", "custom_checkpoint"))] == ["custom_checkpoint_0.pkl", "optimizer.bin"]
    # A fresh loop (as a new process would build) resumes from it.
    outcome = train(_job(1), cfg, device, tmp_path / "second")
    assert outcome.resumed_from_step == 2 and outcome.global_step == 4


def _scripted(job: TrainingJob, evaluations: list[Evaluation]) -> TrainingJob:
    """The job's model evaluated at steps 1, 2, 3, ... gives these evaluations, in order."""
    remaining = iter(evaluations)
    job.evaluate, job.best_metric = (lambda model: next(remaining)), "f1"
    return job


def _kept_weights(outcome_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(outcome_dir / "weights.pt")


def test_keep_best_skips_checkpoints_that_are_not_selectable(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cfg = TrainConfig(epochs=1, max_steps=3, batch_size=4, eval_every_steps=1, warmup_ratio=0.0)
    constant = "it predicts 'equivalent' for all 4 dev examples"
    evaluations = [Evaluation({"f1": 0.5}), Evaluation({"f1": 0.81}, constant), Evaluation({"f1": 0.6})]
    saved: dict[int, dict[str, torch.Tensor]] = {}
    job = _scripted(_job(0), evaluations)
    save_model = job.save_model

    def save_and_remember(module: torch.nn.Module, directory: Path) -> None:
        save_model(module, directory)
        saved[len(saved) + 1] = {k: v.clone() for k, v in module.state_dict().items()}

    job.save_model = save_and_remember
    with caplog.at_level(logging.WARNING, logger="kdrun.train"):
        outcome = train(job, cfg, DeviceConfig(type="cpu"), tmp_path)
    assert outcome.best_metrics == {"step": 3, "f1": 0.6}
    assert [h.get("not_selectable_because") for h in outcome.history if "eval_f1" in h] == [None, constant, None]
    assert f"step 2 cannot be kept as the best model: {constant}." in caplog.messages
    # Saved at step 1 (best so far) and step 3 (better than 0.5); step 2's 0.81 was never saved.
    assert len(saved) == 2
    torch.testing.assert_close(_kept_weights(outcome.model_dir), saved[2])


def test_keep_best_keeps_the_last_step_when_no_evaluation_is_selectable(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cfg = TrainConfig(epochs=1, max_steps=2, batch_size=4, eval_every_steps=1, warmup_ratio=0.0)
    constant = "it predicts 'acceptable' for all 4 dev examples"
    job = _scripted(_job(0), [Evaluation({"f1": 0.7}, constant), Evaluation({"f1": 0.2}, constant)])
    with caplog.at_level(logging.WARNING, logger="kdrun.train"):
        outcome = train(job, cfg, DeviceConfig(type="cpu"), tmp_path)
    assert outcome.best_metrics == {"step": 2, "f1": 0.2}  # the kept model's scores, not the best ruled-out one
    assert "train: no evaluation could be kept as the best model; keeping the last step's." in caplog.messages
    torch.testing.assert_close(_kept_weights(outcome.model_dir), job.model.state_dict())
