"""The one training loop that every kdrun stage uses.

A stage describes *what* to train in a :class:`TrainingJob` (model, features, how
to compute the loss, how to evaluate and save); this module owns *how*: device
placement and DDP through accelerate, mixed precision (autocast over fp32 master
weights, ``kdrun/precision.py``), AdamW with linear warm-up and decay, gradient
accumulation and clipping, length-grouped batches, periodic dev evaluation keeping
the best model, and full-state checkpoints.

Resumption: every ``checkpoint_every_steps`` optimizer steps the full state
(model, optimizer, scheduler, every RNG, epoch and batch position, step, best
score, history) is written to ``<work_dir>/checkpoint`` atomically. Running the
same job again with the same ``work_dir`` (which is what re-running the same
``kdrun`` command does) restores it and continues with exactly the batches that
had not been trained on, so the result equals an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from transformers import get_linear_schedule_with_warmup

from kdrun import tracking
from kdrun.config import DeviceConfig, TrainConfig
from kdrun.data.batching import EpochBatchSampler
from kdrun.metrics import Evaluation
from kdrun.precision import Precision, device_type_of, resolve_precision

logger = logging.getLogger(__name__)

LossOutput = torch.Tensor | tuple[torch.Tensor, dict[str, float]]

# Test hook: the process kills itself (SIGKILL, like `kill -9`) right after this optimizer step.
FAULT_ENV = "KDRUN_FAULT_AFTER_STEP"


@dataclass
class TrainingJob:
    """What a stage asks the loop to train."""

    model: torch.nn.Module
    train_features: datasets.Dataset  # needs a ``length`` column
    collate: Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]]
    # (model, batch) -> loss, or (loss, {component name: value}) for logging.
    compute_loss: Callable[[torch.nn.Module, dict[str, torch.Tensor]], LossOutput]
    # Writes a self-contained, loadable model directory (e.g. ``save_pretrained``).
    save_model: Callable[[torch.nn.Module, Path], None]
    # model -> dev metrics (and whether it may be kept as best); None disables evaluation and best-model selection.
    evaluate: Callable[[torch.nn.Module], Evaluation] | None = None
    best_metric: str | None = None
    greater_is_better: bool = True
    keep_best: bool = True
    description: str = "train"


@dataclass
class TrainOutcome:
    model_dir: Path  # the best model when evaluating, else the last
    global_step: int
    best_metrics: dict[str, float] | None  # the kept model's dev metrics and step (None: not evaluated, or keep_best off)
    history: list[dict[str, Any]] = field(default_factory=list)
    train_seconds: float = 0.0
    examples_per_second: float = 0.0
    tokens_per_second: float = 0.0  # non-padding tokens
    resumed_from_step: int = 0
    precision: str = "fp32"

    def summary(self) -> dict[str, Any]:
        """What a stage reports about its training (for stage.json and results.json)."""
        return {
            "steps": self.global_step,
            "resumed_from_step": self.resumed_from_step,
            "best_dev": self.best_metrics,
            "train_seconds": round(self.train_seconds, 2),
            "examples_per_second": round(self.examples_per_second, 2),
            "tokens_per_second": round(self.tokens_per_second, 1),
            "precision": self.precision,
            "history": self.history,
        }


_ACCELERATORS: dict[str, Accelerator] = {}


def get_accelerator(device: DeviceConfig) -> Accelerator:
    """One accelerator per process and device (accelerate keeps process-wide state).

    It never autocasts: precision is kdrun's (``kdrun/precision.py``), because
    accelerate fixes one mixed-precision mode per process and a sweep in one
    process may mix them.
    """
    if device.type not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device.type must be auto, cpu or cuda, got '{device.type}'.")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device=cuda was requested but no CUDA device is visible; use device=cpu or device=auto.")
    kind = device_type_of(device)
    if kind not in _ACCELERATORS:
        _ACCELERATORS[kind] = Accelerator(cpu=kind == "cpu", mixed_precision="no")
    return _ACCELERATORS[kind]


def _forget_earlier_trainings(accelerator: Accelerator) -> None:
    """The accelerator is shared by every training loop of a process (a pipeline's stages, a sweep's jobs
    in one joblib worker), and its checkpoints hold everything it was ever given. Without this a later loop
    saved the earlier loops' models and optimizers too, and a fresh process could not resume from it
    (accelerate refuses a checkpoint whose custom objects it did not register)."""
    accelerator.free_memory()
    accelerator._custom_objects.clear()  # accelerate has no public way to unregister them


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch; call before building a model so its new heads are reproducible."""
    set_seed(seed)


def _optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW without weight decay on biases and LayerNorm weights, as in BERT."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim < 2 or "LayerNorm" in name or "layer_norm" in name else decay).append(param)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    # The fused kernel (CPU and CUDA) makes the update of a 30k-row embedding table about 7x cheaper.
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, eps=cfg.adam_epsilon, fused=True)


def planned_steps(num_batches_per_epoch: int, cfg: TrainConfig) -> tuple[int, int]:
    """(optimizer steps per epoch, total optimizer steps) for this process."""
    updates_per_epoch = max(1, math.ceil(num_batches_per_epoch / cfg.grad_accum_steps))
    total = max(1, math.ceil(cfg.epochs * updates_per_epoch))
    if cfg.max_steps is not None:
        total = min(total, cfg.max_steps)
    return updates_per_epoch, total


class _Checkpoints:
    """Atomic full-state checkpoints in ``<work_dir>/checkpoint``."""

    def __init__(self, accelerator: Accelerator, work_dir: Path):
        self.accelerator = accelerator
        self.current = work_dir / "checkpoint"
        self.partial = work_dir / "checkpoint.partial"
        self.previous = work_dir / "checkpoint.previous"

    def latest(self) -> Path | None:
        for candidate in (self.current, self.previous):
            if (candidate / "progress.json").is_file():
                return candidate
        return None

    def save(self, progress: dict[str, Any]) -> None:
        accelerator = self.accelerator
        if accelerator.is_main_process and self.partial.exists():
            shutil.rmtree(self.partial)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(self.partial))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            (self.partial / "progress.json").write_text(json.dumps(progress))
            if self.current.exists():
                if self.previous.exists():
                    shutil.rmtree(self.previous)
                self.current.rename(self.previous)
            self.partial.rename(self.current)
            if self.previous.exists():
                shutil.rmtree(self.previous)
        accelerator.wait_for_everyone()

    def load(self, directory: Path) -> dict[str, Any]:
        self.accelerator.load_state(str(directory))
        return json.loads((directory / "progress.json").read_text())

    def remove(self) -> None:
        if self.accelerator.is_main_process:
            for path in (self.current, self.partial, self.previous):
                if path.exists():
                    shutil.rmtree(path)


def _improved(value: float, best: float | None, greater_is_better: bool) -> bool:
    if best is None:
        return True
    return value > best if greater_is_better else value < best


def _progress_bar(enabled: bool) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.4f}"),
        TextColumn("{task.fields[speed]:.1f} ex/s"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        disable=not enabled,
        transient=False,
        console=Console(stderr=True),  # stdout stays for what a program prints (e.g. a benchmark's JSON)
    )


class _TrainingLoop:
    """One call of :func:`train`: the prepared objects, the resumable ``state`` and the loop over it.

    ``state`` (step, epoch, batches done in the epoch, best score, history) is
    all that a checkpoint adds to the model, optimizer, scheduler and RNG states.
    """

    def __init__(self, job: TrainingJob, cfg: TrainConfig, device: DeviceConfig, work_dir: Path, precision: Precision | None = None):
        work_dir.mkdir(parents=True, exist_ok=True)
        self.job, self.cfg, self.precision = job, cfg, precision or resolve_precision(device)
        self.accelerator = get_accelerator(device)
        _forget_earlier_trainings(self.accelerator)
        seed_everything(cfg.seed)
        self.sampler = EpochBatchSampler(job.train_features["length"], cfg.batch_size, cfg.seed, cfg.group_by_length)
        # Its own generator: iterating must not consume the global RNG that dropout draws from,
        # or a resumed run would diverge from an uninterrupted one.
        loader = torch.utils.data.DataLoader(
            job.train_features, batch_sampler=self.sampler, collate_fn=job.collate, generator=torch.Generator()
        )
        self.model, self.optimizer, self.loader = self.accelerator.prepare(job.model, _optimizer(job.model, cfg), loader)
        self.updates_per_epoch, self.total_steps = planned_steps(len(self.loader), cfg)
        self.scheduler = get_linear_schedule_with_warmup(
            self.optimizer, round(cfg.warmup_ratio * self.total_steps), self.total_steps
        )
        self.accelerator.register_for_checkpointing(self.scheduler)
        # fp16 gradients underflow without loss scaling; bf16 has fp32's range and needs none.
        self.scaler = torch.amp.GradScaler(self.precision.device_type) if self.precision.needs_grad_scaler else None
        if self.scaler is not None:
            self.accelerator.register_for_checkpointing(self.scaler)
        self.checkpoints = _Checkpoints(self.accelerator, work_dir)
        self.model_dir = work_dir / "model"
        self.eval_every = cfg.eval_every_steps  # None: only at the end of each epoch
        self.last_eval_step = -1
        self.last_metrics: dict[str, float] = {}
        self.fault_step = int(os.environ.get(FAULT_ENV, "0") or 0)
        self.state: dict[str, Any] = {
            "step": 0, "epoch": 0, "batches_done": 0, "best": None, "best_metrics": None, "history": []
        }
        found = self.checkpoints.latest()
        if found is not None:
            self.state = self.checkpoints.load(found)
            logger.info("Resuming %s from step %d/%d (%s).", job.description, self.state["step"], self.total_steps, found)
        self.resumed_from = self.state["step"]
        # The position that matches the weights: micro-batches accumulated since the last update don't count.
        self.consistent_batches_done = self.state["batches_done"]
        self.updating = False
        self.examples_seen, self.tokens_seen, self.train_seconds = 0, 0, 0.0
        self.window_loss, self.window_count = 0.0, 0
        self.window_terms: dict[str, float] = {}  # loss components, for distillation objectives
        self.progress = _progress_bar(self.accelerator.is_local_main_process)
        self.bar: Any = None

    def run(self) -> TrainOutcome:
        self.model.train()
        try:
            with self.progress:
                self.bar = self.progress.add_task(
                    self.job.description, total=self.total_steps, completed=self.state["step"], loss=0.0, speed=0.0
                )
                while self.state["step"] < self.total_steps:
                    self._epoch()
        except KeyboardInterrupt:
            self._save_on_interrupt()
            raise
        if self.job.keep_best and self.state["best_metrics"] is None and any("not_selectable_because" in h for h in self.state["history"]):
            # Every evaluation was ruled out: the last step's model is kept, and its scores reported as such.
            logger.warning("%s: no evaluation could be kept as the best model; keeping the last step's.", self.job.description)
            self.state["best_metrics"] = {"step": self.state["step"], **self.last_metrics}
            self._save_model()
        elif self.state["best_metrics"] is None or not self.job.keep_best or not self.model_dir.exists():
            self._save_model()
        self.checkpoints.remove()
        return TrainOutcome(
            model_dir=self.model_dir,
            global_step=self.state["step"],
            best_metrics=self.state["best_metrics"],
            history=self.state["history"],
            train_seconds=self.train_seconds,
            examples_per_second=self.examples_seen / self.train_seconds if self.train_seconds else 0.0,
            tokens_per_second=self.tokens_seen / self.train_seconds if self.train_seconds else 0.0,
            resumed_from_step=self.resumed_from,
            precision=self.precision.name,
        )

    def _epoch(self) -> None:
        state, cfg, accelerator = self.state, self.cfg, self.accelerator
        self.sampler.set_epoch(state["epoch"])
        skip = state["batches_done"]
        batches = accelerator.skip_first_batches(self.loader, skip) if skip else self.loader
        started = time.perf_counter()
        for batch_index, batch in enumerate(batches, start=skip):
            is_update = (batch_index + 1) % cfg.grad_accum_steps == 0 or batch_index + 1 == len(self.loader)
            with accelerator.no_sync(self.model) if not is_update else contextlib.nullcontext():
                with self.precision.training_forward():  # forwards in low precision; loss terms cast to fp32 themselves
                    output = self.job.compute_loss(self.model, batch)
                loss, terms = output if isinstance(output, tuple) else (output, {})
                loss = loss.float()
                scaled = loss / cfg.grad_accum_steps
                accelerator.backward(self.scaler.scale(scaled) if self.scaler is not None else scaled)
            self.window_loss += float(loss.detach())
            self.window_count += 1
            for name, value in terms.items():
                self.window_terms[name] = self.window_terms.get(name, 0.0) + value
            self.examples_seen += int(batch["input_ids"].shape[0]) * accelerator.num_processes
            if "attention_mask" in batch:
                self.tokens_seen += int(batch["attention_mask"].sum()) * accelerator.num_processes
            state["batches_done"] = batch_index + 1
            if not is_update:
                continue
            self._update()
            self.train_seconds += time.perf_counter() - started
            self._after_update()
            started = time.perf_counter()
            if state["step"] >= self.total_steps:
                return
        state["epoch"] += 1
        state["batches_done"] = self.consistent_batches_done = 0
        if self.last_eval_step != state["step"]:  # every epoch ends with an evaluation
            self._evaluate_and_keep_best()

    def _update(self) -> None:
        self.updating = True
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)  # clip the true gradients
        if self.cfg.max_grad_norm and self.cfg.max_grad_norm > 0:
            self.accelerator.clip_grad_norm_(self.model.parameters(), self.cfg.max_grad_norm)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)  # skips the step when a gradient overflowed
            self.scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.state["step"] += 1
        self.consistent_batches_done = self.state["batches_done"]
        self.updating = False

    def _after_update(self) -> None:
        """Progress, logging, evaluation and checkpoints: everything that is not training time."""
        state, cfg = self.state, self.cfg
        step = state["step"]
        speed = self.examples_seen / max(self.train_seconds, 1e-9)
        loss = self.window_loss / max(self.window_count, 1)
        self.progress.update(self.bar, completed=step, loss=loss, speed=speed)
        if step % cfg.log_every_steps == 0:
            terms = {name: total / max(self.window_count, 1) for name, total in self.window_terms.items() if name != "total"}
            state["history"].append({"step": step, "loss": loss, "lr": self.scheduler.get_last_lr()[0], **terms})
            tracking.current().log_metrics(
                {f"{self.job.description}/{name}": value for name, value in state["history"][-1].items() if name != "step"}, step
            )
            # On a terminal the progress bar shows this; in a log file (nohup, CI, SLURM) a line does.
            log = logger.debug if self.progress.console.is_terminal else logger.info
            log("step %d/%d loss %.4f lr %.3g %.1f ex/s", step, self.total_steps, loss, self.scheduler.get_last_lr()[0], speed)
            self.window_loss, self.window_count, self.window_terms = 0.0, 0, {}
        if (self.eval_every and step % self.eval_every == 0) or step == self.total_steps:
            self._evaluate_and_keep_best()
        if step % cfg.checkpoint_every_steps == 0 and step < self.total_steps:
            self.checkpoints.save(state)
        if self.fault_step and step == self.fault_step:
            os.kill(os.getpid(), signal.SIGKILL)

    def _evaluate_and_keep_best(self) -> None:
        job, state = self.job, self.state
        if job.evaluate is None:
            return
        self.last_eval_step = state["step"]
        self.model.eval()
        with self.precision.autocast():  # dev scores in the precision the model is trained and kept in
            evaluation = job.evaluate(self.precision.inference_model(self.accelerator.unwrap_model(self.model)))
        self.model.train()
        metrics, reason = evaluation.metrics, evaluation.not_selectable_because
        self.last_metrics = metrics
        entry: dict[str, Any] = {"step": state["step"], "epoch": state["epoch"], **{f"eval_{k}": v for k, v in metrics.items()}}
        if reason:
            entry["not_selectable_because"] = reason
        state["history"].append(entry)
        tracking.current().log_metrics({f"{job.description}/eval_{k}": v for k, v in metrics.items()}, state["step"])
        logger.info("step %d: %s", state["step"], ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
        value = metrics[job.best_metric] if job.best_metric else None
        if not job.keep_best or value is None:
            return
        if reason:
            logger.warning("step %d cannot be kept as the best model: %s.", state["step"], reason)
        elif _improved(value, state["best"], job.greater_is_better):
            state["best"], state["best_metrics"] = value, {"step": state["step"], **metrics}
            self._save_model()

    def _save_model(self) -> None:
        if self.accelerator.is_main_process:
            _save_atomically(self.job.save_model, self.accelerator.unwrap_model(self.model), self.model_dir)
        self.accelerator.wait_for_everyone()

    def _save_on_interrupt(self) -> None:
        """Ctrl-C between updates keeps the progress made since the last periodic checkpoint."""
        if self.updating:
            return
        self.state["batches_done"] = self.consistent_batches_done
        self.checkpoints.save(self.state)
        logger.warning("Interrupted at step %d: state saved; run the same command again to resume.", self.state["step"])


def train(
    job: TrainingJob, cfg: TrainConfig, device: DeviceConfig, work_dir: Path, precision: Precision | None = None
) -> TrainOutcome:
    """Train ``job.model`` in ``work_dir``, resuming from a checkpoint found there.

    ``precision``: what forwards run in (default: what ``device.precision`` resolves to here).
    """
    return _TrainingLoop(job, cfg, device, work_dir, precision).run()


def _save_atomically(save_model: Callable[[torch.nn.Module, Path], None], model: torch.nn.Module, target: Path) -> None:
    partial = target.with_name(target.name + ".partial")
    if partial.exists():
        shutil.rmtree(partial)
    save_model(model, partial)
    if target.exists():
        shutil.rmtree(target)
    partial.rename(target)
