"""The training loop's checkpoints when one process runs several loops (a pipeline, a sweep's joblib worker)."""

from __future__ import annotations

from pathlib import Path

import datasets
import torch

from kdrun.config import DeviceConfig, TrainConfig
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
