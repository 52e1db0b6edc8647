"""Recipes: one experiment file per method, and the ``<recipe>_<task>`` names users type.

Each file ``conf/experiment/<recipe>.yaml`` that sets ``recipe:`` is one recipe for every GLUE task
(``kdrun experiment=tinybert task=mrpc``). The names of the papers' commands, ``experiment=tinybert_mrpc``,
are registered here in code, in Hydra's ConfigStore, as aliases: each selects its recipe and overrides the
task. Nothing is copied per task, so a recipe changes in one place and a new task (a file in ``conf/task``)
gets its aliases for free.

A recipe lists the ablations that apply to it (``ablations:``): ``ablation=no_attn`` on Q-BERT is an error
before any compute, not a relabelled copy of the full recipe. In a sweep over ``'ablation=glob(*)'`` the jobs
whose ablation belongs to another recipe are skipped (recorded as such, not failed), so the literal command
``kdrun -m experiment=tinybert_mrpc 'ablation=glob(*)'`` runs the recipe's own rows.

This module imports neither torch nor any stage: config composition must stay instant.
"""

from __future__ import annotations

from pathlib import Path

import yaml
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig

EXPERIMENT_GROUP = "experiment"
TASK_GROUP = "task"
# ``conf/budget/<scale>_<recipe>.yaml``: a recipe's budget at a scale where it differs from the scale's.
# conf/config.yaml selects ``budget: ${scale}_${experiment}`` (optional), after the experiment.
BUDGET_GROUP = "budget"
NO_ABLATION = "none"


class AblationNotInRecipe(ValueError):
    """``ablation=<row>`` names a row of another recipe's table; the message lists the recipe's own rows."""


def recipe_names(conf_dir: Path) -> list[str]:
    """The recipes of ``conf/experiment``: the files that declare ``recipe: <their own name>``."""
    names = []
    for path in sorted((conf_dir / EXPERIMENT_GROUP).glob("*.yaml")):
        declared = (yaml.safe_load(path.read_text()) or {}).get("recipe")
        if declared == path.stem:
            names.append(path.stem)
    return names


def task_names(conf_dir: Path) -> list[str]:
    return sorted(path.stem for path in (conf_dir / TASK_GROUP).glob("*.yaml"))


def alias(recipe: str, task: str) -> str:
    return f"{recipe}_{task}"


def register_aliases(conf_dir: Path) -> list[str]:
    """Register ``<recipe>_<task>`` for every recipe and task as an experiment option; returns their names.

    An alias's defaults list is the recipe's file followed by ``override /task: <task>``: composing it is
    composing ``experiment=<recipe> task=<task>``, so a user's ``task=...`` on the command line still wins.
    The recipe's budgets get the alias's name too (``budget/<scale>_<recipe>_<task>`` is
    ``budget/<scale>_<recipe>``), since the budget is chosen by the experiment's name.
    """
    store = ConfigStore.instance()
    names = []
    tasks = task_names(conf_dir)
    for recipe in recipe_names(conf_dir):
        budgets = sorted(path.stem for path in (conf_dir / BUDGET_GROUP).glob(f"*_{recipe}.yaml"))
        for task in tasks:
            name = alias(recipe, task)
            node = {"defaults": [f"/{EXPERIMENT_GROUP}/{recipe}", {f"override /{TASK_GROUP}": task}]}
            store.store(group=EXPERIMENT_GROUP, name=name, node=node, package="_global_")
            for budget in budgets:
                budget_node = {"defaults": [f"/{BUDGET_GROUP}/{budget}"]}
                store.store(group=BUDGET_GROUP, name=alias(budget, task), node=budget_node, package="_global_")
            names.append(name)
    return names


def ablation_problem(cfg: DictConfig) -> str | None:
    """Why ``cfg.ablation`` does not apply to ``cfg.recipe``, or None when it does (or the config names no
    recipe, or its recipe lists no ablations)."""
    recipe, ablation = cfg.get("recipe"), cfg.get("ablation", NO_ABLATION)
    allowed = list(cfg.get("ablations") or [])
    if not recipe or not allowed or ablation in allowed:
        return None
    return (
        f"ablation={ablation} is not a row of recipe {recipe}'s tables; its ablations are: {', '.join(allowed)}. "
        f"Pick one of those (or another experiment whose table has {ablation})."
    )


def check_ablation(cfg: DictConfig) -> None:
    problem = ablation_problem(cfg)
    if problem:
        raise AblationNotInRecipe(problem)
