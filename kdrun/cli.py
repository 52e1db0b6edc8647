"""The ``kdrun`` command: a Hydra app over ``conf/``. Nothing imports this module."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from kdrun.config import register_configs

logger = logging.getLogger("kdrun")


def config_dir() -> str:
    """``conf/`` beside the package in a source checkout, or inside it in an installed wheel."""
    package = Path(__file__).resolve().parent
    for candidate in (package.parent / "conf", package / "conf"):
        if (candidate / "config.yaml").is_file():
            return str(candidate)
    raise FileNotFoundError(f"kdrun's config tree (conf/config.yaml) was not found next to {package}.")


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


def _user_errors() -> tuple[type[BaseException], ...]:
    from kdrun.data.corpus import CorpusNotFound
    from kdrun.data.glue import GlueDataNotFound, GlueFormatError
    from kdrun.data.tasks import UnknownTaskError
    from kdrun.distill.mapping import LayerMappingError
    from kdrun.models.loading import ModelSetupError
    from kdrun.pipeline import PipelineError

    return (
        CorpusNotFound, GlueDataNotFound, GlueFormatError, LayerMappingError, ModelSetupError, PipelineError,
        UnknownTaskError,
    )


register_configs()


@hydra.main(config_path=config_dir(), config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    # Heavy imports only after Hydra has validated the config, so `--cfg job` and config errors are instant.
    from kdrun.pipeline import run_pipeline
    from kdrun.config import to_container
    from kdrun.results import build_results, write_results
    from kdrun.tracking import log_results, tracking

    _quiet_libraries()
    if cfg.device.threads:
        import torch

        torch.set_num_threads(cfg.device.threads)
    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    is_main = int(os.environ.get("RANK", "0")) == 0  # under DDP every rank runs the pipeline; one writes
    tracker_name = cfg.logger.name if is_main else "none"
    run_name = f"{cfg.experiment_name}-{cfg.ablation}-{run_dir.name}"
    with tracking(tracker_name, Path(cfg.logger.dir), cfg.experiment_name, run_name, to_container(cfg)) as tracker:
        try:
            outputs = run_pipeline(cfg, run_dir)
        except _user_errors() as error:
            logger.error("%s", error)
            sys.exit(2)
        record = build_results(cfg, outputs, list(hydra_cfg.overrides.task))
        if is_main:
            path = write_results(record, run_dir)
            logger.info("Results written to %s", path)
            log_results(tracker, record, path, [out.path for out in outputs.values() if out.path != run_dir])
    return record.get("main_score")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
