"""Composing kdrun's config in a test as the CLI does: Hydra's compose API on the package's ``conf/``,
with kdrun's schemas registered. One helper for every test module (``from composing import compose_config``)."""

from __future__ import annotations

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from kdrun.config import config_dir, register_configs


def compose_config(*overrides: str, hydra: bool = False) -> DictConfig:
    """The config of ``kdrun <overrides>``; ``hydra=True`` keeps the ``hydra`` node (run and sweep dirs)."""
    register_configs()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides), return_hydra_config=hydra)
