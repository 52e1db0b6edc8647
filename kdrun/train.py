"""The one training loop that every kdrun stage uses.

A stage describes *what* to train in a :class:`TrainingJob` (model, features, how
to compute the loss, how to evaluate and save); this module owns *how*: device
placement and DDP through accelerate, mixed precision (autocast over fp32 master
weights, ``kdrun/precision.py``), AdamW with linear warm-up and decay, gradient
accumulation and clipping, length-grouped batches, periodic dev evaluation keeping
the best model, and full-state checkpoints.

Resumption: every ``checkpoint_every_steps`` optimizer steps the full state
(model, optimizer, scheduler, every RNG, epoch and batch position, step, best
score, history, the evaluation still due) is written to ``<work_dir>/checkpoint``
atomically. Running the same job again with the same ``work_dir`` (which is what
re-running the same ``kdrun`` command does) restores it and continues with exactly
the batches that had not been trained on, so the result is bit-identical to an
uninterrupted run, whatever the interruption:

* ``kill -9`` anywhere (a step, an evaluation, a checkpoint or best-model save):
  the last complete checkpoint is replayed from, and every write is atomic;
* Ctrl-C: the step under way finishes, a checkpoint of the state between two
  steps is written (so no RNG draw of a half-done step leaks into it), and the
  loop stops. During a dev evaluation Ctrl-C stops at once; the evaluation is
  recorded as due and is the first thing a resumed run does. A second Ctrl-C
  stops at once, keeping the last checkpoint;
* a finished loop leaves ``outcome.json``: running it again returns that.
"""

from __future__ import annotations

import contextlib
import dataclasses
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

# Test hook: ``<kill|interrupt>@<point>:<step>[:<loop>]`` sends the process SIGKILL (like ``kill -9``) or SIGINT
# (Ctrl-C) at one of FAULT_POINTS of that optimizer step of the first loop whose description starts with <loop>
# (any loop when omitted), e.g. ``kill@step:40`` or ``interrupt@eval:60:task_distill step 2``.
FAULT_ENV = "KDRUN_FAULT"
FAULT_POINTS = (
    "step",  # right after the optimizer step
    "forward",  # in the forward pass of the next step (the RNG partly used by it)
    "eval",  # inside the dev evaluation at this step
    "checkpoint",  # inside the checkpoint write at this step (its files written, not yet published)
    "save_best",  # inside the best-model save at this step (written, not yet published)
)
OUTCOME_FILE = "outcome.json"


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
    if accelerator.device.type == "cpu":
        # What free_memory does, without its gc.collect and device-cache flush: they free nothing on a CPU and
        # take a third of a second in a process that holds many objects (a sweep, the test suite).
        accelerator._schedulers, accelerator._optimizers, accelerator._models, accelerator._dataloaders = [], [], [], []
        accelerator.step = 0
    else:
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

    def __init__(self, accelerator: Accelerator, work_dir: Path, description: str = ""):
        self.accelerator = accelerator
        self.description = description  # the loop's, for fault injection
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
            _inject_fault("checkpoint", progress["step"], self.description)
            # progress.json is what marks a checkpoint complete: written last, atomically.
            _write_json_atomically(self.partial / "progress.json", progress)
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


def _write_json_atomically(path: Path, value: Any) -> None:
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_text(json.dumps(value, default=str))
    os.replace(temporary, path)


def _inject_fault(point: str, step: int, loop: str) -> None:
    """Fault injection for the tests (``KDRUN_FAULT``, see FAULT_POINTS); free when unset."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    action, _, where = spec.partition("@")
    fault_point, fault_step, fault_loop = (where.split(":", 2) + [""])[:3]
    if fault_point == point and int(fault_step) == step and loop.startswith(fault_loop):
        os.environ.pop(FAULT_ENV)  # once per process, like a real fault
        os.kill(os.getpid(), signal.SIGKILL if action == "kill" else signal.SIGINT)


def _rng_state() -> dict[str, Any]:
    """Every RNG a training step may draw from (dropout, masking, sampling)."""
    import random

    import numpy as np

    state: dict[str, Any] = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    import random

    import numpy as np

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])


class _CtrlC:
    """Ctrl-C (SIGINT) while training: honoured at the next point between two steps, not in the middle of one.

    A step interrupted half-way has drawn from the RNG and accumulated gradients
    that no checkpoint can describe, and an interrupted save could record a best
    model that was never written. So the first Ctrl-C is only noted (the step, its
    evaluation and saves finish), and the loop stops at the next safe point. Inside
    ``immediate()`` (a dev evaluation, which changes no state) it stops at once. A
    second Ctrl-C stops at once anywhere, keeping the last complete checkpoint.
    Outside the main thread (where Python delivers no signals) this does nothing.
    """

    def __init__(self, description: str):
        self.description = description
        self.requested = False
        self._immediate = False
        self._previous: Any = None

    def __enter__(self) -> "_CtrlC":
        import threading

        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested or self._immediate:
            self.requested = True
            raise KeyboardInterrupt
        self.requested = True
        logger.warning("%s: Ctrl-C: stopping after this step (press Ctrl-C again to stop at once).", self.description)

    @contextlib.contextmanager
    def immediate(self) -> Any:
        self._immediate = True
        try:
            if self.requested:
                raise KeyboardInterrupt
            yield
        finally:
            self._immediate = False


class _Interrupted(KeyboardInterrupt):
    """Raised at a safe point after Ctrl-C, once the state is checkpointed."""


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


def _fresh_state() -> dict[str, Any]:
    """What a checkpoint adds to the model, optimizer, scheduler and RNG states: everything else a later step,
    a later evaluation or the outcome depends on."""
    return {
        "step": 0,
        "epoch": 0,
        "batches_done": 0,  # in the current epoch
        "best": None,
        "best_metrics": None,
        "history": [],
        "evaluated_step": -1,  # the step of the last completed evaluation
        "eval_due": None,  # a step whose evaluation was interrupted: redone first on resume
        "last_metrics": {},
        # Loss averaged over log_every_steps: its partial sums, so the logged history is the same after a resume.
        "window": {"loss": 0.0, "count": 0, "terms": {}},
    }


class _TrainingLoop:
    """One call of :func:`train`: the prepared objects, the resumable ``state`` and the loop over it."""

    def __init__(self, job: TrainingJob, cfg: TrainConfig, device: DeviceConfig, work_dir: Path, precision: Precision | None = None):
        work_dir.mkdir(parents=True, exist_ok=True)
        self.job, self.cfg, self.precision = job, cfg, precision or resolve_precision(device)
        self.work_dir = work_dir
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
        self.checkpoints = _Checkpoints(self.accelerator, work_dir, job.description)
        self.model_dir = work_dir / "model"
        self.eval_every = cfg.eval_every_steps  # None: only at the end of each epoch
        self.state = _fresh_state()
        found = self.checkpoints.latest()
        if found is not None:
            self.state = {**_fresh_state(), **self.checkpoints.load(found)}
            logger.info("Resuming %s from step %d/%d (%s).", job.description, self.state["step"], self.total_steps, found)
        self.resumed_from = self.state["step"]
        self.checkpointed_step = self.state["step"] if found is not None else -1
        self.examples_seen, self.tokens_seen, self.train_seconds = 0, 0, 0.0
        self.ctrl_c = _CtrlC(job.description)
        self.progress = _progress_bar(self.accelerator.is_local_main_process)
        self.bar: Any = None

    def run(self) -> TrainOutcome:
        self.model.train()
        with self.ctrl_c, self.progress:
            self.bar = self.progress.add_task(
                self.job.description, total=self.total_steps, completed=self.state["step"], loss=0.0, speed=0.0
            )
            if self.state["eval_due"] is not None:  # interrupted during an evaluation: it comes first
                self._evaluate_and_keep_best()
            while self.state["step"] < self.total_steps:
                self._epoch()
            self._finish()
        return self._outcome()

    def _finish(self) -> None:
        state = self.state
        if self.job.keep_best and state["best_metrics"] is None and any("not_selectable_because" in h for h in state["history"]):
            # Every evaluation was ruled out: the last step's model is kept, and its scores reported as such.
            logger.warning("%s: no evaluation could be kept as the best model; keeping the last step's.", self.job.description)
            self._save_model()
            state["best_metrics"] = {"step": state["step"], **state["last_metrics"]}
        elif state["best_metrics"] is None or not self.job.keep_best or not self.model_dir.exists():
            self._save_model()
        if self.accelerator.is_main_process:
            record = {k: v for k, v in dataclasses.asdict(self._outcome()).items() if k != "model_dir"}
            _write_json_atomically(self.work_dir / OUTCOME_FILE, record)
        self.accelerator.wait_for_everyone()
        self.checkpoints.remove()

    def _outcome(self) -> TrainOutcome:
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
        # Through the loader, not the sampler alone: accelerate's loader sets its own epoch counter on the sampler
        # at each pass, and that counter restarts at 0 in a resumed process.
        self.loader.set_epoch(state["epoch"])
        self.sampler.set_epoch(state["epoch"])
        skip = state["batches_done"]
        batches = accelerator.skip_first_batches(self.loader, skip) if skip else self.loader
        started = time.perf_counter()
        window = state["window"]
        for batch_index, batch in enumerate(batches, start=skip):
            is_update = (batch_index + 1) % cfg.grad_accum_steps == 0 or batch_index + 1 == len(self.loader)
            with accelerator.no_sync(self.model) if not is_update else contextlib.nullcontext():
                with self.precision.training_forward():  # forwards in low precision; loss terms cast to fp32 themselves
                    output = self.job.compute_loss(self.model, batch)
                    _inject_fault("forward", state["step"], self.job.description)
                loss, terms = output if isinstance(output, tuple) else (output, {})
                loss = loss.float()
                scaled = loss / cfg.grad_accum_steps
                accelerator.backward(self.scaler.scale(scaled) if self.scaler is not None else scaled)
            window["loss"] += float(loss.detach())
            window["count"] += 1
            for name, value in terms.items():
                window["terms"][name] = window["terms"].get(name, 0.0) + value
            self.examples_seen += int(batch["input_ids"].shape[0]) * accelerator.num_processes
            if "attention_mask" in batch:
                self.tokens_seen += int(batch["attention_mask"].sum()) * accelerator.num_processes
            if not is_update:
                continue
            self._update()
            state["batches_done"] = batch_index + 1
            self.train_seconds += time.perf_counter() - started
            self._after_update()
            started = time.perf_counter()
            if state["step"] >= self.total_steps:
                return
        state["epoch"] += 1
        state["batches_done"] = 0
        if state["evaluated_step"] != state["step"]:  # every epoch ends with an evaluation
            self._evaluate_and_keep_best()
        self._stop_if_interrupted()

    def _update(self) -> None:
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

    def _after_update(self) -> None:
        """Progress, logging, evaluation and checkpoints: everything that is not training time."""
        state, cfg = self.state, self.cfg
        step = state["step"]
        _inject_fault("step", step, self.job.description)
        window = state["window"]
        speed = self.examples_seen / max(self.train_seconds, 1e-9)
        loss = window["loss"] / max(window["count"], 1)
        self.progress.update(self.bar, completed=step, loss=loss, speed=speed)
        if step % cfg.log_every_steps == 0:
            terms = {name: total / max(window["count"], 1) for name, total in window["terms"].items() if name != "total"}
            state["history"].append({"step": step, "loss": loss, "lr": self.scheduler.get_last_lr()[0], **terms})
            tracking.current().log_metrics(
                {f"{self.job.description}/{name}": value for name, value in state["history"][-1].items() if name != "step"}, step
            )
            # On a terminal the progress bar shows this; in a log file (nohup, CI, SLURM) a line does.
            log = logger.debug if self.progress.console.is_terminal else logger.info
            log("step %d/%d loss %.4f lr %.3g %.1f ex/s", step, self.total_steps, loss, self.scheduler.get_last_lr()[0], speed)
            window.update(loss=0.0, count=0, terms={})
        if (self.eval_every and step % self.eval_every == 0) or step == self.total_steps:
            self._evaluate_and_keep_best()
        if step % cfg.checkpoint_every_steps == 0 and step < self.total_steps:
            self._checkpoint()
        self._stop_if_interrupted()

    def _checkpoint(self) -> None:
        self.checkpoints.save(self.state)
        self.checkpointed_step = self.state["step"]

    def _stop_if_interrupted(self) -> None:
        """At a point between two steps: after Ctrl-C, checkpoint this state and stop."""
        requested = self.ctrl_c.requested
        if self.accelerator.num_processes > 1:  # every rank stops at the same step
            flag = torch.tensor([int(requested)], device=self.accelerator.device)
            requested = bool(self.accelerator.reduce(flag, reduction="max").item())
        if not requested:
            return
        if self.checkpointed_step != self.state["step"] or self.state["eval_due"] is not None:
            self._checkpoint()
        logger.warning("Interrupted at step %d: state saved; run the same command again to resume.", self.state["step"])
        raise _Interrupted

    def _evaluate_and_keep_best(self) -> None:
        job, state = self.job, self.state
        if job.evaluate is None:
            return
        state["eval_due"] = state["step"]
        rng = _rng_state()  # what the checkpoint must hold if the evaluation is interrupted
        self.model.eval()
        try:
            with self.ctrl_c.immediate(), self.precision.autocast():  # dev scores in the precision the model is trained in
                evaluation = job.evaluate(self.precision.inference_model(self.accelerator.unwrap_model(self.model)))
                _inject_fault("eval", state["step"], job.description)
        except KeyboardInterrupt:
            _set_rng_state(rng)
            self._checkpoint()
            logger.warning(
                "Interrupted during the evaluation at step %d: state saved; it is redone first when the same command runs again.",
                state["step"],
            )
            raise _Interrupted from None
        finally:
            self.model.train()
        metrics, reason = evaluation.metrics, evaluation.not_selectable_because
        entry: dict[str, Any] = {"step": state["step"], "epoch": state["epoch"], **{f"eval_{k}": v for k, v in metrics.items()}}
        if reason:
            entry["not_selectable_because"] = reason
        tracking.current().log_metrics({f"{job.description}/eval_{k}": v for k, v in metrics.items()}, state["step"])
        logger.info("step %d: %s", state["step"], ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
        value = metrics[job.best_metric] if job.best_metric else None
        if job.keep_best and value is not None:
            if reason:
                logger.warning("step %d cannot be kept as the best model: %s.", state["step"], reason)
            elif _improved(value, state["best"], job.greater_is_better):
                self._save_model()  # first: a best score is recorded only for weights that are on disk
                state["best"], state["best_metrics"] = value, {"step": state["step"], **metrics}
        state["history"].append(entry)
        state["last_metrics"] = metrics
        state["evaluated_step"] = state["step"]
        state["eval_due"] = None

    def _save_model(self) -> None:
        if self.accelerator.is_main_process:
            model = self.accelerator.unwrap_model(self.model)
            _save_atomically(self.job.save_model, model, self.model_dir, lambda: _inject_fault("save_best", self.state["step"], self.job.description))
        self.accelerator.wait_for_everyone()


def train(
    job: TrainingJob, cfg: TrainConfig, device: DeviceConfig, work_dir: Path, precision: Precision | None = None
) -> TrainOutcome:
    """Train ``job.model`` in ``work_dir``, resuming from a checkpoint found there.

    ``precision``: what forwards run in (default: what ``device.precision`` resolves to here).
    When ``work_dir`` holds the outcome of a finished loop (a re-run after an interruption
    later in the stage), that outcome is returned without training again.
    """
    done = work_dir / OUTCOME_FILE
    if done.is_file():
        logger.info("%s: already trained in %s.", job.description, work_dir)
        return TrainOutcome(**{**json.loads(done.read_text()), "model_dir": work_dir / "model"})
    return _TrainingLoop(job, cfg, device, work_dir, precision).run()


def _save_atomically(
    save_model: Callable[[torch.nn.Module, Path], None], model: torch.nn.Module, target: Path, written: Callable[[], None]
) -> None:
    """Write the new model beside the old one, then swap: at every instant one complete model is on disk
    (``target``, or ``<target>.previous`` during the swap)."""
    partial = target.with_name(target.name + ".partial")
    previous = target.with_name(target.name + ".previous")
    if partial.exists():
        shutil.rmtree(partial)
    save_model(model, partial)
    written()
    if target.exists():
        if previous.exists():
            shutil.rmtree(previous)
        target.rename(previous)
    partial.rename(target)
    if previous.exists():
        shutil.rmtree(previous)
