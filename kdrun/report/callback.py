"""Hydra callback: after every multirun, render the sweep's table into its directory.

Registered in conf/config.yaml (``hydra.callbacks.report``), so ``kdrun -m ...``
ends with the table in the terminal and ``summary.{csv,md,tex}`` plus plots in
the sweep directory, whichever launcher ran the jobs. A job that failed simply
has no results.json and is left out.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

logger = logging.getLogger(__name__)


class SweepReport(Callback):
    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from kdrun.report import ReportError, load_runs, write_report

        sweep_dir = Path(config.hydra.sweep.dir)
        try:
            runs = load_runs([sweep_dir]) if sweep_dir.is_dir() else []
            if not runs:
                logger.warning("No results.json under %s: no sweep table.", sweep_dir)
                return
            try:
                written = write_report(runs, sweep_dir)
            except ReportError as error:  # e.g. an unknown reference table: still render the measured numbers
                logger.warning("%s Rendering without published numbers.", error)
                written = write_report(runs, sweep_dir, {"reference": ""})
        except ReportError as error:
            logger.warning("Sweep table not rendered: %s", error)
            return
        logger.info("Sweep table (%d runs): %s", len(runs), ", ".join(str(p) for p in written.values()))
