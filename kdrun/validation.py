"""Checks of a composed config that need no stage: what every run must satisfy before any compute."""

from __future__ import annotations

from omegaconf import DictConfig


def validate_config(cfg: DictConfig) -> None:
    """Raise ``kdrun.pipeline.PipelineError`` naming the first problem (filled in by issue 17's validation work)."""
