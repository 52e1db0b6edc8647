"""``results.json``: every number a run reports, next to its resolved config.

Reports and paper tables are rebuilt from these files alone, so the record
carries the choices that identify the run (experiment, task, scale, overrides)
together with each stage's summary and cache status.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from kdrun import __version__
from kdrun.pipeline import StageOutput

RESULTS_FILE = "results.json"


def build_results(cfg: DictConfig, outputs: dict[str, StageOutput], overrides: list[str]) -> dict[str, Any]:
    record: dict[str, Any] = {
        "kdrun_version": __version__,
        "experiment": cfg.experiment_name,
        # The experiment without its task (tinybert_mrpc -> tinybert): a row key across tasks.
        "recipe": cfg.experiment_name.removesuffix(f"_{cfg.task.name}"),
        "task": cfg.task.name,
        "ablation": cfg.ablation,
        "scale": cfg.scale,
        "choices": {group: OmegaConf.select(cfg, f"{group}.name") for group in ("teacher", "student", "distill", "augment", "quantize", "device")},
        "overrides": overrides,
        "report": OmegaConf.to_container(cfg.report, resolve=True),
        "stages": {
            name: {"key": out.key, "cache": out.cache, "path": str(out.path), "seconds": round(out.seconds, 2), "summary": out.summary}
            for name, out in outputs.items()
        },
    }
    if "evaluate" in outputs:
        evaluation = outputs["evaluate"].summary
        record.update(metrics=evaluation["dev"], main_metric=evaluation["main_metric"], main_score=evaluation["main_score"], efficiency=evaluation["efficiency"])
        record["predicts_one_class"] = evaluation.get("predicts_one_class")
        record["precision"] = evaluation["efficiency"].get("precision")
        record["deployment"] = evaluation.get("deployment", {})
    return record


def write_results(record: dict[str, Any], run_dir: Path) -> Path:
    path = run_dir / RESULTS_FILE
    path.write_text(json.dumps(record, indent=2, default=str))
    return path
