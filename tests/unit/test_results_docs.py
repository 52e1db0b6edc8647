"""docs/results.md is rendered from stored records: runs, deployment rows, the resume matrix, benchmarks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kdrun.report.docs import add_run, main, render

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
