"""Stage contracts and the method registry: what a stage may read is what its key hashes, stages do not
import each other, and the registry and stage table load without torch."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from kdrun.config import DistillConfig
from kdrun.contract import MODEL_INPUT, Lazy, Stage, StageOutput, UndeclaredRead, stage_view
from kdrun.methods import method_named, methods
from kdrun.pipeline import _run_stage, registered_stages

from composing import compose_config
from test_config import CONF

PACKAGE = Path(__file__).resolve().parents[2] / "kdrun"


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_no_stage_imports_another_stage() -> None:
    stages = set(registered_stages())
    for path in (PACKAGE / "stages").glob("*.py"):
        own = path.stem
        borrowed = {name for name in _imports(path) for stage in stages - {own} if name == f"kdrun.stages.{stage}" or name.startswith(f"kdrun.stages.{stage}.")}
        assert not borrowed, f"{path.name} imports {borrowed}"
        assert "kdrun.pipeline" not in _imports(path), f"{path.name} imports the pipeline"


@pytest.mark.parametrize("module", ["contract.py", "stages/__init__.py", "methods/__init__.py", *(f"methods/{p.name}" for p in (PACKAGE / "methods").glob("[!_]*.py"))])
def test_the_registry_and_the_stage_table_import_no_torch_at_module_level(module: str) -> None:
    tree = ast.parse((PACKAGE / module).read_text())
    top_level = {name for node in tree.body if isinstance(node, (ast.Import, ast.ImportFrom)) for name in _imports_of(node)}
    assert not {n for n in top_level if n.split(".")[0] in ("torch", "transformers", "datasets")}, module
    assert not {n for n in top_level if n.startswith("kdrun.stages.") and n != "kdrun.stages"}, module


def _imports_of(node: ast.AST) -> set[str]:
    if isinstance(node, ast.Import):
        return {alias.name for alias in node.names}
    return {node.module or ""}


def test_every_stage_names_code_that_exists() -> None:
    for stage in registered_stages().values():
        for function in (stage.run, stage.check):
            if isinstance(function, Lazy):
                module, _, name = function.target.partition(":")
                assert callable(getattr(__import__(module, fromlist=[name]), name)), function.target


def test_every_method_has_its_node_and_group_file() -> None:
    found = methods()
    assert {"tinybert", "distilbert", "bilstm", "minilm"} <= set(found)
    for name, method in found.items():
        assert issubclass(method.config, DistillConfig) and method.config().name == name
        assert (CONF / "distill" / f"{name}.yaml").is_file()
        assert set(method.general_reads) | set(method.task_reads) <= set(OmegaConf.structured(method.config)), name
        cfg = compose_config(f"distill={name}")
        assert OmegaConf.get_type(cfg.distill) is method.config


def test_a_method_node_holds_only_its_own_settings() -> None:
    """distilbert.yaml no longer zeroes TinyBERT's weights: they are not in its node at all."""
    assert set(compose_config("distill=distilbert").distill.weights) == {"ce", "mlm", "cos"}
    assert set(compose_config("distill=tinybert").distill.weights) == {"embedding", "attention", "hidden"}
    with pytest.raises(Exception, match="attention"):
        compose_config("distill=distilbert", "distill.weights.attention=0")
    with pytest.raises(Exception, match="glove"):
        compose_config("student=tinybert4", "student.glove=x")


def test_task_only_settings_do_not_change_the_general_student_key() -> None:
    from kdrun.pipeline import plan

    def keys(*overrides: str) -> dict[str, str]:
        return {p.stage.name: p.key for p in plan(compose_config("experiment=tinybert_sst2", "device=cpu", *overrides))}

    base = keys()
    for override in ("distill.weights.hidden=0", "distill.temperature=3", "distill.prediction_target=labels"):
        changed = keys(override)
        assert changed["general_distill"] == base["general_distill"] and changed["task_distill"] != base["task_distill"], override
    assert keys("distill.general_weights.hidden=0")["general_distill"] != base["general_distill"]
    assert keys("student.name=renamed") == base  # a name is no shape


def test_a_stage_sees_only_what_it_declares() -> None:
    cfg = compose_config("experiment=tinybert_sst2", "teacher.path=/somewhere")
    stage = Stage(name="demo", run=lambda ctx: {"lr": ctx.cfg.task_distill.intermediate.train.learning_rate,
                                                "teacher": ctx.cfg.teacher.path, "precision": ctx.cfg.device.precision},
                  reads=("task_distill",), sources=("teacher",))
    view = stage_view(cfg, stage)
    assert set(view) == {"task_distill", "teacher", "device"} and view.teacher.path == "/somewhere"
    assert _run_stage(stage, view, {}, Path("."))["teacher"] == "/somewhere"
    nosy = Stage(name="nosy", run=lambda ctx: ctx.cfg.distill.weights.hidden, reads=("task_distill",))
    with pytest.raises(UndeclaredRead, match=r"Stage 'nosy' read the config setting distill"):
        _run_stage(nosy, stage_view(cfg, nosy), {}, Path("."))
    # A view is read-only: a stage cannot pass settings to the stages after it through the config.
    with pytest.raises(Exception):
        view.teacher.path = "/elsewhere"


def test_model_consumers_name_their_model_input() -> None:
    from kdrun.pipeline import plan

    planned = {p.stage.name: p for p in plan(compose_config("experiment=qbert_sst2", "quantize=qbert_mp", "device=cpu"))}
    assert planned["quantize"].model_from == "finetune_teacher" and planned["quantize"].inputs == ["sensitivity", "finetune_teacher"]
    assert planned["evaluate"].model_from == "quantize"
    seen = {}
    stage = Stage(name="consumer", run=lambda ctx: seen.update(model=ctx.model_input, dir=ctx.model_dir()) or {}, consumes_model=True)
    output = StageOutput("quantize", "k", Path("/cache/quantize/k"), {"model_dir": "model"}, "hit")
    _run_stage(stage, stage_view(compose_config(), stage), {MODEL_INPUT: output}, Path("."))
    assert seen == {"model": output, "dir": Path("/cache/quantize/k/model")}


def test_methods_refuse_students_they_cannot_train() -> None:
    from kdrun.pipeline import PipelineError

    with pytest.raises(PipelineError, match="distill=minilm trains a student of kind bert, not student=bilstm"):
        method_named("minilm").check(compose_config("experiment=minilm_sst2", "student=bilstm"), "task_distill")
    with pytest.raises(PipelineError, match="distill=bilstm has no general distillation"):
        method_named("bilstm").check(compose_config("experiment=bilstm_sst2"), "general_distill")


def test_a_rejected_setting_is_one_line_naming_the_stage_and_bugs_stay_tracebacks() -> None:
    from kdrun.contract import PipelineError, user_errors

    with pytest.raises(PipelineError, match=r"^augment: p_mask must be in \[0, 1\]$") as caught:
        with user_errors("augment"):
            raise ValueError("p_mask must be in [0, 1]")
    assert isinstance(caught.value.__cause__, ValueError)
    with pytest.raises(PipelineError, match="^put fit_mlm_head first$"):  # already a user error: unchanged
        with user_errors("augment"):
            raise PipelineError("put fit_mlm_head first")
    with pytest.raises(KeyError):  # not a settings error: a bug keeps its traceback
        with user_errors("augment"):
            raise KeyError("text_b")
    with pytest.raises(PipelineError, match="^export: no such file$"):
        with user_errors("export", FileNotFoundError):
            raise FileNotFoundError("no such file")
