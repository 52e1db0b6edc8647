"""Exact resume of the training loop: every interruption, then a re-run, gives bit-identical weights, the same
evaluation history and the same kept best model as an uninterrupted run.

The loop is run in-process on a small model with dropout (so that every step draws from the RNG) over three
epochs, with evaluations that depend on the weights (so that the kept best model depends on them too). A
``kill -9`` is simulated by an exception that nothing in the loop handles, raised at the fault point: like
SIGKILL, it leaves the disk as it was at that instant. Ctrl-C is the real thing: SIGINT sent to this process.
The CLI-level ``kill -9`` across an epoch boundary is in test_end_to_end.py.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import datasets
import pytest
import torch

import kdrun.train as train_module
from kdrun.config import DeviceConfig, TrainConfig
from kdrun.metrics import Evaluation
from kdrun.train import TrainingJob, train

# 40 rows, batch 4: 10 batches an epoch; 3 epochs = 30 steps; evaluations every 4 steps and at each epoch end.
CONFIG = TrainConfig(
    epochs=3, batch_size=4, learning_rate=0.05, warmup_ratio=0.1, eval_every_steps=4, checkpoint_every_steps=3,
    log_every_steps=2, seed=7,
)
ACCUMULATING = TrainConfig(**{**CONFIG.__dict__, "grad_accum_steps": 2, "batch_size": 2})


class _SimulatedKill(BaseException):
    """What SIGKILL leaves behind: nothing runs after it, no handler, no save."""


def _job() -> TrainingJob:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Dropout(0.3), torch.nn.Linear(16, 3))
    inputs = torch.randn(40, 6, generator=torch.Generator().manual_seed(1))
    labels = (inputs[:, 0] > 0).long() + (inputs[:, 1] > 0.5).long()
    features = datasets.Dataset.from_dict({"x": inputs.tolist(), "label": labels.tolist(), "length": list(range(40))})
    dev_x, dev_y = torch.randn(30, 6, generator=torch.Generator().manual_seed(2)), torch.randint(0, 3, (30,))

    def collate(rows: list[dict]) -> dict[str, torch.Tensor]:
        return {"input_ids": torch.tensor([r["x"] for r in rows]), "label": torch.tensor([r["label"] for r in rows])}

    def compute_loss(module: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        loss = torch.nn.functional.cross_entropy(module(batch["input_ids"]), batch["label"])
        return loss, {"ce": float(loss.detach())}

    def evaluate(module: torch.nn.Module) -> Evaluation:
        with torch.no_grad():
            logits = module(dev_x).float()
        return Evaluation({"neg_loss": -float(torch.nn.functional.cross_entropy(logits, dev_y)), "acc": float((logits.argmax(-1) == dev_y).float().mean())})

    def save_model(module: torch.nn.Module, directory: Path) -> None:
        directory.mkdir(parents=True)
        torch.save(module.state_dict(), directory / "weights.pt")

    return TrainingJob(model, features, collate, compute_loss, save_model, evaluate=evaluate, best_metric="neg_loss")


def _run(work_dir: Path, cfg: TrainConfig = CONFIG) -> dict:
    outcome = train(_job(), cfg, DeviceConfig(type="cpu", precision="fp32"), work_dir)
    return {
        "final": dict(_job_model_after(outcome.model_dir)),
        "best": outcome.best_metrics,
        "history": outcome.history,
        "steps": outcome.global_step,
        "resumed_from": outcome.resumed_from_step,
    }


def _job_model_after(model_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(model_dir / "weights.pt")


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    return {
        "plain": _run(tmp_path_factory.mktemp("reference")),
        "accumulating": _run(tmp_path_factory.mktemp("reference-accumulating"), ACCUMULATING),
    }


def _kill_at(monkeypatch: pytest.MonkeyPatch, point: str, step: int, prefix: str = "") -> None:
    real = train_module._inject_fault

    def fault(where: str, at: int, loop: str) -> None:
        if (where, at) == (point, step) and loop.startswith(prefix):
            raise _SimulatedKill(f"{point}:{step}")
        real(where, at, loop)

    monkeypatch.setattr(train_module, "_inject_fault", fault)


def _assert_identical(resumed: dict, reference: dict) -> None:
    assert resumed["steps"] == reference["steps"] == 30
    assert resumed["history"] == reference["history"]  # every loss window and every evaluation, in order
    assert resumed["best"] == reference["best"]
    assert resumed["final"].keys() == reference["final"].keys()
    for name, tensor in reference["final"].items():
        assert torch.equal(resumed["final"][name], tensor), name


def _best_step(reference: dict) -> int:
    return reference["best"]["step"]


# (what happens, where, at which step, the step a re-run resumes from); steps 10 and 20 end epochs 0 and 1.
KILLS = [
    ("kill", "step", 14, 12),  # mid-epoch 1: the re-run crosses the epoch boundary from a checkpoint inside epoch 1
    ("kill", "step", 11, 9),  # first step of epoch 1, resumed from epoch 0
    ("kill", "forward", 22, 21),  # in the middle of step 23's forward pass
    ("kill", "eval", 16, 15),  # inside an evaluation
    ("kill", "eval", 20, 18),  # inside the evaluation that ends epoch 1
    ("kill", "checkpoint", 15, 12),  # the checkpoint at 15 was written but not published
    ("interrupt", "step", 14, 14),  # Ctrl-C: checkpointed at the step it came in
    ("interrupt", "forward", 13, 14),  # Ctrl-C in the middle of step 14: that step finishes first
    ("interrupt", "eval", 16, 16),  # Ctrl-C during an evaluation: it is redone first
    ("interrupt", "eval", 20, 20),  # ... the evaluation ending epoch 1
    ("interrupt", "checkpoint", 18, 18),  # Ctrl-C during a periodic checkpoint write: it completes
]


@pytest.mark.parametrize("schedule", ["plain", "accumulating"])
@pytest.mark.parametrize(("action", "point", "step", "resumes_from"), KILLS, ids=[f"{a}@{p}:{s}" for a, p, s, _ in KILLS])
def test_interrupted_then_rerun_equals_the_uninterrupted_run(
    action: str, point: str, step: int, resumes_from: int, schedule: str, reference: dict, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cfg = ACCUMULATING if schedule == "accumulating" else CONFIG
    if action == "kill":
        _kill_at(monkeypatch, point, step)
        with pytest.raises(_SimulatedKill):
            _run(tmp_path, cfg)
        monkeypatch.undo()
    else:
        monkeypatch.setenv(train_module.FAULT_ENV, f"interrupt@{point}:{step}")
        with pytest.raises(KeyboardInterrupt):
            _run(tmp_path, cfg)
    progress = json.loads((tmp_path / "checkpoint" / "progress.json").read_text())
    assert progress["step"] == resumes_from
    if (action, point) == ("interrupt", "eval"):
        assert progress["eval_due"] == step
    resumed = _run(tmp_path, cfg)
    assert resumed["resumed_from"] == resumes_from
    _assert_identical(resumed, reference[schedule])
    assert not (tmp_path / "checkpoint").exists()  # a finished loop leaves no checkpoint behind


@pytest.mark.parametrize("action", ["kill", "interrupt"])
def test_interrupted_best_model_save_keeps_the_same_best_model(action: str, reference: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """At the step whose model is finally kept, the save is cut between writing and publishing it."""
    step = _best_step(reference["plain"])
    if action == "kill":
        _kill_at(monkeypatch, "save_best", step)
        with pytest.raises(_SimulatedKill):
            _run(tmp_path)
        monkeypatch.undo()
    else:  # deferred: the save completes, then the loop stops with the best score recorded for weights on disk
        monkeypatch.setenv(train_module.FAULT_ENV, f"interrupt@save_best:{step}")
        with pytest.raises(KeyboardInterrupt):
            _run(tmp_path)
        progress = json.loads((tmp_path / "checkpoint" / "progress.json").read_text())
        assert progress["best_metrics"]["step"] == step
        assert torch.load(tmp_path / "model" / "weights.pt").keys() == reference["plain"]["final"].keys()
    _assert_identical(_run(tmp_path), reference["plain"])


def test_two_interruptions_in_a_row(reference: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(train_module.FAULT_ENV, "interrupt@eval:8")
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path)
    _kill_at(monkeypatch, "step", 25)
    with pytest.raises(_SimulatedKill):
        _run(tmp_path)
    monkeypatch.undo()
    _assert_identical(_run(tmp_path), reference["plain"])


def test_a_finished_loop_is_not_trained_again(reference: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A stage killed after its loop finished (e.g. task distillation's step 1) re-runs only what is left."""
    first = _run(tmp_path)
    monkeypatch.setattr(train_module, "_TrainingLoop", None)  # training again would fail
    again = _run(tmp_path)
    assert again["history"] == first["history"] and again["best"] == first["best"]


# The same claim for whole stages, through the pipeline and its cache: a stage killed at a step of a later epoch (or
# of its second training loop), then re-run, publishes exactly what an uninterrupted run publishes.
STAGE_SCHEDULE = (
    "finetune_teacher.train.max_steps=null",
    "finetune_teacher.train.epochs=3",
    "finetune_teacher.train.batch_size=16",  # 64 rows: 4 steps an epoch
    "finetune_teacher.train.eval_every_steps=3",
    "finetune_teacher.train.checkpoint_every_steps=2",
    "general_distill.max_sequences=null",
    "general_distill.train.max_steps=null",
    "general_distill.train.epochs=2",
    "general_distill.train.batch_size=2",
    "general_distill.train.checkpoint_every_steps=3",
    "task_distill.intermediate.train.max_steps=null",
    "task_distill.intermediate.train.epochs=2",
    "task_distill.intermediate.train.batch_size=16",
    "task_distill.prediction.train.max_steps=null",
    "task_distill.prediction.train.epochs=2",
    "task_distill.prediction.train.batch_size=16",
    "task_distill.prediction.train.eval_every_steps=3",
)
STAGE_KILLS = [  # (stage, loop, fault point, step)
    ("finetune_teacher", "finetune_teacher", "step", 10),  # epoch 2; last checkpoint at 8
    ("finetune_teacher", "finetune_teacher", "eval", 6),  # inside an evaluation of epoch 1
    ("general_distill", "general_distill", "step", 11),  # epoch 1 of 2
    ("task_distill", "task_distill step 1", "step", 6),  # in the first of its two loops, epoch 1
    ("task_distill", "task_distill step 2", "step", 7),  # in the second loop, after the first finished
]


STAGE_LIST = ("finetune_teacher", "general_distill", "teacher_logits", "task_distill")
# What a re-run after a kill in each stage runs: the killed stage and, as cache hits copied from the reference
# run, the stages it reads (their keys do not depend on the stage list).
RUNS_WITH = {"finetune_teacher": ("finetune_teacher",), "general_distill": ("general_distill",), "task_distill": STAGE_LIST}


def _stage_config(tiny_bert_dir: Path, glue_dir: Path, corpus: Path, cache: Path, stages: tuple[str, ...] = STAGE_LIST):
    from composing import compose_config
    from test_tinybert import TINY_STUDENT

    return compose_config(
        "experiment=tinybert_sst2", "scale=smoke", "device=cpu", f"teacher.path={tiny_bert_dir}", f"data.glue_dir={glue_dir}",
        f"data.corpus={corpus}", *TINY_STUDENT, "augment=none", f"pipeline.stages=[{','.join(stages)}]",
        *STAGE_SCHEDULE, f"cache.dir={cache}",
    )


def _published_weights(output) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(output.path / "model" / "model.safetensors")


@pytest.fixture(scope="module")
def stage_reference(tiny_bert_dir: Path, glue_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    from kdrun.pipeline import run_pipeline

    root = tmp_path_factory.mktemp("stages")
    corpus = root / "corpus.txt"
    corpus.write_text("\n\n".join(f"The film number {i} was a good one and people liked it a lot." for i in range(60)) + "\n")
    outputs = run_pipeline(_stage_config(tiny_bert_dir, glue_dir, corpus, root / "cache"), root / "run")
    return corpus, outputs


@pytest.mark.parametrize(("stage", "loop", "point", "step"), STAGE_KILLS, ids=[f"{s}:{p}@{n}" for s, _, p, n in STAGE_KILLS])
def test_a_stage_killed_in_a_later_epoch_publishes_what_an_uninterrupted_run_does(
    stage: str, loop: str, point: str, step: int, stage_reference: tuple[Path, dict], tiny_bert_dir: Path, glue_dir: Path,
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    from kdrun.pipeline import run_pipeline

    corpus, reference = stage_reference
    stages = RUNS_WITH[stage]
    for upstream in stages[: stages.index(stage)]:  # the reference run's entries: this run computes the killed stage only
        entry = reference[upstream].path
        shutil.copytree(entry, tmp_path / "cache" / entry.parent.name / entry.name)
    cfg = _stage_config(tiny_bert_dir, glue_dir, corpus, tmp_path / "cache", stages)
    _kill_at(monkeypatch, point, step, loop)
    with pytest.raises(_SimulatedKill):
        run_pipeline(cfg, tmp_path / "killed")
    monkeypatch.undo()
    outputs = run_pipeline(cfg, tmp_path / "rerun")
    assert outputs[stage].cache == "resumed"
    assert all(outputs[name].cache == "hit" for name in stages if name != stage)
    for name in ("finetune_teacher", "general_distill", "task_distill"):
        if name not in stages:
            continue
        assert outputs[name].key == reference[name].key
        resumed, expected = _published_weights(outputs[name]), _published_weights(reference[name])
        assert resumed.keys() == expected.keys()
        assert all(torch.equal(resumed[k], expected[k]) for k in expected), name
    summary, expected_summary = outputs[stage].summary, reference[stage].summary
    if stage == "task_distill":
        summary, expected_summary = summary["prediction"], expected_summary["prediction"]
    assert summary["history"] == expected_summary["history"] and summary["best_dev"] == expected_summary["best_dev"]
