"""Experiment tracking: ``logger=tensorboard|mlflow|none``.

One tracker per ``kdrun`` run, opened by the CLI: it records the resolved config,
every training loop's logged losses and dev metrics (series named
``<stage description>/<name>`` so that stages never share a curve), the final
results, and the run's artefacts (results.json, plots, bit allocations). MLflow
writes to a local SQLite store by default (``<logger.dir>/mlflow.db``, browse with
``mlflow ui --backend-store-uri sqlite:///<logger.dir>/mlflow.db``), TensorBoard to event files
(``tensorboard --logdir <dir>``). Under DDP only the main rank logs.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

logger = logging.getLogger(__name__)

TRACKERS = ("none", "tensorboard", "mlflow")
ARTIFACT_SUFFIXES = (".json", ".png", ".svg", ".csv", ".md")


class Tracker(Protocol):
    def log_params(self, params: Mapping[str, Any]) -> None: ...
    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None: ...
    def log_artifact(self, path: Path) -> None: ...
    def close(self) -> None: ...


class NullTracker:
    def log_params(self, params: Mapping[str, Any]) -> None:
        pass

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        pass

    def log_artifact(self, path: Path) -> None:
        pass

    def close(self) -> None:
        pass


class TensorBoardTracker:
    def __init__(self, log_dir: Path):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(log_dir))

    def log_params(self, params: Mapping[str, Any]) -> None:
        table = "\n".join(f"    {key}: {value}" for key, value in sorted(params.items()))
        self.writer.add_text("config", table)

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        for name, value in metrics.items():
            self.writer.add_scalar(name, value, step)

    def log_artifact(self, path: Path) -> None:  # TensorBoard keeps no files: record where they are
        self.writer.add_text("artifacts", str(path))

    def close(self) -> None:
        self.writer.close()


class MlflowTracker:
    MAX_PARAM_LENGTH = 500  # MLflow's limit on a parameter value

    def __init__(self, store: Path, experiment: str, run_name: str):
        import mlflow

        self.mlflow = mlflow
        store = store.resolve()
        store.mkdir(parents=True, exist_ok=True)
        # A local SQLite store (MLflow 3 retired the plain-file store); artefacts as files beside it.
        mlflow.set_tracking_uri(tracking_uri(store))
        if mlflow.get_experiment_by_name(experiment) is None:
            mlflow.create_experiment(experiment, artifact_location=(store / "artifacts" / experiment).as_uri())
        mlflow.set_experiment(experiment)
        self.run = mlflow.start_run(run_name=run_name)

    def log_params(self, params: Mapping[str, Any]) -> None:
        self.mlflow.log_params({key: str(value)[: self.MAX_PARAM_LENGTH] for key, value in params.items()})

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        self.mlflow.log_metrics({_mlflow_name(k): float(v) for k, v in metrics.items()}, step=step)

    def log_artifact(self, path: Path) -> None:
        self.mlflow.log_artifact(str(path))

    def close(self) -> None:
        self.mlflow.end_run()


def tracking_uri(store: Path) -> str:
    """The MLflow URI of kdrun's local store in ``store`` (for ``mlflow ui --backend-store-uri``)."""
    return f"sqlite:///{Path(store).resolve() / 'mlflow.db'}"


def _mlflow_name(name: str) -> str:
    """MLflow allows letters, digits, ``_-. /``; stage descriptions contain spaces."""
    return "".join(c if c.isalnum() or c in "_-./" else "_" for c in name)


_current: Tracker = NullTracker()


def current() -> Tracker:
    """The run's tracker (a no-op outside a tracked run, e.g. in library use and tests)."""
    return _current


def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; lists stay values."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def create_tracker(name: str, directory: Path, experiment: str, run_name: str) -> Tracker:
    if name not in TRACKERS:
        raise ValueError(f"logger={name} is unknown; choose one of {TRACKERS}.")
    if name == "tensorboard":
        return TensorBoardTracker(directory / experiment / run_name)
    if name == "mlflow":
        return MlflowTracker(directory, experiment, run_name)
    return NullTracker()


@contextmanager
def tracking(name: str, directory: Path, experiment: str, run_name: str, config: Mapping[str, Any]) -> Iterator[Tracker]:
    """Open the run's tracker, make it :func:`current`, log the config; close it on exit."""
    global _current
    tracker = create_tracker(name, directory, experiment, run_name)
    tracker.log_params(flatten(config))
    _current = tracker
    try:
        yield tracker
    finally:
        _current = NullTracker()
        tracker.close()


def log_results(tracker: Tracker, record: Mapping[str, Any], results_file: Path, stage_dirs: list[Path]) -> None:
    """The final numbers as step-0 metrics, and the run's files as artefacts."""
    if isinstance(tracker, NullTracker):
        return
    final = {f"final/{k}": v for k, v in flatten({"dev": record.get("metrics") or {}, "efficiency": record.get("efficiency") or {}}).items()
             if isinstance(v, (int, float)) and not isinstance(v, bool)}
    if final:
        tracker.log_metrics(final, step=0)
    tracker.log_artifact(results_file)
    for directory in stage_dirs:
        for path in sorted(directory.glob("*")):
            if path.is_file() and path.suffix in ARTIFACT_SUFFIXES and path.name != "stage.json":
                tracker.log_artifact(path)
    logger.info("Tracked %d final numbers and the run's artefacts.", len(final))
