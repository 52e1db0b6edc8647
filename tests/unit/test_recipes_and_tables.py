"""One file per recipe, its ``<recipe>_<task>`` aliases, recipe-checked ablations, and the paper tables as
sweep configs (``kdrun +table=...``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from kdrun.config import config_dir, register_configs
from kdrun.recipes import AblationNotInRecipe, check_ablation, recipe_names, task_names

CONF = Path(config_dir())
RECIPES = ["bilstm", "bilstm_nokd", "distilbert", "export_model", "minilm", "mlm_head", "qbert", "teacher", "tinybert"]


def composed(*overrides: str):
    register_configs()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def test_recipes_are_the_experiment_files_that_declare_themselves() -> None:
    assert set(RECIPES) <= set(recipe_names(CONF))
    assert task_names(CONF) == ["cola", "mnli", "mrpc", "qnli", "qqp", "rte", "sst2", "stsb", "wnli"]


@pytest.mark.parametrize("recipe", ["teacher", "tinybert", "distilbert", "bilstm", "bilstm_nokd", "qbert"])
@pytest.mark.parametrize("task", ["sst2", "mrpc", "stsb"])
def test_alias_composes_exactly_as_recipe_and_task(recipe: str, task: str) -> None:
    by_alias = OmegaConf.to_container(composed(f"experiment={recipe}_{task}"), resolve=True)
    by_parts = OmegaConf.to_container(composed(f"experiment={recipe}", f"task={task}"), resolve=True)
    assert by_alias == by_parts
    assert by_alias["experiment_name"] == f"{recipe}_{task}"
    assert by_alias["recipe"] == recipe
    assert by_alias["task"]["name"] == task


def test_task_on_the_command_line_wins_over_the_alias() -> None:
    cfg = composed("experiment=tinybert_sst2", "task=mrpc")
    assert cfg.task.name == "mrpc" and cfg.experiment_name == "tinybert_mrpc"


def test_recipe_defaults_to_sst2() -> None:
    assert composed("experiment=tinybert").experiment_name == "tinybert_sst2"


def test_every_budget_file_names_a_scale_and_a_recipe() -> None:
    """``budget: ${scale}_${experiment}`` is optional, so a misspelt budget file would never apply, silently."""
    scales = {path.stem for path in (CONF / "scale").glob("*.yaml")}
    budgets = sorted(path.stem for path in (CONF / "budget").glob("*.yaml"))
    assert budgets == ["cpu_bilstm", "cpu_distilbert"]
    for budget in budgets:
        scale, recipe = budget.split("_", 1)
        assert scale in scales and recipe in recipe_names(CONF)


@pytest.mark.parametrize("experiment", ["distilbert", "distilbert_sst2", "distilbert_mrpc"])
def test_distilbert_keeps_its_own_general_distillation_budget_at_cpu_scale(experiment: str) -> None:
    assert composed(f"experiment={experiment}").general_distill.max_sequences == 4000
    assert composed(f"experiment={experiment}", "ablation=distil_no_ce").general_distill.max_sequences == 4000
    # Only at scale=cpu, and the command line still wins.
    assert composed(f"experiment={experiment}", "scale=paper").general_distill.max_sequences is None
    assert composed(f"experiment={experiment}", "scale=smoke").general_distill.max_sequences == 32
    assert composed(f"experiment={experiment}", "general_distill.max_sequences=100").general_distill.max_sequences == 100
    # Other recipes keep the scale's budget.
    assert composed("experiment=tinybert").general_distill.max_sequences == 16000


@pytest.mark.parametrize("experiment", ["bilstm", "bilstm_sst2"])
def test_bilstm_augments_a_smaller_sample_at_cpu_scale(experiment: str) -> None:
    assert composed(f"experiment={experiment}").augment.max_examples == 4000
    assert composed(f"experiment={experiment}", "augment.max_examples=12000").augment.max_examples == 12000
    assert composed("experiment=tinybert_sst2").augment.max_examples == 12000


def test_every_ablation_belongs_to_some_recipe_and_every_listed_one_exists() -> None:
    files = {path.stem for path in (CONF / "ablation").glob("*.yaml")}
    listed = set()
    for recipe in RECIPES:
        ablations = yaml.safe_load((CONF / "experiment" / f"{recipe}.yaml").read_text())["ablations"]
        assert "none" in ablations
        listed |= set(ablations)
    assert listed == files


def test_an_ablation_of_another_recipe_is_an_error() -> None:
    with pytest.raises(AblationNotInRecipe, match="ablation=no_attn is not a row of recipe qbert's tables"):
        check_ablation(composed("experiment=qbert_sst2", "ablation=no_attn"))
    check_ablation(composed("experiment=tinybert_sst2", "ablation=no_attn"))
    check_ablation(composed("ablation=no_attn"))  # no recipe: groups chosen by hand


def test_validation_reports_the_misplaced_ablation_before_compute() -> None:
    from kdrun.pipeline import PipelineError, plan

    with pytest.raises(PipelineError, match="not a row of recipe distilbert"):
        plan(composed("experiment=distilbert_mrpc", "ablation=map_top"))


TABLES = {
    "tinybert1": ({"experiment": "teacher,tinybert", "task": "mnli,qqp,qnli,sst2,cola,stsb,mrpc,rte"}, "recipe"),
    "tinybert2": ({"experiment": "tinybert", "task": "mnli,mrpc,cola", "ablation": "none,no_gd,no_td,no_da"}, "ablation"),
    "tinybert3": (
        {"experiment": "tinybert", "task": "mnli,mrpc,cola", "ablation": "none,no_embd,no_pred,no_trm,no_attn,no_hidn"},
        "ablation",
    ),
    "tinybert4": ({"experiment": "tinybert", "task": "mnli,mrpc,cola", "ablation": "none,map_top,map_bottom"}, "ablation"),
    "distilbert1": ({"experiment": "teacher,distilbert", "task": "cola,mnli,mrpc,qnli,qqp,rte,sst2,stsb,wnli"}, "recipe"),
    "distilbert4": (
        {"experiment": "distilbert", "task": "mrpc",
         "ablation": "none,distil_no_ce,distil_no_cos,distil_no_mlm,distil_random_init"},
        "ablation",
    ),
    "qbert1": (
        {"experiment": "qbert", "task": "sst2",
         "ablation": "qbert_fp32,qbert_w8,qbert_w4,qbert_w3,qbert_w2,directq_w4,directq_w3,directq_w2,qbert_mp_2_4,qbert_mp_2_3"},
        "ablation",
    ),
    "qbert_groups": ({"experiment": "qbert", "task": "sst2", "ablation": "qbert_g1,qbert_g12,qbert_g128,qbert_grow"}, "ablation"),
    "tang1": ({"experiment": "teacher,bilstm,bilstm_nokd", "task": "sst2,qqp,mnli"}, "recipe"),
}


def test_every_table_config_is_tested() -> None:
    assert {path.stem for path in (CONF / "table").glob("*.yaml")} == set(TABLES)


@pytest.mark.parametrize("table", sorted(TABLES))
def test_table_is_one_sweep_over_its_rows_and_columns(table: str) -> None:
    params, rows = TABLES[table]
    register_configs()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"+table={table}"], return_hydra_config=True)
    assert cfg.hydra.mode.name == "MULTIRUN"
    assert dict(cfg.hydra.sweeper.params) == params
    assert cfg.report.rows == rows
    # Every job of the sweep is a valid run of its recipe: its ablation applies (none is skipped).
    for experiment in params["experiment"].split(","):
        for ablation in params.get("ablation", "none").split(","):
            check_ablation(composed(f"experiment={experiment}", f"ablation={ablation}"))


def test_skipped_jobs_leave_tables_and_do_not_fail_the_sweep(tmp_path: Path) -> None:
    from kdrun.report.runs import failed_jobs, load_runs

    for job, status in (("0", "ok"), ("1", "skipped"), ("2", "failed")):
        (tmp_path / job / ".hydra").mkdir(parents=True)
        (tmp_path / job / ".hydra" / "config.yaml").write_text("{}")
        record = {"status": status, "run_id": job, "ablation": job, "task": "sst2", "main_score": 0.5}
        (tmp_path / job / "results.json").write_text(json.dumps(record))
    runs = load_runs([tmp_path])
    assert sorted(run["ablation"] for run in runs) == ["0", "2"]
    assert list(failed_jobs(tmp_path, runs)) == [str(tmp_path / "2")]


