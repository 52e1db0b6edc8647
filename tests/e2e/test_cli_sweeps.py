"""The ``kdrun`` command as its own process: Hydra's command line (``--cfg``, ``-m`` sweeps and launchers,
``+table=``), processes started together, torchrun ranks. What the process adds is what these test."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from kdrun.config import config_dir

CONF = Path(config_dir())
RUN_ID = re.compile(r"^\d{4}-\d{2}-\d{2}_\d{2}-\d{2}-\d{2}_[a-z2-7]{6}$")
TINY_RUN = ("scale=smoke", "device=cpu", "device.threads=1", "evaluate.measure_latency=false")
PRINT_RUN_ID = "from kdrun.cli import run_id; print(run_id())"


def _sweep_records(cwd: Path) -> dict[str, dict]:
    """The sweep's results.json records by experiment."""
    records = [json.loads(path.read_text()) for path in (cwd / "outputs" / "multirun").rglob("results.json")]
    return {record["experiment"]: record for record in records}


def _check_failed_sweep(result: subprocess.CompletedProcess, cwd: Path, glue_dir: Path) -> None:
    """teacher_sst2 ran; teacher_qqp stopped (no QQP in the data directory) and is in the table as failed."""
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    records = _sweep_records(cwd)
    assert records["teacher_sst2"]["status"] == "ok" and records["teacher_sst2"]["main_score"] is not None
    failed = records["teacher_qqp"]
    assert failed["status"] == "failed" and failed["task"] == "qqp" and "main_score" not in failed
    assert "QQP" in failed["error"] and str(glue_dir) in failed["error"]
    assert "experiment=teacher_qqp" in failed["overrides"]
    [summary] = list((cwd / "outputs" / "multirun").rglob("summary.md"))
    text = summary.read_text()
    score = r"[0-9.]+( †)?"  # a tiny model trained 4 steps may well be a constant predictor
    assert re.search(rf"\| none \| {score} \| failed \|", text) or re.search(rf"\| none \| failed \| {score} \|", text), text
    assert "failed: none / qqp" in text
    assert "1 of 2 jobs failed" in output


def test_cli_prints_resolved_config(run_kdrun_cli) -> None:
    result = run_kdrun_cli("experiment=teacher_cola", "scale=smoke", "--cfg", "job")
    printed = OmegaConf.create(result.stdout)
    assert printed.task.name == "cola"
    assert printed.experiment_name == "teacher_cola"
    assert printed.finetune_teacher.train.max_steps == 4


def test_cli_misspelt_key_is_a_clear_error(run_kdrun_cli) -> None:
    result = run_kdrun_cli("experiment=teacher_sst2", "finetune_teacher.train.epoch=2", check=False)
    assert result.returncode != 0
    assert "Key 'epoch' not in 'TrainConfig'" in result.stderr
    assert "full_key: finetune_teacher.train.epoch" in result.stderr


def test_parallel_sweep_trains_the_shared_teacher_once(run_kdrun_cli, tiny_bert_dir, glue_dir, tmp_path) -> None:
    """Two joblib jobs that share the teacher: one fine-tunes it under the lock, the other waits and reuses it."""
    run_kdrun_cli(
        "-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "device.threads=1",
        "experiment=teacher_sst2", f"teacher.path={tiny_bert_dir}", f"data.glue_dir={glue_dir}", "scale=smoke",
        "device=cpu", "evaluate.latency_repeats=1", "evaluate.batch_size=32,64",
    )
    results = [json.loads(p.read_text()) for p in sorted((tmp_path / "outputs" / "multirun").rglob("results.json"))]
    assert len(results) == 2
    caches = sorted(r["stages"]["finetune_teacher"]["cache"] for r in results)
    assert caches == ["computed", "hit"]
    assert len({r["stages"]["finetune_teacher"]["key"] for r in results}) == 1
    [sweep_dir] = list((tmp_path / "outputs" / "multirun").glob("*/*"))
    assert (sweep_dir / "summary.md").is_file()  # the sweep table, rendered by the callback


def test_run_ids_of_processes_and_of_torchrun_ranks(tmp_path: Path) -> None:
    """Two processes started together get two names; the two ranks of one real torchrun launch get one."""
    env = {**os.environ, "WORLD_SIZE": "1"}
    plain = [subprocess.Popen([sys.executable, "-c", PRINT_RUN_ID], env=env, stdout=subprocess.PIPE, text=True) for _ in range(2)]
    script = tmp_path / "rank.py"
    script.write_text(
        "import os, pathlib\nfrom kdrun.cli import run_id\n"
        f"pathlib.Path({str(tmp_path)!r}, 'rank' + os.environ['RANK']).write_text(run_id())\n"
    )
    torchrun = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(script)],
                              cwd=tmp_path, capture_output=True, text=True, timeout=300)
    names = [process.communicate(timeout=300)[0].strip() for process in plain]
    assert torchrun.returncode == 0, torchrun.stdout + torchrun.stderr
    assert all(RUN_ID.match(name) for name in names) and names[0] != names[1]
    ranks = [(tmp_path / f"rank{rank}").read_text() for rank in (0, 1)]
    assert RUN_ID.match(ranks[0]) and ranks[0] == ranks[1]


def test_two_runs_started_together_keep_both_results(tiny_bert_dir, glue_dir, tmp_path: Path) -> None:
    """The same command twice at once (as a learning-rate sweep by hand would be): two directories, two files."""
    environment = {**os.environ, "KDRUN_CACHE_DIR": str(tmp_path / "cache"), "TOKENIZERS_PARALLELISM": "false"}
    command = [sys.executable, "-m", "kdrun.cli", "experiment=teacher_sst2", f"teacher.path={tiny_bert_dir}",
               f"data.glue_dir={glue_dir}", *TINY_RUN]
    runs = [subprocess.Popen(command, cwd=tmp_path, env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for _ in range(2)]
    outputs = [run.communicate(timeout=600)[0] for run in runs]
    assert [run.returncode for run in runs] == [0, 0], outputs
    files = sorted((tmp_path / "outputs" / "runs" / "teacher_sst2").glob("*/results.json"))
    assert len(files) == 2 and all(RUN_ID.match(path.parent.name) for path in files)
    records = [json.loads(path.read_text()) for path in files]
    assert [record["run_id"] for record in records] == [path.parent.name for path in files]
    assert {record["status"] for record in records} == {"ok"}


def test_joblib_sweep_finishes_and_reports_a_failed_job(run_kdrun_cli, tiny_bert_dir, glue_dir, tmp_path: Path) -> None:
    result = run_kdrun_cli(
        "-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "experiment=teacher_sst2,teacher_qqp",
        f"teacher.path={tiny_bert_dir}", f"data.glue_dir={glue_dir}", *TINY_RUN, check=False,
    )
    _check_failed_sweep(result, tmp_path, glue_dir)


def test_basic_launcher_runs_the_jobs_after_a_failed_one(run_kdrun_cli, tiny_bert_dir, glue_dir, tmp_path: Path) -> None:
    result = run_kdrun_cli(
        "-m", "experiment=teacher_qqp,teacher_sst2", f"teacher.path={tiny_bert_dir}", f"data.glue_dir={glue_dir}", *TINY_RUN,
        check=False,
    )
    _check_failed_sweep(result, tmp_path, glue_dir)
    assert "Traceback" not in result.stdout + result.stderr  # a user error is one line, in a sweep too


def test_table_runs_from_the_shell_in_one_command(tiny_bert_dir: Path, glue_dir: Path, tmp_path: Path) -> None:
    """``kdrun +table=qbert_groups`` at scale=smoke: four jobs, then the table with the four rows."""
    environment = {**os.environ, "KDRUN_CACHE_DIR": str(tmp_path / "cache"), "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run(
        [sys.executable, "-m", "kdrun.cli", "+table=qbert_groups", "scale=smoke", f"teacher.path={tiny_bert_dir}",
         f"data.glue_dir={glue_dir}", "evaluate.latency_repeats=1"],
        cwd=tmp_path, env=environment, capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    [summary] = list((tmp_path / "outputs" / "multirun" / "qbert_groups").glob("*/summary.md"))
    text = summary.read_text()
    for row in ("qbert_g1", "qbert_g12", "qbert_g128", "qbert_grow"):
        assert f"| {row} |" in text


@pytest.mark.slow
def test_glob_sweep_runs_the_recipes_rows_and_skips_the_others(tiny_bert_dir: Path, glue_dir: Path, tmp_path: Path) -> None:
    """The literal ``kdrun -m experiment=<recipe>_<task> 'ablation=glob(*)'``: rows of other recipes are
    skipped, not failed, and the sweep exits 0."""
    environment = {**os.environ, "KDRUN_CACHE_DIR": str(tmp_path / "cache"), "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run(
        [sys.executable, "-m", "kdrun.cli", "-m", "experiment=teacher_sst2", "ablation=glob(*)", "scale=smoke",
         f"teacher.path={tiny_bert_dir}", f"data.glue_dir={glue_dir}", "evaluate.measure_latency=false"],
        cwd=tmp_path, env=environment, capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    records = [json.loads(p.read_text()) for p in (tmp_path / "outputs").rglob("results.json")]
    assert len(records) == len(list((CONF / "ablation").glob("*.yaml")))
    assert [r["ablation"] for r in records if r["status"] == "ok"] == ["none"]
    assert all(r["status"] == "skipped" for r in records if r["ablation"] != "none")
