"""Sweep reports: aggregation of fixture run directories into exact tables, files and plots."""

from __future__ import annotations

import csv
import json
import statistics
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from kdrun.report import ReportError, build_table, load_runs, main, write_report
from kdrun.report.plots import pareto_front, score_metrics
from kdrun.report.tables import to_latex, to_markdown, training_histories
from kdrun.report.callback import SweepReport
from kdrun.report.runs import load_reference


def write_run(root: Path, name: str, ablation: str, task: str, score: float, parameters: int = 0, latency: float = 0.0, seed: int = 42) -> None:
    directory = root / name
    directory.mkdir(parents=True)
    record = {
        "experiment": f"tinybert_{task}", "recipe": "tinybert", "task": task, "ablation": ablation, "main_score": score,
        "overrides": [f"task_distill.prediction.train.seed={seed}"],
        "report": {"rows": "ablation", "columns": "task", "metric": "main_score", "scale": 100.0, "reference": None, "relative_to": None},
        "stages": {"task_distill": {"summary": {"history": [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.0}, {"step": 2, "eval_accuracy": 0.5}]}}},
    }
    if parameters:
        record["efficiency"] = {"parameters": parameters, "latency_ms_bs1": latency}
    (directory / "results.json").write_text(json.dumps(record))


@pytest.fixture
def sweep(tmp_path: Path) -> Path:
    root = tmp_path / "sweep"
    # ablation x task, with three seeds of the full recipe on MRPC
    write_run(root, "0", "none", "mrpc", 0.80, 14_000_000, 20.0, seed=1)
    write_run(root, "1", "none", "mrpc", 0.82, 14_000_000, 22.0, seed=2)
    write_run(root, "2", "none", "mrpc", 0.84, 14_000_000, 24.0, seed=3)
    write_run(root, "3", "no_attn", "mrpc", 0.75, 14_000_000, 21.0)
    write_run(root, "4", "none", "cola", 0.30, 14_000_000, 20.0)
    write_run(root, "5", "no_attn", "cola", 0.25, 14_000_000, 21.0)
    (root / "6").mkdir()  # a failed job: no results.json
    return root


@pytest.fixture
def reference(tmp_path: Path) -> Path:
    path = tmp_path / "ref.yaml"
    path.write_text(yaml.safe_dump({
        "source": "Jiao et al. 2020, Table 3", "split": "dev",
        "rows": {"none": {"mrpc": 85.8, "cola": 50.8}, "no_attn": {"mrpc": 82.3}},
    }))
    return path


def test_table_aggregates_seeds_and_places_published_numbers(sweep: Path, reference: Path) -> None:
    runs = load_runs([sweep])
    assert len(runs) == 6
    table = build_table(runs, {"reference": str(reference)})
    assert table.rows == ["none", "no_attn"] and table.columns == ["mrpc", "cola"]
    none_mrpc = table.cells[("none", "mrpc")]
    assert none_mrpc.values == pytest.approx([80.0, 82.0, 84.0])
    assert none_mrpc.mean == pytest.approx(82.0) and none_mrpc.std == pytest.approx(statistics.stdev([80.0, 82.0, 84.0])) == pytest.approx(2.0)
    assert table.header() == ["ablation", "mrpc", "mrpc (paper)", "mrpc Δ", "cola", "cola (paper)", "cola Δ", "params (M)", "latency bs1 (ms)"]
    assert table.body() == [
        ["none", "82.00 ± 2.00", "85.80", "-3.80", "30.00", "50.80", "-20.80", "14.00", "21.50"],
        ["no_attn", "75.00", "82.30", "-7.30", "25.00", "-", "-", "14.00", "21.00"],
    ]


def test_rows_keep_the_order_the_sweep_launched_them_in(tmp_path: Path) -> None:
    """Job 10 comes after job 9, not after job 1: with twelve jobs, text order put the last row second."""
    root = tmp_path / "sweep"
    rows = ["g1", "g12", "g128", "grow"]
    for job in range(12):
        write_run(root, str(job), rows[job // 3], "sst2", 0.8, seed=job % 3)
    runs = load_runs([root])
    assert [Path(run["_path"]).name for run in runs] == [str(job) for job in range(12)]
    assert build_table(runs, {}).rows == rows


def test_markdown_latex_and_csv_files(sweep: Path, reference: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    written = write_report(load_runs([sweep]), out, {"reference": str(reference)})
    markdown = written["md"].read_text()
    assert "| ablation | mrpc | mrpc (paper) | mrpc Δ |" in markdown
    assert "| none | 82.00 ± 2.00 | 85.80 | -3.80 | 30.00 | 50.80 | -20.80 | 14.00 | 21.50 |" in markdown
    latex = written["tex"].read_text()
    assert r"no\_attn & 75.00 & 82.30 & -7.30" in latex and r"82.00 $\pm$ 2.00" in latex and r"\toprule" in latex
    with written["csv"].open() as handle:
        lines = list(csv.DictReader(handle))
    assert [(line["ablation"], line["task"], line["mean"], line["n"], line["published"]) for line in lines] == [
        ("none", "mrpc", "82.0000", "3", "85.8000"), ("none", "cola", "30.0000", "1", "50.8000"),
        ("no_attn", "mrpc", "75.0000", "1", "82.3000"), ("no_attn", "cola", "25.0000", "1", ""),
    ]
    assert written["pareto_parameters"].is_file() and written["pareto_latency"].with_suffix(".svg").is_file()
    assert sorted(p.name for p in (out / "curves").glob("*.png")) == ["no_attn_cola.png", "no_attn_mrpc.png", "none_cola.png", "none_mrpc.png"]


def test_relative_rows_merged_references_and_errors(sweep: Path, tmp_path: Path) -> None:
    table = build_table(load_runs([sweep]), {"relative_to": "none"})
    assert table.cells[("no_attn", "mrpc")].mean == pytest.approx(75.0 - 82.0)
    assert table.cells[("none", "cola")].mean == pytest.approx(0.0)
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text(yaml.safe_dump({"source": "T2", "rows": {"none": {"mrpc": 1.0}}}))
    b.write_text(yaml.safe_dump({"source": "T3", "rows": {"none": {"mrpc": 2.0}, "no_attn": {"mrpc": 3.0}}}))
    b.write_text(yaml.safe_dump({"source": "T3", "task_columns": {"cola": "cola_mcc"},
                                 "rows": {"none": {"mrpc": 2.0, "cola_mcc": 4.0}, "no_attn": {"mrpc": 3.0}}}))
    merged = build_table(load_runs([sweep]), {"reference": f"{a},{b}"})
    assert merged.cells[("none", "mrpc")].published == 1.0 and merged.cells[("no_attn", "mrpc")].published == 3.0
    assert merged.cells[("none", "cola")].published == 4.0  # the task's column named by task_columns
    tinybert = load_reference("tinybert_table2,tinybert_table3")
    assert tinybert["source"] == "Jiao et al. 2020, TinyBERT: Distilling BERT for Natural Language Understanding, Findings of EMNLP 2020, Table 2; Table 3"
    assert load_reference(f"{a},{b}")["source"] == "T2; T3"
    with pytest.raises(ReportError, match="reference table 'no_such_table' not found"):
        build_table(load_runs([sweep]), {"reference": "no_such_table"})
    with pytest.raises(ReportError, match="no results.json"):
        build_table([])


def test_pareto_front() -> None:
    points = [("a", 10.0, 80.0), ("b", 5.0, 70.0), ("c", 12.0, 79.0), ("d", 20.0, 85.0), ("e", 5.0, 60.0)]
    assert [p[0] for p in pareto_front(points)] == ["b", "a", "d"]


def test_command_line_and_sweep_callback(sweep: Path, tmp_path: Path, capsys) -> None:
    main([str(sweep), "--rows", "task", "--columns", "ablation", "--out", str(tmp_path / "cli")])
    assert "| mrpc | 82.00 ± 2.00 | 75.00 |" in (tmp_path / "cli" / "summary.md").read_text()
    assert "6 runs" in capsys.readouterr().out
    SweepReport().on_multirun_end(OmegaConf.create({"hydra": {"sweep": {"dir": str(sweep)}}}))
    assert "| none | 82.00 ± 2.00 | 30.00 |" in (sweep / "summary.md").read_text()
    with pytest.raises(SystemExit, match="neither a run/sweep directory"):
        main([str(tmp_path / "missing")])


def test_shipped_reference_tables_parse() -> None:
    from kdrun.report.runs import REFERENCES_DIR

    for path in REFERENCES_DIR.glob("*.yaml"):
        table = yaml.safe_load(path.read_text())
        assert {"source", "split", "rows"} <= set(table), path.name
        columns = set(table.get("columns") or {})
        for row, values in table["rows"].items():
            assert isinstance(values, dict), (path.name, row)
            assert set(values) <= columns, (path.name, row, set(values) - columns)
        assert set((table.get("task_columns") or {}).values()) <= columns, path.name


def test_markdown_and_latex_escape_names() -> None:
    from kdrun.report.tables import Cell, SweepTable

    table = SweepTable("t_1: 50%", "ablation", "task", ["no_embd"], ["sst2"], {("no_embd", "sst2"): Cell([90.0])})
    assert r"no\_embd & 90.00" in to_latex(table) and r"t\_1: 50\%" in to_latex(table)
    assert "| no_embd | 90.00 |" in to_markdown(table)


def test_size_column_is_packed_size_when_quantized_else_the_fp32_file(tmp_path: Path) -> None:
    root = tmp_path / "qbert"
    write_run(root, "0", "qbert_fp32", "sst2", 0.89, 22_000_000, 40.0)
    write_run(root, "1", "qbert_w4", "sst2", 0.87, 22_000_000, 40.0)
    for name, efficiency in {"0": {"size_on_disk_bytes": 90_860_000}, "1": {"size_on_disk_bytes": 90_860_000,
                             "quantization": {"packed_bytes": 17_960_000, "compression": 5.06}}}.items():
        record = json.loads((root / name / "results.json").read_text())
        record["efficiency"].update(efficiency)
        (root / name / "results.json").write_text(json.dumps(record))
    table = build_table(load_runs([root]))
    assert table.extras["size (MB)"] == pytest.approx({"qbert_fp32": 90.86, "qbert_w4": 17.96})
    assert table.extras["compression"] == {"qbert_w4": 5.06}


def test_constant_predictors_are_marked_in_every_format(tmp_path: Path) -> None:
    root = tmp_path / "sweep"
    write_run(root, "0", "none", "mrpc", 0.8122)
    write_run(root, "1", "none", "mrpc", 0.7000)
    write_run(root, "2", "no_attn", "mrpc", 0.7500)
    record = json.loads((root / "0" / "results.json").read_text())
    record["predicts_one_class"] = "it predicts 'equivalent' for all 408 dev examples"
    (root / "0" / "results.json").write_text(json.dumps(record))
    written = write_report(load_runs([root]), tmp_path / "out")
    table = build_table(load_runs([root]))
    assert table.cells[("none", "mrpc")].one_class_runs == 1 and table.cells[("no_attn", "mrpc")].one_class_runs == 0
    assert table.body() == [["none", "75.61 ± 7.93 †"], ["no_attn", "75.00"]]
    note = "† a run whose model gives every example of a dev split the same class (a constant predictor)"
    assert table.notes == [note]
    assert written["md"].read_text().endswith(f"| none | 75.61 ± 7.93 † |\n| no_attn | 75.00 |\n\n{note}\n")
    assert r"75.61 $\pm$ 7.93 $\dagger$" in written["tex"].read_text() and r"$\dagger$ a run whose model" in written["tex"].read_text()
    with written["csv"].open() as handle:
        assert [(line["ablation"], line["one_class_runs"]) for line in csv.DictReader(handle)] == [("none", "1"), ("no_attn", "0")]
    # Without constant predictors a table carries no note.
    assert build_table(load_runs([root / "2"])).notes == []


def test_training_curves_include_the_steps_of_a_stage() -> None:
    intermediate = [{"step": 1, "loss": 9.0}]
    prediction = [{"step": 1, "loss": 0.7}, {"step": 1, "eval_f1": 0.81, "not_selectable_because": "it predicts one class"}]
    teacher = [{"step": 4, "loss": 0.5}]
    run = {"stages": {
        "finetune_teacher": {"summary": {"steps": 4, "history": teacher}},
        "augment": {"summary": {"rows": 10}},
        "task_distill": {"summary": {"intermediate": {"steps": 1, "history": intermediate}, "prediction": {"history": prediction}, "best_dev": {"f1": 0.81}}},
        "evaluate": {"summary": {"dev": {"f1": 0.81}}},
    }}
    assert training_histories(run) == {"finetune_teacher": teacher, "task_distill intermediate": intermediate, "task_distill prediction": prediction}


def test_curves_draw_scores_not_counts_or_losses() -> None:
    mlm_head = [{"step": 100, "eval_masked_token_accuracy": 0.21, "eval_masked_tokens": 4163, "eval_mlm_loss": 5.2},
                {"step": 200, "eval_masked_token_accuracy": 0.24, "eval_masked_tokens": 4163, "eval_mlm_loss": 4.9}]
    assert score_metrics(mlm_head) == ["eval_masked_token_accuracy"]
    cola = [{"step": 1, "loss": 0.7}, {"step": 2, "eval_mcc": -0.05}, {"step": 3, "eval_mcc": 0.31}]
    assert score_metrics(cola) == ["eval_mcc"]


def test_rows_named_by_recipe_find_the_papers_row_through_the_references_aliases(tmp_path: Path) -> None:
    """rows=recipe names TinyBERT-4 `tinybert` and DistilBERT's teacher `teacher`; the papers print them as
    `tinybert4` and `bert_base`. Without the aliases those cells had no published number."""
    for name, recipe, task in (("0", "tinybert", "sst2"), ("1", "teacher", "sst2"), ("2", "distilbert", "sst2")):
        write_run(tmp_path, name, "none", task, 0.86)
        record = json.loads((tmp_path / name / "results.json").read_text())
        record["recipe"] = recipe
        (tmp_path / name / "results.json").write_text(json.dumps(record))
    tinybert = build_table(load_runs([tmp_path]), {"rows": "recipe", "reference": "tinybert_table1"})
    assert tinybert.cells[("tinybert", "sst2")].published == 92.6 and tinybert.cells[("teacher", "sst2")].published == 93.4
    distilbert = build_table(load_runs([tmp_path]), {"rows": "recipe", "reference": "distilbert_table1"})
    bert_base = load_reference("distilbert_table1")["rows"]["bert_base"]["sst2"]
    assert distilbert.cells[("teacher", "sst2")].published == bert_base
    assert distilbert.cells[("distilbert", "sst2")].published == load_reference("distilbert_table1")["rows"]["distilbert"]["sst2"]
    assert distilbert.cells[("tinybert", "sst2")].published is None  # no alias, no row: no number
    merged = load_reference("tinybert_table1,distilbert_table1")
    assert merged["aliases"] == {"tinybert": "tinybert4", "teacher": "bert_base"}
