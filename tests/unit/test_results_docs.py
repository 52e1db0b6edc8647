"""docs/results.md is rendered from stored records: runs, deployment rows, the resume matrix, benchmarks."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from kdrun.report.docs import add_run, add_table, main, render

RECORD = {
    "status": "ok", "recipe": "teacher", "task": "sst2", "main_metric": "accuracy", "main_score": 0.8911,
    "overrides": ["experiment=teacher_sst2", "scale=cpu"], "precision": "bf16", "predicts_one_class": False,
    "efficiency": {"parameters": 22713986},
    "stages": {"finetune_teacher": {"cache": "computed", "seconds": 390.0}, "evaluate": {"cache": "uncached", "seconds": 30.0}},
    "deployment": {
        "fp32": {"main_score": 0.8911, "latency_ms_bs1": 35.04, "latency_ms_bs32": 720.0, "size_on_disk_bytes": 90867952},
        "onnx_int8": {"main_score": 0.8853, "agreement_with_fp32": 0.982, "latency_ms_bs1": 9.5, "latency_ms_bs32": 210.0},
    },
}


@pytest.fixture
def measurements(tmp_path: Path) -> Path:
    run = tmp_path / "outputs" / "run"
    run.mkdir(parents=True)
    (run / "results.json").write_text(json.dumps(RECORD))
    root = tmp_path / "measurements"
    add_run(root, run, "teacher_sst2_cpu")
    rows = [{"stage": "finetune_teacher", "fault": "kill@step:70", "meaning": "kill -9 in epoch 2", "resumed_from_step": 60, "interrupted_exit_code": -9, "weight_files": 6, "other_files_identical": True,
             "weights_identical": True, "history_identical": True, "best_dev_identical": True}]
    (root / "resume_matrix.json").write_text(json.dumps({"recipe": ["experiment=tinybert_sst2"], "rows": rows}))
    (root / "bench_export.json").write_text(json.dumps({"speedup": {"onnx_int8_bs32": 3.4271}}))
    return root


def test_page_has_each_record_with_its_command_and_numbers(measurements: Path) -> None:
    page = render(measurements)
    assert "| teacher_sst2_cpu | `kdrun experiment=teacher_sst2 scale=cpu` | accuracy | 89.11 | 22,713,986 | bf16 | finetune_teacher 6.5, evaluate 0.5 |  |" in page
    assert "finetune_teacher 6.5, evaluate 0.5" in page
    assert "| onnx_int8 | 88.53 | 98.20 | – | 9.5 | 210.0 |" in page
    assert "| fp32 | 89.11 | – | 90.9 | 35.0 | 720.0 |" in page
    assert "| finetune_teacher | kill -9 in epoch 2 | `kill@step:70` | -9 | 60 | yes (6 files) | yes | yes |" in page
    assert "| `speedup.onnx_int8_bs32` | 3.427 |" in page


def test_rendering_is_deterministic_and_writes_the_page(measurements: Path, tmp_path: Path) -> None:
    out = tmp_path / "results.md"
    main(["--measurements", str(measurements), "--out", str(out)])
    assert out.read_text() == render(measurements) == render(measurements)


def test_adding_a_directory_without_results_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="holds no results.json"):
        add_run(tmp_path / "m", tmp_path, "x")


def test_a_records_note_is_its_last_column(measurements: Path) -> None:
    (measurements / "runs" / "teacher_sst2_cpu" / "note.md").write_text("Measured beside\nanother job.\n")
    assert "| finetune_teacher 6.5, evaluate 0.5 | Measured beside another job. |" in render(measurements)


def test_a_stored_table_over_seeds_is_a_section_with_its_note(measurements: Path) -> None:
    table = measurements / "tables" / "tang1_sst2"
    table.mkdir(parents=True)
    (table / "summary.md").write_text("# accuracy by recipe\n\n| recipe | sst2 |\n|---|---|\n| bilstm | 85.10 ± 0.30 (n=3) |\n")
    (table / "note.md").write_text("`kdrun -m experiment=bilstm_sst2 seed=1,2,3`, 21 min.\n")
    page = render(measurements)
    section = page[page.index("## Tables over seeds"):]
    assert section.index("### tang1_sst2") < section.index("21 min.") < section.index("| bilstm | 85.10 ± 0.30 (n=3) |")
    assert "# accuracy by recipe" not in page and page.index("## Runs") < page.index("## Tables over seeds") < page.index("## Deployment")


def make_sweep(root: Path, scores: list[float], failed: bool = False) -> Path:
    """A finished 'kdrun -m' sweep as Hydra and kdrun leave it: multirun.yaml, then one results.json per job."""
    root.mkdir(parents=True)
    overrides = {"hydra": ["hydra.mode=MULTIRUN", "hydra/launcher=joblib", f"hydra.sweep.dir={root}"], "task": ["+table=qbert1", "seed=1,2,3"]}
    launcher = {"_target_": "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher", "n_jobs": 2}
    (root / "multirun.yaml").write_text(json.dumps({"hydra": {"overrides": overrides, "launcher": launcher}}))  # JSON is YAML
    os.utime(root / "multirun.yaml", (1_000_000, 1_000_000))
    for job, score in enumerate(scores):
        record = {**RECORD, "ablation": "qbert_w4", "main_score": score, "predicts_one_class": job == 0,
                  "efficiency": {"parameters": 22713986, "latency_ms_bs1": 9.0},
                  "report": {"rows": "ablation", "columns": "task", "metric": "main_score", "scale": 100.0}}
        if failed and job == len(scores) - 1:
            record = {"status": "failed", "ablation": "qbert_w4", "task": "sst2", "error": "boom"}
        (root / str(job)).mkdir()
        (root / str(job) / "results.json").write_text(json.dumps(record))
        os.utime(root / str(job) / "results.json", (1_000_000 + 600 * (job + 1),) * 2)
    return root


def test_a_sweep_is_stored_as_a_table_with_its_command_wall_time_and_machine(tmp_path: Path) -> None:
    sweep = make_sweep(tmp_path / "sweep", [0.80, 0.82, 0.84])
    target = add_table(tmp_path / "m", sweep, "qbert1_sst2_seeds", note="What it shows.")
    note = (target / "note.md").read_text().splitlines()
    # hydra.mode and the sweep directory say how and where, not what: the command leaves them out
    assert note[0] == "`kdrun hydra/launcher=joblib +table=qbert1 seed=1,2,3`: 3 jobs (2 at a time, so no latencies), 30.0 min wall; 1 of 3 runs predict one class (†)."
    assert note[1].startswith("Machine: ") and note[1].endswith("trained in bf16.")
    assert note[2] == "What it shows."
    assert "| qbert_w4 | 82.00 ± 2.00 † | 22.71 |" in (target / "summary.md").read_text()
    assert (target / "summary.csv").is_file() and not list(target.glob("*.png"))
    # two jobs at a time timed each other: the stored table has no latency or speed-up column
    assert "params (M)" in (target / "summary.md").read_text() and "latency" not in (target / "summary.md").read_text()
    assert "speed-up" not in (target / "summary.md").read_text()
    page = render(tmp_path / "m")
    assert "### qbert1_sst2_seeds" in page and "30.0 min wall" in page
    # the wall time this script measured wins over the files' times
    assert "12.5 min wall" in (add_table(tmp_path / "m", sweep, "x", wall_seconds=750.0) / "note.md").read_text()
    # one job at a time (Hydra's basic launcher): its latencies are measurements and stay
    (sweep / "multirun.yaml").write_text(json.dumps({"hydra": {"overrides": {"task": ["+table=qbert1"]}, "launcher": {"_target_": "hydra._internal.core_plugins.basic_launcher.BasicLauncher"}}}))
    serial = add_table(tmp_path / "m", sweep, "serial", wall_seconds=60.0)
    assert "latency bs1 (ms)" in (serial / "summary.md").read_text() and "at a time" not in (serial / "note.md").read_text()


def test_a_sweep_with_a_failed_job_or_without_its_config_is_not_stored(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="1 of 3 jobs .* failed .* run the sweep's command again"):
        add_table(tmp_path / "m", make_sweep(tmp_path / "bad", [0.8, 0.8, 0.8], failed=True), "x")
    assert not (tmp_path / "m").exists()
    sweep = make_sweep(tmp_path / "ok", [0.8])
    (sweep / "multirun.yaml").unlink()
    with pytest.raises(FileNotFoundError, match="holds no multirun.yaml"):
        add_table(tmp_path / "m", sweep, "x")


def load_reproduce_script():
    path = Path(__file__).resolve().parents[2] / "scripts" / "reproduce_table.py"
    spec = importlib.util.spec_from_file_location("reproduce_table", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_every_reproduced_table_is_a_sweep_config_and_its_command_is_the_cpu_sweep(tmp_path: Path, capsys) -> None:
    script = load_reproduce_script()
    tables = Path(__file__).resolve().parents[2] / "conf" / "table"
    assert all((tables / f"{spec.table}.yaml").is_file() for spec in script.TABLES.values())
    command = script.sweep_argv(script.TABLES["tinybert3_sst2"], "1,2,3", 2, ["foo=1"], tmp_path)
    threads = max(1, (os.cpu_count() or 1) // 2)
    assert command == ["kdrun", "+table=tinybert3", "scale=cpu", "seed=1,2,3", "task=sst2",
                       "task_distill.intermediate.train.max_steps=3000", "task_distill.prediction.train.max_steps=2000",
                       "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "evaluate.measure_latency=false", f"device.threads={threads}", f"hydra.sweep.dir={tmp_path}", "foo=1"]
    assert script.main(["qbert1_sst2", "--dry-run"]) == 0
    assert capsys.readouterr().out.startswith("kdrun +table=qbert1 scale=cpu seed=1,2,3 task=sst2 device.threads=")


def test_every_job_of_every_reproduced_table_composes_with_its_cpu_budget() -> None:
    """The script's overrides reach each job: every (experiment, ablation) of the table's sweep composes under
    them at scale=cpu, and an override the script passes is the value the job runs with."""
    from hydra import compose, initialize_config_dir

    from kdrun.config import config_dir, register_configs
    from kdrun.recipes import check_ablation

    script = load_reproduce_script()
    register_configs()
    for name, spec in script.TABLES.items():
        with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
            table = compose(config_name="config", overrides=[f"+table={spec.table}"], return_hydra_config=True)
            params = dict(table.hydra.sweeper.params)
            for experiment in params["experiment"].split(","):
                for ablation in params.get("ablation", "none").split(","):
                    cfg = compose(config_name="config", overrides=[f"experiment={experiment}", f"ablation={ablation}", "scale=cpu", "seed=1", *spec.overrides])
                    check_ablation(cfg)
                    for override in spec.overrides:
                        key, value = override.split("=", 1)
                        assert str(OmegaConf.select(cfg, key if key != "task" else "task.name")) == value, (name, experiment, ablation, override)
