"""The ``kdrun`` command: a Hydra app over ``conf/``. Nothing imports this module."""

from __future__ import annotations

import base64
import functools
import hashlib
import logging
import os
import secrets
import socket
import sys
import time
from datetime import datetime
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from kdrun.config import config_dir, register_configs
from kdrun.recipes import ablation_problem

logger = logging.getLogger("kdrun")

RUN_ID_RESOLVER = "kdrun_run_id"
LAUNCH_VALUE_RESOLVER = "kdrun_launch_value"


def _quiet_libraries() -> None:
    """kdrun shows its own progress bars; the libraries' per-call bars and load reports are noise."""
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    for name in ("accelerate", "accelerate.accelerator", "accelerate.checkpointing"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # Checkpoints of models with tied embeddings (MLM heads) drop the duplicate tensor; expected.
    logging.getLogger("accelerate.utils.other").setLevel(logging.ERROR)


@functools.cache
def run_id() -> str:
    """This launch's name, ``<start time>_<suffix>`` (``2026-12-02_21-30-08_k3x9qa``): run and sweep directories
    end in it (``${kdrun_run_id:}`` in conf/config.yaml), so they sort by time yet never collide, and
    results.json records it so that a run never replaces another run's file.

    A plain process uses the current time, and hashes that time in nanoseconds, its pid, the host and random
    bytes into the suffix: runs started in the same second, or the same microsecond, still differ.
    Under a distributed launcher every rank runs this same Hydra app and must name the same directory, so
    ranks use what they share, the launcher process that started them all (torchrun's agent; ``accelerate
    launch`` runs that agent in-process): its start time is the name's time, and its pid and start time, with
    the host and ``TORCHELASTIC_RUN_ID``, make the suffix. Ranks the launcher restarts after a failure return
    to the same directory; two launches differ by pid even in the same second. Launchers on several nodes
    start at different moments and would name different directories: there, set ``hydra.run.dir``.

    One value per process (cached); the OmegaConf resolver caches it per config too, and Hydra copies that
    cache into every job's config, joblib and submitit workers included, so a sweep's jobs agree on its directory.
    """
    launcher = _distributed_launcher()
    if launcher is not None:
        started, identity = launcher
    else:
        started, identity = time.time(), f"{time.time_ns()}|{os.getpid()}|{secrets.token_hex(8)}"
    digest = hashlib.blake2b(f"{socket.gethostname()}|{identity}".encode(), digest_size=5).digest()
    suffix = base64.b32encode(digest).decode().lower()[:6]
    return f"{datetime.fromtimestamp(started):%Y-%m-%d_%H-%M-%S}_{suffix}"


def _distributed_launcher() -> tuple[float, str] | None:
    """(start time, identity) of the launcher process that started this rank, or None outside a multi-process
    launch (``WORLD_SIZE`` unset or 1: a lone process names its directory itself)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    import psutil  # a dependency of accelerate

    try:
        parent = psutil.Process(os.getppid())
        started = parent.create_time()
    except psutil.Error as error:
        logger.warning("Cannot read the launcher process (%s): ranks may write to different run directories; "
                       "set hydra.run.dir to share one.", error)
        return None
    return started, f"{os.environ.get('TORCHELASTIC_RUN_ID', 'none')}|{parent.pid}|{started}"


def register_resolvers() -> None:
    """The resolvers of conf/config.yaml's run and sweep directories.

    ``${kdrun_run_id:}`` names the launch (:func:`run_id`). ``${kdrun_launch_value:${experiment_name}}`` is
    ``experiment_name`` as the sweep's own config resolved it: OmegaConf caches a resolver's value by the
    text of its arguments and Hydra copies the sweep's cache into every job's config, so all jobs of a
    sweep over ``experiment=a,b`` share one sweep directory (``default``, the sweep config's name) instead
    of each writing into its experiment's, where the sweep's table would never find them.
    """
    OmegaConf.register_new_resolver(RUN_ID_RESOLVER, run_id, use_cache=True, replace=True)
    OmegaConf.register_new_resolver(LAUNCH_VALUE_RESOLVER, lambda value: value, use_cache=True, replace=True)


def _user_errors() -> tuple[type[BaseException], ...]:
    """Errors whose message says what to change: shown as one line, without a traceback."""
    from kdrun.data.corpus import CorpusNotFound
    from kdrun.data.glue import GlueDataNotFound, GlueFormatError
    from kdrun.data.tasks import UnknownTaskError
    from kdrun.distill.mapping import LayerMappingError
    from kdrun.models.loading import ModelSetupError
    from kdrun.pipeline import PipelineError
    from kdrun.results import ResultsConflict

    return (
        CorpusNotFound, GlueDataNotFound, GlueFormatError, LayerMappingError, ModelSetupError, PipelineError,
        ResultsConflict, UnknownTaskError,
    )


def _is_user_error(error: BaseException) -> bool:
    try:
        return isinstance(error, _user_errors())
    except Exception:  # noqa: BLE001 - kdrun's own modules do not import: that is no user error
        return False


def _is_main_rank() -> bool:
    """Under DDP every rank runs the pipeline; rank 0 writes results.json and tracks."""
    return int(os.environ.get("RANK", "0")) == 0


register_configs()
register_resolvers()


@hydra.main(config_path=config_dir(), config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    """One run, or one job of a sweep: run the pipeline and write results.json.

    A single run stops on a user error with its message and exit code 2, and lets anything else raise. A
    sweep job that fails (any Exception) is logged and recorded as a failed results.json, then returns, so
    that the other jobs finish and the sweep's table shows the failure; the sweep callback
    (kdrun.report.callback.SweepReport) then ends the process with a non-zero exit code. KeyboardInterrupt is
    no Exception: Ctrl-C still stops a sweep.
    """
    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    overrides = list(hydra_cfg.overrides.task)
    misplaced_ablation = ablation_problem(cfg)
    if hydra_cfg.mode != RunMode.MULTIRUN:
        if misplaced_ablation:
            logger.error("%s", misplaced_ablation)
            sys.exit(2)
        try:
            return _run(cfg, run_dir, overrides, run_id())
        except _user_errors() as error:
            logger.error("%s", error)
            sys.exit(2)
    # A sweep job: its own id within the launch, since a worker process may run several jobs.
    job_id = f"{run_id()}#{hydra_cfg.job.num}"
    if misplaced_ablation:  # 'ablation=glob(*)' also lists other recipes' rows: not this recipe's table
        _record_skipped_job(cfg, run_dir, overrides, job_id, misplaced_ablation)
        return None
    try:
        return _run(cfg, run_dir, overrides, job_id)
    except Exception as error:
        _record_failed_job(cfg, run_dir, overrides, job_id, error)
        return None


def _run(cfg: DictConfig, run_dir: Path, overrides: list[str], record_id: str) -> float | None:
    """Run the pipeline into ``run_dir``; the main rank writes results.json and tracks. Returns the main score."""
    # Heavy imports only after Hydra has validated the config, so `--cfg job` and config errors are instant.
    from kdrun.config import to_container
    from kdrun.pipeline import run_pipeline
    from kdrun.results import build_results, check_results_dir, write_results
    from kdrun.tracking import log_results, tracking

    check_results_dir(run_dir, record_id)  # before any work: a clash costs nothing
    _quiet_libraries()
    if cfg.device.threads:
        import torch

        torch.set_num_threads(cfg.device.threads)
    _default_corpus(cfg)
    is_main = _is_main_rank()
    tracker_name = cfg.logger.name if is_main else "none"
    run_name = f"{cfg.experiment_name}-{cfg.ablation}-{run_dir.name}"
    with tracking(tracker_name, Path(cfg.logger.dir), cfg.experiment_name, run_name, to_container(cfg)) as tracker:
        outputs = run_pipeline(cfg, run_dir)
        record = build_results(cfg, outputs, overrides, record_id)
        if is_main:
            path = write_results(record, run_dir)
            logger.info("Results written to %s", path)
            log_results(tracker, record, path, [out.path for out in outputs.values() if out.path != run_dir])
    return record.get("main_score")


def _default_corpus(cfg: DictConfig) -> None:
    """A run whose stages need a corpus and that sets none streams :data:`DEFAULT_HUB_CORPUS` when the hub is
    reachable, and says so; offline, ``data.corpus`` stays unset and the stage's check explains how to set it.
    Set before planning, so that the cache keys name the corpus actually used."""
    from kdrun.data.corpus import default_corpus
    from kdrun.pipeline import registered_stages

    stages = registered_stages()
    needs_corpus = any("corpus" in stages[name].sources for name in cfg.pipeline.stages if name in stages)
    if cfg.data.corpus or not needs_corpus:
        return
    corpus = default_corpus(cfg.data.corpus)
    if corpus:
        logger.info("data.corpus is not set (nor KDRUN_CORPUS): general distillation streams %s from the "
                    "Hugging Face hub. Set data.corpus=/path/to/corpus.txt to use a local corpus.", corpus)
        cfg.data.corpus = corpus


def _record_skipped_job(cfg: DictConfig, run_dir: Path, overrides: list[str], record_id: str, reason: str) -> None:
    """A sweep job that does not apply (another recipe's ablation): a ``skipped`` results.json, which tables
    leave out and which does not fail the sweep."""
    from kdrun.results import build_skipped, write_results

    logger.info("Job %s skipped: %s", run_dir, reason)
    if _is_main_rank():
        write_results(build_skipped(cfg, overrides, record_id, reason), run_dir)


def _record_failed_job(cfg: DictConfig, run_dir: Path, overrides: list[str], record_id: str, error: Exception) -> None:
    """Log a failed sweep job (a user error as its message, anything else with its traceback, which goes to the
    job's log file) and leave a failed results.json for the sweep's table.

    When even that record cannot be written (the directory holds another run's results.json, a full disk),
    the error is raised again: Hydra then marks the job failed and the sweep ends with an error, rather than
    with a table that does not know about this job.
    """
    from kdrun.results import build_failure, write_results

    user_error = _is_user_error(error)
    if user_error:
        logger.error("Job %s failed: %s", run_dir, error)
    else:
        logger.error("Job %s failed: %s: %s", run_dir, type(error).__name__, error, exc_info=error)
    if not _is_main_rank():
        return
    try:
        path = write_results(build_failure(cfg, overrides, record_id, error, user_error), run_dir)
    except Exception as problem:
        logger.error("The failure could not be recorded in %s: %s", run_dir, problem)
        raise error from problem
    logger.info("Failure recorded in %s", path)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # `python -m kdrun.cli` runs the imported module's main, as the `kdrun` script does: joblib pickles the task
    # function and the config resolvers (run_id) by module name, and a worker's __main__ is not this file.
    from kdrun.cli import main as kdrun_main

    kdrun_main()
