"""Hydra callback: after every multirun, render the sweep's table into its directory.

Registered in conf/config.yaml (``hydra.callbacks.report``), so ``kdrun -m ...``
ends with the table in the terminal and ``summary.{csv,md,tex}`` plus plots in
the sweep directory, whichever launcher ran the jobs. A job that failed wrote a
results.json with ``status: failed`` (kdrun.cli) and shows as ``failed`` in the
table; a job killed before writing one is reported as failed too.

When any job failed, the callback ends the process with exit code 1 after the
table is written, so that scripts and CI notice. It raises SystemExit because
Hydra turns an Exception from a callback into a warning (exit code 0), while
SystemExit passes through Hydra to the interpreter.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

logger = logging.getLogger(__name__)

FAILED_SWEEP_EXIT_CODE = 1


class SweepReport(Callback):
    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from kdrun.report import load_runs
        from kdrun.report.runs import failed_jobs, sweep_jobs

        sweep_dir = Path(config.hydra.sweep.dir)
        if not sweep_dir.is_dir():
            logger.warning("The sweep directory %s does not exist: no jobs ran, no sweep table.", sweep_dir)
            return
        runs = load_runs([sweep_dir])
        try:
            render_sweep(runs, sweep_dir)
        except Exception:  # noqa: BLE001 - a broken table must not hide failed jobs (below)
            logger.exception("The sweep table could not be rendered; `python -m kdrun.report %s` tries again.", sweep_dir)
        failures = failed_jobs(sweep_dir, runs)
        if failures:
            jobs = len(sweep_jobs(sweep_dir, runs))
            details = "\n".join(f"  {job}: {error}" for job, error in failures.items())
            logger.error("%d of %d jobs failed (exit code %d); job directory: error\n%s", len(failures), jobs, FAILED_SWEEP_EXIT_CODE, details)
            raise SystemExit(FAILED_SWEEP_EXIT_CODE)


def render_sweep(runs: list[dict[str, Any]], sweep_dir: Path) -> None:
    """Print the sweep's table and write summary.* into ``sweep_dir``; a table that cannot be rendered is a
    warning, never an error: the jobs' results.json files are the record, and ``python -m kdrun.report``
    renders them again."""
    from kdrun.report import ReportError, write_report

    if not runs:
        logger.warning("No results.json under %s: no sweep table.", sweep_dir)
        return
    try:
        try:
            written = write_report(runs, sweep_dir)
        except ReportError as error:  # e.g. an unknown reference table: still render the measured numbers
            logger.warning("%s Rendering without published numbers.", error)
            written = write_report(runs, sweep_dir, {"reference": ""})
    except ReportError as error:
        logger.warning("Sweep table not rendered: %s", error)
        return
    logger.info("Sweep table (%d runs): %s", len(runs), ", ".join(str(p) for p in written.values()))
