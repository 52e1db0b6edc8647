"""Tests for the GLUE task registry, TSV/hub loaders, sampling and submission files."""

from __future__ import annotations

import math
import time
from pathlib import Path

import datasets
import numpy as np
import pytest

from kdrun.data import glue as glue_mod
from kdrun.data.glue import (
    GlueDataNotFound,
    GlueFormatError,
    load_glue_split,
    sample_examples,
)
from kdrun.data.submission import write_glue_submission
from kdrun.data.tasks import TASKS, UnknownTaskError, get_task



def _write(root: Path, task_dir: str, split: str, text: str) -> Path:
    path = root / task_dir / f"{split}.tsv"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


# ----------------------------------------------------------------------------- tasks


def test_registry_covers_all_glue_tasks() -> None:
    assert set(TASKS) == {"cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "rte", "wnli"}
    assert get_task("mnli").label_names == ("entailment", "neutral", "contradiction")
    assert get_task("wnli").label_names == ("not_entailment", "entailment")
    assert get_task("stsb").is_regression and get_task("stsb").num_labels == 1
    assert get_task("mnli").num_labels == 3 and get_task("mnli").is_pair
    assert not get_task("sst2").is_pair
    assert get_task("cola").main_metric == "mcc"
    assert get_task("qqp").main_metric == "f1"
    assert get_task("stsb").main_metric == "pearson"
    assert get_task("mnli").eval_splits == ("dev_matched", "dev_mismatched")
    assert get_task("mnli").test_splits == ("test_matched", "test_mismatched")
    assert get_task("SST-2") is get_task("sst2")


def test_unknown_task_lists_known_names() -> None:
    with pytest.raises(UnknownTaskError, match="known tasks: .*sst2.*wnli") as err:
        get_task("squad")
    assert isinstance(err.value, ValueError)


# ------------------------------------------------------------------- real GLUE files

EXPECTED_ROWS = {
    "sst2": (67_349, 872, 1_821),
    "cola": (8_551, 1_043, 1_063),
    "mrpc": (3_668, 408, 1_725),
    "stsb": (5_749, 1_500, 1_379),
}


@pytest.fixture(scope="module")
def real(glue_dir: Path) -> dict[tuple[str, str], datasets.Dataset]:
    return {
        (t, s): load_glue_split(get_task(t), s, str(glue_dir))
        for t in EXPECTED_ROWS
        for s in ("train", "dev", "test")
    }


@pytest.mark.parametrize("task", sorted(EXPECTED_ROWS))
def test_real_row_counts_and_schema(real, task: str) -> None:
    for split, n in zip(("train", "dev", "test"), EXPECTED_ROWS[task]):
        ds = real[(task, split)]
        assert len(ds) == n, (task, split)
        assert list(ds.column_names) == ["id", "text_a", "text_b", "label"]
        assert ds.features["id"].dtype == "int64"
        ids = ds["id"][:]
        assert list(ids) == list(range(n))  # position / test index: stable cache keys


@pytest.mark.parametrize("task", ["sst2", "cola", "mrpc"])
def test_real_binary_label_sets(real, task: str) -> None:
    for split in ("train", "dev"):
        ds = real[(task, split)]
        assert ds.features["label"].dtype == "int64"
        assert set(ds["label"][:]) == {0, 1}
    assert set(real[(task, "test")]["label"][:]) == {-1}


def test_real_stsb_scores(real) -> None:
    for split in ("train", "dev"):
        ds = real[("stsb", split)]
        assert ds.features["label"].dtype == "float32"
        scores = np.asarray(ds["label"][:], dtype=np.float64)
        assert scores.min() >= 0.0 and scores.max() <= 5.0
        assert not np.isnan(scores).any()
        assert len(np.unique(scores)) > 10  # genuinely continuous, not rounded to ints
    assert np.isnan(np.asarray(real[("stsb", "test")]["label"][:], dtype=np.float64)).all()


def test_real_first_rows(real) -> None:
    # SST-2 keeps its trailing space (same as the hub copy).
    assert real[("sst2", "dev")][0] == {
        "id": 0,
        "text_a": "it 's a charming and often affecting journey . ",
        "text_b": "",
        "label": 1,
    }
    # CoLA train has no header: row 0 is real data.
    assert real[("cola", "train")][0] == {
        "id": 0,
        "text_a": "Our friends won't buy this analysis, let alone the next one we propose.",
        "text_b": "",
        "label": 1,
    }
    # CoLA dev has no final newline: the last row is still complete.
    last = real[("cola", "dev")][-1]
    assert last["text_a"] == "John talked to Bill about himself." and last["label"] == 1
    assert real[("mrpc", "train")][0] == {
        "id": 0,
        "text_a": 'Amrozi accused his brother , whom he called " the witness " , '
        "of deliberately distorting his evidence .",
        "text_b": 'Referring to him as only " the witness " , Amrozi accused his brother '
        "of deliberately distorting his evidence .",
        "label": 1,
    }
    # MRPC dev's header starts with a BOM ("\ufeffQuality"); it must still be found.
    assert real[("mrpc", "dev")][0]["text_a"].startswith("He said the foodservice pie business")
    assert real[("mrpc", "dev")][0]["label"] == 1
    stsb = real[("stsb", "dev")][0]
    assert stsb["text_a"] == "A man with a hard hat is dancing."
    assert stsb["text_b"] == "A man wearing a hard hat is dancing."
    assert stsb["label"] == pytest.approx(5.0)
    assert real[("stsb", "train")][1]["label"] == pytest.approx(3.8)
    assert real[("sst2", "test")][0]["text_a"] == "uneasy mishmash of styles and genres ."


def test_real_mrpc_unbalanced_quote_row_intact(real) -> None:
    # File line 79 opens a quote in both sentences and never closes it; with CSV
    # quoting enabled this would swallow the following lines.
    row = real[("mrpc", "train")][77]
    assert row["text_a"] == '" We are declaring war on sexual harassment and sexual assault .'
    assert row["text_b"] == (
        '" We have declared war on sexual assault and sexual harassment , " Rosa said .'
    )
    assert row["label"] == 1
    assert all(real[("mrpc", s)][i]["text_b"] for s in ("train", "dev", "test") for i in (0, -1))
    assert min(len(t) for t in real[("mrpc", "train")]["text_b"][:]) > 0


def test_glue_dir_env_fallback(glue_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GLUE_DIR", str(glue_dir))
    assert len(load_glue_split(get_task("mrpc"), "dev", None)) == 408


# ----------------------------------------------------------------- synthetic layouts


def test_wrong_field_count_names_file_and_line(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        "SST-2",
        "train",
        "sentence\tlabel\ngood film \t1\nbad film \t0\nno label here\ngreat \t1\n",
    )
    with pytest.raises(GlueFormatError) as err:
        load_glue_split(get_task("sst2"), "train", str(tmp_path))
    msg = str(err.value)
    assert str(path) in msg and "line 4" in msg and "expected 2" in msg and "found 1" in msg


def test_bad_label_names_file_and_line(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        "CoLA",
        "dev",
        "src\t1\t\tA fine sentence.\nsrc\t0\t*\tSentence bad.\nsrc\t2\t\tOops.\n",
    )
    with pytest.raises(GlueFormatError) as err:
        load_glue_split(get_task("cola"), "dev", str(tmp_path))
    msg = str(err.value)
    # CoLA dev has no header, so the third data row is line 3.
    assert str(path) in msg and "line 3" in msg and "'2'" in msg


def test_bad_stsb_score(tmp_path: Path) -> None:
    header = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n"
    row = "0\tg\tf\t2012\t0001\tnone\tnone\tA b.\tA c.\t{}\n"
    path = _write(tmp_path, "STS-B", "dev", header + row.format("4.5") + row.format("n/a"))
    with pytest.raises(GlueFormatError, match=r"line 3.*score 'n/a'") as err:
        load_glue_split(get_task("stsb"), "dev", str(tmp_path))
    assert str(path) in str(err.value)
    assert isinstance(err.value, ValueError)


MNLI_HEADER = (
    "index\tpromptID\tpairID\tgenre\tsentence1_binary_parse\tsentence2_binary_parse\t"
    "sentence1_parse\tsentence2_parse\tsentence1\tsentence2\tlabel1\tlabel2\tgold_label\n"
)


def _mnli_row(i: int, s1: str, s2: str, labels: list[str]) -> str:
    return "\t".join([str(i), "p", "q", "fiction", "(", "(", "(", "(", s1, s2, *labels]) + "\n"


def test_mnli_style_file(tmp_path: Path) -> None:
    _write(
        tmp_path,
        "MNLI",
        "dev_matched",
        MNLI_HEADER
        + _mnli_row(10, "A man sleeps.", "A person rests.", ["entailment", "neutral", "entailment"])
        + _mnli_row(11, "It rains.", "It is dry.", ["contradiction", "contradiction", "contradiction"])
        # Trailing annotator column missing: the gold label is still the last field.
        + _mnli_row(12, "Cats purr.", "Dogs bark.", ["neutral", "neutral"]),
    )
    task = get_task("mnli")
    ds = load_glue_split(task, "dev_matched", str(tmp_path))
    assert ds["label"][:] == [0, 2, 1]
    assert ds["id"][:] == [0, 1, 2]
    assert ds[1]["text_a"] == "It rains." and ds[1]["text_b"] == "It is dry."
    # Hub-style alias works too.
    assert len(load_glue_split(task, "validation_matched", str(tmp_path))) == 3

    _write(
        tmp_path,
        "MNLI",
        "dev_mismatched",
        MNLI_HEADER + _mnli_row(0, "a", "b", ["entailment", "entailment", "maybe"]),
    )
    with pytest.raises(GlueFormatError, match=r"line 2: label 'maybe'"):
        load_glue_split(task, "dev_mismatched", str(tmp_path))

    test_header = "\t".join(MNLI_HEADER.split("\t")[:10]) + "\n"
    _write(tmp_path, "MNLI", "test_mismatched", test_header + _mnli_row(5, "x", "y", [])[:-1])
    ds = load_glue_split(task, "test_mismatched", str(tmp_path))
    assert ds[0] == {"id": 5, "text_a": "x", "text_b": "y", "label": -1}


def test_qnli_and_rte_style_files(tmp_path: Path) -> None:
    _write(
        tmp_path,
        "QNLI",
        "train",
        "index\tquestion\tsentence\tlabel\n"
        "0\tWho?\tHe did.\tentailment\n"
        "1\tWhen?\t\"Never.\tnot_entailment",  # unbalanced quote, no final newline
    )
    ds = load_glue_split(get_task("qnli"), "train", str(tmp_path))
    assert ds["label"][:] == [0, 1]
    assert ds[1]["text_b"] == '"Never.'

    _write(tmp_path, "RTE", "dev", "index\tsentence1\tsentence2\tlabel\r\n0\tA.\tB.\tnot_entailment\r\n")
    ds = load_glue_split(get_task("rte"), "dev", str(tmp_path))
    assert ds[0] == {"id": 0, "text_a": "A.", "text_b": "B.", "label": 1}

    # WNLI uses digit labels where 1 = entailment, which is index 1 in its order.
    _write(tmp_path, "WNLI", "dev", "index\tsentence1\tsentence2\tlabel\n0\tA.\tB.\t1\n1\tC.\tD.\t0\n")
    assert load_glue_split(get_task("wnli"), "dev", str(tmp_path))["label"][:] == [1, 0]

    # QQP test uses an `id` column, not `index`, and ids need not start at 0.
    _write(tmp_path, "QQP", "test", "id\tquestion1\tquestion2\n7\tq1?\tq2?\n3\tq3?\tq4?\n")
    ds = load_glue_split(get_task("qqp"), "test", str(tmp_path))
    assert ds["id"][:] == [7, 3] and ds["label"][:] == [-1, -1]


def test_header_missing_column(tmp_path: Path) -> None:
    _write(tmp_path, "RTE", "train", "index\ttext1\ttext2\tlabel\n0\tA.\tB.\tentailment\n")
    with pytest.raises(GlueFormatError, match=r"line 1: header has no column 'sentence1'"):
        load_glue_split(get_task("rte"), "train", str(tmp_path))


def test_unknown_split(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="dev_matched"):
        load_glue_split(get_task("mnli"), "dev", str(tmp_path))


# --------------------------------------------------------------------- missing data


def test_missing_dir(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(GlueDataNotFound) as err:
        load_glue_split(get_task("sst2"), "train", str(missing))
    msg = str(err.value)
    assert str(missing) in msg
    assert "data.glue_dir=/path/to/glue_data" in msg and "export GLUE_DIR=" in msg
    assert "SST-2/train.tsv" in msg
    assert isinstance(err.value, FileNotFoundError)


def test_missing_file(tmp_path: Path) -> None:
    (tmp_path / "SST-2").mkdir()
    with pytest.raises(GlueDataNotFound) as err:
        load_glue_split(get_task("sst2"), "dev", str(tmp_path))
    msg = str(err.value)
    assert str(tmp_path / "SST-2" / "dev.tsv") in msg
    assert "data.glue_dir=" in msg and "GLUE_DIR" in msg


def test_hub_offline_gives_one_paragraph(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GLUE_DIR", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    import datasets.config
    import huggingface_hub.constants

    flags_before = (datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE)
    start = time.perf_counter()
    with pytest.raises(GlueDataNotFound) as err:
        load_glue_split(get_task("sst2"), "dev", None)
    assert time.perf_counter() - start < 5.0  # the env set after import is honoured
    msg = str(err.value)
    assert "\n" not in msg
    for needle in ("GLUE_DIR", "data.glue_dir", "export GLUE_DIR=/path/to/glue_data",
                   "SST-2/train.tsv", "SST-2/dev.tsv", "download_glue_data.py", "nyu-mll/glue"):
        assert needle in msg
    assert err.value.__cause__ is not None  # underlying error chained, not shown raw
    assert "OfflineModeIsEnabled" in msg  # short underlying reason included
    # The libraries' own offline flags are restored afterwards.
    assert (datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE) == flags_before


def test_hub_conversion(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GLUE_DIR", raising=False)
    calls = []

    def fake_load(path: str, name: str, split: str) -> datasets.Dataset:
        calls.append((path, name, split))
        if name == "mnli":
            return datasets.Dataset.from_dict(
                {"premise": ["p0", "p1"], "hypothesis": ["h0", "h1"], "label": [2, -1], "idx": [0, 1]}
            )
        return datasets.Dataset.from_dict(
            {"sentence1": ["a"], "sentence2": ["b"], "label": [-1.0], "idx": [4]}
        )

    monkeypatch.setattr(glue_mod.datasets, "load_dataset", fake_load)
    ds = load_glue_split(get_task("mnli"), "dev_mismatched", None)
    assert calls[-1] == ("nyu-mll/glue", "mnli", "validation_mismatched")
    assert ds[:] == {"id": [0, 1], "text_a": ["p0", "p1"], "text_b": ["h0", "h1"], "label": [2, -1]}
    ds = load_glue_split(get_task("stsb"), "test", None)
    assert calls[-1] == ("nyu-mll/glue", "stsb", "test")
    assert ds[0]["id"] == 4 and math.isnan(ds[0]["label"])
    assert ds.features == glue_mod.features_for(get_task("stsb"))


# ------------------------------------------------------------------------- sampling


def _positions(n: int) -> datasets.Dataset:
    return datasets.Dataset.from_dict(
        {"id": list(range(n)), "text_a": [f"s{i}" for i in range(n)], "text_b": [""] * n,
         "label": [i % 2 for i in range(n)]}
    )


def test_sample_examples() -> None:
    ds = _positions(500)
    assert sample_examples(ds, None, 0) is ds
    assert sample_examples(ds, 500, 0) is ds
    assert sample_examples(ds, 10_000, 0) is ds
    a = sample_examples(ds, 50, seed=1)
    ids = a["id"][:]
    assert len(a) == 50 and len(set(ids)) == 50
    assert ids == sorted(ids)
    assert ids != list(range(50))
    assert sample_examples(ds, 50, seed=1)["id"][:] == ids
    assert sample_examples(ds, 50, seed=2)["id"][:] != ids
    assert [f"s{i}" for i in ids] == a["text_a"][:]  # rows stay aligned
    with pytest.raises(ValueError):
        sample_examples(ds, -1, 0)


# ----------------------------------------------------------------------- submission


def test_submission_rte_string_labels(tmp_path: Path) -> None:
    task = get_task("rte")
    logits = np.array([[2.0, 0.1], [0.0, 1.0], [0.3, -1.0]])
    path = write_glue_submission(task, "test", [2, 0, 1], logits, tmp_path / "sub")
    assert path == tmp_path / "sub" / "RTE.tsv"
    assert path.read_text(encoding="utf-8") == (
        "index\tprediction\n0\tnot_entailment\n1\tentailment\n2\tentailment\n"
    )


def test_submission_stsb_and_names(tmp_path: Path) -> None:
    path = write_glue_submission(
        get_task("stsb"), "test", [0, 1, 2], np.array([[5.7], [-0.2], [3.14159]]), tmp_path
    )
    assert path.name == "STS-B.tsv"
    assert path.read_text().splitlines() == ["index\tprediction", "0\t5.000", "1\t0.000", "2\t3.142"]
    mm = write_glue_submission(get_task("mnli"), "test_mismatched", [0], np.array([1]), tmp_path)
    assert mm.name == "MNLI-mm.tsv" and mm.read_text().splitlines()[1] == "0\tneutral"
    m = write_glue_submission(get_task("mnli"), "test_matched", [0], np.array([2]), tmp_path)
    assert m.name == "MNLI-m.tsv"
    sst = write_glue_submission(get_task("sst2"), "test", [0, 1], np.array([1, 0]), tmp_path)
    assert sst.name == "SST-2.tsv" and sst.read_text().splitlines()[1:] == ["0\t1", "1\t0"]
    with pytest.raises(ValueError):
        write_glue_submission(get_task("sst2"), "dev", [0], np.array([1]), tmp_path)
    with pytest.raises(ValueError):
        write_glue_submission(get_task("sst2"), "test", [0, 1], np.array([1]), tmp_path)
