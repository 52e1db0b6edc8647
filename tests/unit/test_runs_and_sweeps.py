"""Run directories that never collide, results.json that is never silently replaced, and sweeps that finish
(and report) when some of their jobs fail."""

from __future__ import annotations

import csv
import json
import os
import re
from datetime import datetime
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from kdrun.cli import RUN_ID_RESOLVER, run_id
from kdrun.report import build_table, load_runs, write_report
from kdrun.report.callback import SweepReport
from kdrun.report.runs import failed_jobs, sweep_jobs
from kdrun.report.tables import FAILED_NOTE, _pareto_points, to_latex
from kdrun.results import ResultsConflict, build_failure, check_results_dir, run_identity, write_results
from composing import compose_config

RUN_ID = re.compile(r"^\d{4}-\d{2}-\d{2}_\d{2}-\d{2}-\d{2}_[a-z2-7]{6}$")
TINY_RUN = ("scale=smoke", "device=cpu", "device.threads=1", "evaluate.measure_latency=false")
PRINT_RUN_ID = "from kdrun.cli import run_id; print(run_id())"


@pytest.fixture
def fresh_run_id():
    """run_id() computed anew (it is cached per process), and the process's own value restored afterwards."""
    run_id.cache_clear()
    yield run_id
    run_id.cache_clear()




# --- run ids and directories --------------------------------------------------------------------------------


def test_run_id_is_stable_in_a_process_and_names_run_and_sweep_dirs(fresh_run_id) -> None:
    first = fresh_run_id()
    assert RUN_ID.match(first) and fresh_run_id() == first
    cfg = compose_config("experiment=teacher_mrpc", hydra=True)
    assert cfg.hydra.run.dir == f"outputs/runs/teacher_mrpc/{first}"
    assert cfg.hydra.sweep.dir == f"outputs/multirun/teacher_mrpc/{first}"
    assert compose_config("experiment=teacher_mrpc", hydra=True).hydra.run.dir == cfg.hydra.run.dir  # one launch, one name


def test_run_ids_differ_even_at_the_same_instant(fresh_run_id, monkeypatch) -> None:
    """With the clock frozen, fresh caches (as in two processes) still give two names, one time prefix."""
    monkeypatch.setattr("kdrun.cli.time.time", lambda: 1_800_000_000.25)
    monkeypatch.setattr("kdrun.cli.time.time_ns", lambda: 1_800_000_000_250_000_000)
    first = fresh_run_id()
    fresh_run_id.cache_clear()
    config = OmegaConf.create({"dir": f"${{{RUN_ID_RESOLVER}:}}"})
    second = config.dir
    assert first != second and first[:19] == second[:19] == f"{datetime.fromtimestamp(1_800_000_000.25):%Y-%m-%d_%H-%M-%S}"
    fresh_run_id.cache_clear()
    assert config.dir == second  # the resolver caches the value in the config: every lookup agrees


def test_the_jobs_of_a_sweep_over_experiments_share_its_directory(fresh_run_id) -> None:
    sweep = compose_config(hydra=True)  # the sweep's own config: `experiment=a,b` is not applied to it
    job = compose_config("experiment=teacher_sst2", hydra=True)
    sweep_dir = sweep.hydra.sweep.dir
    OmegaConf.copy_cache(from_config=sweep, to_config=job)  # what Hydra does for every job (load_sweep_config)
    assert job.hydra.sweep.dir == sweep_dir == f"outputs/multirun/default/{fresh_run_id()}"


def test_ranks_of_one_launch_share_a_run_id(fresh_run_id, monkeypatch) -> None:
    """Under torchrun (WORLD_SIZE > 1) the name comes from the launcher, the parent every rank shares."""
    import psutil

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-a")
    first = fresh_run_id()
    fresh_run_id.cache_clear()
    assert fresh_run_id() == first  # another rank: same launcher, same name
    assert first[:19] == f"{datetime.fromtimestamp(psutil.Process(os.getppid()).create_time()):%Y-%m-%d_%H-%M-%S}"
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-b")
    fresh_run_id.cache_clear()
    assert fresh_run_id() != first


# --- results.json ----------------------------------------------------------------------------------------------


def test_results_are_written_atomically_and_never_replace_another_runs(tmp_path: Path) -> None:
    path = write_results({"run_id": "run-a", "main_score": 0.5}, tmp_path)
    assert json.loads(path.read_text())["main_score"] == 0.5
    write_results({"run_id": "run-a", "main_score": 0.6}, tmp_path)  # the same run (a restarted rank) may rewrite
    assert json.loads(path.read_text())["main_score"] == 0.6
    with pytest.raises(ResultsConflict, match=r"already holds the results of another run \(run-a\).*hydra.run.dir"):
        write_results({"run_id": "run-b", "main_score": 0.7}, tmp_path)
    with pytest.raises(ResultsConflict):
        check_results_dir(tmp_path, "run-b")  # what a run checks before doing any work
    assert json.loads(path.read_text())["main_score"] == 0.6
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]  # no temporary file left behind
    path.write_text('{"main_score": 0.9')  # unreadable (or written by a kdrun without run ids): never replaced
    with pytest.raises(ResultsConflict, match="an unreadable or older record"):
        write_results({"run_id": "run-a"}, tmp_path)


def test_a_failure_record_identifies_its_cell() -> None:
    cfg = compose_config("experiment=teacher_mrpc", "ablation=none", hydra=True)
    overrides = ["experiment=teacher_mrpc"]
    record = build_failure(cfg, overrides, "run-x#1", FileNotFoundError("no MRPC here"), user_error=False)
    assert record == {**run_identity(cfg, overrides, "run-x#1"), "status": "failed", "error": "FileNotFoundError: no MRPC here",
                      "error_type": "FileNotFoundError"}
    assert (record["experiment"], record["recipe"], record["task"], record["ablation"]) == ("teacher_mrpc", "teacher", "mrpc", "none")
    assert record["report"]["rows"] == "ablation"
    assert build_failure(cfg, overrides, "run-x#1", ValueError("bad"), user_error=True)["error"] == "bad"


@pytest.fixture
def job(tmp_path: Path, monkeypatch):
    """kdrun.cli.main in-process as Hydra calls it for one job (RUN or MULTIRUN), its pipeline replaced by ``fail``."""
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    import kdrun.cli

    def run(mode: str, error: BaseException):
        cfg = compose_config("experiment=teacher_mrpc", f"hydra.mode={mode}", hydra=True)
        with open_dict(cfg):
            cfg.hydra.runtime.output_dir = str(tmp_path / "job")
            cfg.hydra.job.num = 3
        (tmp_path / "job").mkdir(exist_ok=True)
        HydraConfig.instance().set_config(cfg)

        def fail(*args):
            raise error

        monkeypatch.setattr(kdrun.cli, "_run", fail)
        task_cfg = cfg.copy()
        with open_dict(task_cfg):
            del task_cfg["hydra"]
        return kdrun.cli.main(task_cfg)  # with a config given, hydra.main calls the function directly

    yield run
    HydraConfig.instance().cfg = None


def test_a_failing_sweep_job_is_recorded_and_returns(job, tmp_path: Path, caplog) -> None:
    assert job("MULTIRUN", RuntimeError("boom")) is None
    record = json.loads((tmp_path / "job" / "results.json").read_text())
    assert (record["status"], record["error"], record["task"], record["run_id"]) == ("failed", "RuntimeError: boom", "mrpc", f"{run_id()}#3")
    [logged] = [r for r in caplog.records if r.levelname == "ERROR"]
    assert "failed: RuntimeError: boom" in logged.getMessage() and logged.exc_info  # the traceback goes to the job's log
    with pytest.raises(KeyboardInterrupt):  # Ctrl-C still stops the sweep
        job("MULTIRUN", KeyboardInterrupt())
    (tmp_path / "job" / "results.json").write_text(json.dumps({"run_id": "another sweep"}))
    with pytest.raises(RuntimeError, match="boom"):  # not even the failure can be recorded: Hydra must see it
        job("MULTIRUN", RuntimeError("boom"))


def test_a_single_run_stops_as_before(job, tmp_path: Path) -> None:
    from kdrun.pipeline import PipelineError

    with pytest.raises(SystemExit) as stop:
        job("RUN", PipelineError("no such stage"))
    assert stop.value.code == 2
    with pytest.raises(RuntimeError, match="boom"):
        job("RUN", RuntimeError("boom"))
    assert not (tmp_path / "job" / "results.json").exists()


# --- the sweep's table with failed jobs ----------------------------------------------------------------------


def _job(sweep: Path, name: str, ablation: str, task: str, score: float | None = None, error: str | None = None) -> Path:
    """A job directory as kdrun leaves it: Hydra's .hydra/config.yaml and (unless killed) its results.json."""
    job = sweep / name
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "config.yaml").write_text("{}\n")
    record = {"run_id": f"r#{name}", "experiment": f"tinybert_{task}", "recipe": "tinybert", "task": task, "ablation": ablation,
              "report": {"rows": "ablation", "columns": "task"}}
    if error is not None:
        record.update(status="failed", error=error)
    elif score is not None:
        record.update(status="ok", main_score=score, efficiency={"parameters": 14_000_000, "latency_ms_bs1": 20.0 + score})
    else:
        return job  # killed before writing results.json
    (job / "results.json").write_text(json.dumps(record))
    return job


@pytest.fixture
def failing_sweep(tmp_path: Path) -> Path:
    sweep = tmp_path / "sweep"
    _job(sweep, "0", "none", "mrpc", 0.80)
    _job(sweep, "1", "none", "mrpc", 0.84)
    _job(sweep, "2", "none", "mrpc", error="Out of memory\nin step 3")  # a third seed failed: not in the mean
    _job(sweep, "3", "no_attn", "mrpc", error="GLUE data for MRPC not found under /nowhere")
    _job(sweep, "4", "no_attn", "cola", 0.25)
    _job(sweep, "5", "no_pred", "cola")  # killed: no results.json
    return sweep


def test_failed_runs_are_marked_and_never_averaged(failing_sweep: Path, tmp_path: Path) -> None:
    runs = load_runs([failing_sweep])
    table = build_table(runs)
    assert table.rows == ["none", "no_attn"] and table.columns == ["mrpc", "cola"]
    assert table.cells[("none", "mrpc")].values == pytest.approx([80.0, 84.0])
    assert table.body() == [
        ["none", "82.00 ± 2.83 (1 failed)", "-", "14.00", "20.82"],  # latency: the mean of the two runs that finished
        ["no_attn", "failed", "25.00", "14.00", "20.25"],
    ]
    error_lines = [
        f"failed: none / mrpc ({failing_sweep / '2'}): Out of memory in step 3",
        f"failed: no_attn / mrpc ({failing_sweep / '3'}): GLUE data for MRPC not found under /nowhere",
    ]
    assert table.notes == [FAILED_NOTE] and table.footer == [FAILED_NOTE, *error_lines]
    written = write_report(runs, tmp_path / "out")
    markdown = written["md"].read_text()
    assert "| no_attn | failed | 25.00 | 14.00 | 20.25 |" in markdown
    assert markdown.endswith("\n\n".join([FAILED_NOTE, *error_lines]) + "\n")
    latex = to_latex(table)
    assert r"no\_attn & failed & 25.00" in latex and "Out of memory" not in latex and "not in the mean" in latex
    with written["csv"].open() as handle:
        cells = {(line["ablation"], line["task"]): (line["mean"], line["n"], line["failed_runs"]) for line in csv.DictReader(handle)}
    assert cells[("none", "mrpc")] == ("82.0000", "2", "1") and cells[("no_attn", "mrpc")] == ("", "0", "1")
    assert _pareto_points(table, "params (M)") == [("none", 14.0, pytest.approx(82.0))]  # no score, no point


def test_sweep_callback_writes_the_table_then_exits_nonzero(failing_sweep: Path, caplog) -> None:
    runs = load_runs([failing_sweep])
    assert len(sweep_jobs(failing_sweep, runs)) == 6
    assert list(failed_jobs(failing_sweep, runs)) == [str(failing_sweep / name) for name in ("2", "3", "5")]
    with pytest.raises(SystemExit) as stop:
        SweepReport().on_multirun_end(OmegaConf.create({"hydra": {"sweep": {"dir": str(failing_sweep)}}}))
    assert stop.value.code == 1
    assert "| no_attn | failed | 25.00 |" in (failing_sweep / "summary.md").read_text()
    assert "3 of 6 jobs failed" in caplog.text and f"{failing_sweep / '5'}: no results.json" in caplog.text


# --- real sweeps -----------------------------------------------------------------------------------------------------
