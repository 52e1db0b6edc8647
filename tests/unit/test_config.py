"""The config tree composes for every experiment and scale, and rejects mistakes before any work."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from kdrun.config import KdrunConfig, config_dir
from kdrun.pipeline import PipelineError, plan
from kdrun.recipes import recipe_names
from composing import compose_config

CONF = Path(config_dir())
RECIPES = recipe_names(CONF)
SCALES = sorted(p.stem for p in (CONF / "scale").glob("*.yaml"))




def test_every_experiment_file_is_a_recipe() -> None:
    assert sorted(p.stem for p in (CONF / "experiment").glob("*.yaml")) == RECIPES
    assert SCALES == ["cpu", "paper", "smoke"]


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_composes_validates_and_plans(recipe: str, scale: str) -> None:
    # Aliases (recipe_task) compose as recipe + task: tests/test_recipes_and_tables.py.
    task = "stsb" if recipe != "mlm_head" else "sst2"  # the regression task exercises num_labels=1
    cfg = compose_config(f"experiment={recipe}", f"task={task}", f"scale={scale}")
    assert cfg.experiment_name == (recipe if recipe == "mlm_head" else f"{recipe}_{task}")
    assert cfg.scale == scale
    typed = OmegaConf.to_object(cfg)  # raises on any missing or ill-typed value
    assert isinstance(typed, KdrunConfig)
    stages = plan(cfg)
    # Listed stages that nothing wants with this config are skipped: the Hessian spectrum without mixed precision,
    # the fine-tuned teacher when DistilBERT's student is fine-tuned on the labels (the paper's protocol), the
    # teacher's logits when the prediction step learns the gold labels (DistilBERT; TinyBERT on STS-B fits the
    # gold scores, as the official code).
    skipped = ["sensitivity"] if cfg.quantize.name != "qbert_mp" else []
    skipped += ["finetune_teacher"] if recipe == "distilbert" else []
    skipped += ["teacher_logits"] if recipe in ("distilbert", "tinybert") else []
    assert [s.stage.name for s in stages] == [name for name in cfg.pipeline.stages if name not in skipped]
    # A key names its stage's inputs: every stage's differs, and planning again gives the same keys.
    keys = [s.key for s in stages]
    assert len(set(keys)) == len(keys)
    assert keys == [s.key for s in plan(cfg)]


def test_experiment_selects_its_task() -> None:
    assert compose_config("experiment=teacher_mrpc").task.name == "mrpc"
    assert compose_config("experiment=teacher_stsb", "scale=paper").finetune_teacher.train.learning_rate == 2e-5


def test_misspelt_key_fails_naming_the_key() -> None:
    with pytest.raises(ConfigCompositionException) as error:
        compose_config("experiment=teacher_sst2", "finetune_teacher.train.epoch=2")
    message = str(error.value) + str(error.value.__cause__)
    assert "Key 'epoch' not in 'TrainConfig'" in message
    assert "finetune_teacher.train.epoch" in message


def test_wrong_type_fails_naming_the_key() -> None:
    with pytest.raises(ConfigCompositionException) as error:
        compose_config("experiment=teacher_sst2", "finetune_teacher.train.batch_size=many")
    message = str(error.value) + str(error.value.__cause__)
    assert "finetune_teacher.train.batch_size" in message


def test_unknown_stage_and_misplaced_stage_fail_at_plan_time() -> None:
    with pytest.raises(PipelineError, match="unknown stage"):
        plan(compose_config("pipeline.stages=[finetune_teacher,evaluat]"))
    with pytest.raises(PipelineError, match="model-producing stage"):
        plan(compose_config("pipeline.stages=[evaluate]"))
    with pytest.raises(PipelineError, match="cache.force"):
        plan(compose_config("cache.force=[augment]"))


def test_keys_follow_exactly_what_a_stage_reads() -> None:
    base = {s.stage.name: s.key for s in plan(compose_config("experiment=teacher_sst2"))}
    evaluate_changed = {s.stage.name: s.key for s in plan(compose_config("experiment=teacher_sst2", "evaluate.latency_repeats=3"))}
    lr_changed = {s.stage.name: s.key for s in plan(compose_config("experiment=teacher_sst2", "finetune_teacher.train.learning_rate=1e-4"))}
    device_changed = {s.stage.name: s.key for s in plan(compose_config("experiment=teacher_sst2", "device=cpu"))}
    assert evaluate_changed["finetune_teacher"] == base["finetune_teacher"]
    assert evaluate_changed["evaluate"] != base["evaluate"]
    assert lr_changed["finetune_teacher"] != base["finetune_teacher"]
    assert lr_changed["evaluate"] != base["evaluate"]  # consumes the teacher's key
    assert device_changed == base




def test_seed_is_the_seed_of_the_model_a_row_is_about() -> None:
    tinybert = compose_config("experiment=tinybert_sst2", "seed=3")
    assert tinybert.task_distill.intermediate.train.seed == tinybert.task_distill.prediction.train.seed == 3
    # What the seeds of a row share keeps its own seed.
    assert tinybert.finetune_teacher.train.seed == tinybert.general_distill.train.seed == 42
    assert tinybert.augment.seed == 0
    assert compose_config("experiment=qbert_sst2", "seed=3").quantize.train.seed == 3
    assert compose_config("experiment=teacher_sst2", "seed=3").finetune_teacher.train.seed == 3
    # A loop's own seed on the command line still wins.
    own = compose_config("experiment=tinybert_sst2", "seed=3", "task_distill.prediction.train.seed=7")
    assert (own.task_distill.intermediate.train.seed, own.task_distill.prediction.train.seed) == (3, 7)


def test_seed_keys_the_stages_it_seeds_and_only_those() -> None:
    """``seed=S`` is the same run as setting both task-distillation seeds to S (the same cache entries), and
    the default is 42, the seed every loop had before ``seed`` existed."""
    keys = lambda *o: {s.stage.name: s.key for s in plan(compose_config("experiment=tinybert_sst2", *o))}  # noqa: E731
    by_seed = keys("seed=1")
    assert by_seed == keys("task_distill.intermediate.train.seed=1", "task_distill.prediction.train.seed=1")
    default = keys()
    assert default == keys("task_distill.intermediate.train.seed=42", "task_distill.prediction.train.seed=42")
    changed = {name for name in default if default[name] != by_seed[name]}
    assert changed == {"task_distill", "evaluate"}


def test_augmentation_copies_follow_each_paper_per_task_unless_set() -> None:
    from kdrun.stages.augment import _tang_settings, _tinybert_settings

    tang = {task: _tang_settings(compose_config("experiment=bilstm", f"task={task}")).n_iter for task in ("sst2", "mnli", "qqp", "mrpc")}
    assert tang == {"sst2": 20, "mnli": 10, "qqp": 10, "mrpc": 20}  # Tang et al. section 4.2; MRPC: not in the paper
    tinybert = {task: _tinybert_settings(compose_config("experiment=tinybert", f"task={task}")).n_copies for task in ("sst2", "mnli", "mrpc")}
    assert tinybert == {"sst2": 20, "mnli": 10, "mrpc": 30}
    assert _tang_settings(compose_config("experiment=bilstm", "task=mnli", "augment.n_iter=3")).n_iter == 3
