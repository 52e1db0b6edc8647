"""TinyBERT wiring: student shapes, corpus packing, teacher-logit lookup, and the pipeline end to end."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from omegaconf import OmegaConf
from transformers import BertConfig

from kdrun.data.corpus import packed_sequences
from kdrun.distill.losses import WidthProjections
from kdrun.distill.teacher_logits import TeacherLogits
from kdrun.models.students import new_general_student, student_bert_config

from composing import compose_config

TINY_STUDENT = (
    "student.num_hidden_layers=2",
    "student.hidden_size=24",
    "student.num_attention_heads=2",
    "student.intermediate_size=48",
)


def test_tinybert4_has_the_papers_parameter_count() -> None:
    bert_base = BertConfig()  # vocab 30522, 512 positions, hidden 768
    student_cfg = compose_config("student=tinybert4").student
    student = new_general_student(student_cfg, bert_base)
    assert (student.config.num_hidden_layers, student.config.hidden_size, student.config.intermediate_size) == (4, 312, 1200)
    embeddings = 30522 * 312 + 512 * 312 + 2 * 312 + 2 * 312
    layer = 4 * (312 * 312 + 312) + 2 * 312 + (312 * 1200 + 1200) + (1200 * 312 + 312) + 2 * 312
    pooler = 312 * 312 + 312
    encoder = sum(p.numel() for p in student.parameters())
    assert encoder == embeddings + 4 * layer + pooler == 14_350_248
    # The paper's 14.5M counts the learnt map W_h (312 -> 768) too.
    fit_dense = sum(p.numel() for p in WidthProjections(312, 768, 4).parameters())
    assert encoder + fit_dense == 14_590_632


def test_student_takes_the_teachers_vocabulary() -> None:
    teacher = BertConfig(vocab_size=1234, max_position_embeddings=77, type_vocab_size=3)
    config = student_bert_config(OmegaConf.create({"num_hidden_layers": 2, "hidden_size": 24, "intermediate_size": 48, "num_attention_heads": 2}), teacher)
    assert (config.vocab_size, config.max_position_embeddings, config.type_vocab_size) == (1234, 77, 3)


class _WordTokenizer:
    """One token per word, ids = word lengths: enough to check packing exactly."""

    cls_token_id, sep_token_id = 101, 102

    def __call__(self, texts: list[str], add_special_tokens: bool = False) -> dict:
        return {"input_ids": [[len(w) for w in t.split()] for t in texts]}


def test_corpus_packing_respects_documents_and_length(tmp_path: Path) -> None:
    corpus = tmp_path / "c.txt"
    corpus.write_text("a bb ccc dddd\neeeee\n\nf gg\n\nhhh\n")
    sequences = list(packed_sequences([corpus], _WordTokenizer(), max_seq_length=5, chunk_lines=2))
    assert [s["input_ids"] for s in sequences] == [
        [101, 1, 2, 3, 102],  # document 1, first 3 tokens
        [101, 4, 5, 102],  # the rest of document 1 (never spans into document 2)
        [101, 1, 2, 102],
        [101, 3, 102],
    ]
    assert [s["id"] for s in sequences] == [0, 1, 2, 3]
    assert all(s["attention_mask"] == [1] * s["length"] for s in sequences)
    assert len(list(packed_sequences([corpus], _WordTokenizer(), max_seq_length=5, max_sequences=2))) == 2


def test_teacher_logits_follow_example_ids_through_shuffled_batches(tmp_path: Path) -> None:
    ids = torch.tensor([40, 10, 30, 20])
    logits = torch.tensor([[4.0, -4.0], [1.0, -1.0], [3.0, -3.0], [2.0, -2.0]])
    table = TeacherLogits(ids, logits)
    assert table(torch.tensor([20, 40])).tolist() == [[2.0, -2.0], [4.0, -4.0]]
    table.save(tmp_path / "t.safetensors")
    reloaded = TeacherLogits.load(tmp_path / "t.safetensors")
    shuffled = torch.tensor([30, 10, 20, 40])
    assert torch.equal(reloaded(shuffled), torch.tensor([[3.0, -3.0], [1.0, -1.0], [2.0, -2.0], [4.0, -4.0]]))


def _results(cwd: Path) -> dict:
    [path] = list((cwd / "outputs" / "runs").rglob("results.json"))
    return json.loads(path.read_text())


def test_tinybert_pipeline_end_to_end(run_kdrun, tiny_bert_dir, glue_dir, tmp_path) -> None:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(f"The film number {i} was a good one and people liked it a lot." for i in range(60)) + "\n")
    (tmp_path / "run").mkdir()
    run_kdrun(
        "experiment=tinybert_mrpc", "scale=smoke", "device=cpu", f"teacher.path={tiny_bert_dir}",
        f"data.glue_dir={glue_dir}", f"data.corpus={corpus}", *TINY_STUDENT, "evaluate.latency_repeats=1",
        "augment.n_iter=4", cwd=tmp_path / "run",
    )
    results = _results(tmp_path / "run")
    stages = results["stages"]
    assert list(stages) == ["finetune_teacher", "general_distill", "fit_mlm_head", "augment", "teacher_logits", "task_distill", "evaluate"]
    augment = stages["augment"]["summary"]
    assert augment["recipe"] == "tinybert" and augment["copies_per_example"] == 8  # 4 per sentence of a pair
    assert augment["source_examples"] == 64 and augment["rows"] > 64
    general = stages["general_distill"]["summary"]
    assert general["steps"] == 2 and general["corpus_sequences"] == 32  # capped by max_sequences
    task = stages["task_distill"]["summary"]
    assert task["init"] == str(tmp_path / "cache" / "general_distill" / stages["general_distill"]["key"] / "model")
    assert task["projections_from_general"] is True
    assert task["intermediate"]["steps"] == 3 and task["prediction"]["steps"] == 3
    assert set(results["metrics"]) == {"f1", "accuracy"}
    assert stages["evaluate"]["summary"]["model_from"] == "task_distill"
    assert results["efficiency"]["parameters"] == task["parameters"]
    # The teacher's logits: a stage of their own, on task distillation's (augmented) rows, read by example id.
    logits_stage = stages["teacher_logits"]
    assert task["teacher_logits"] == logits_stage["key"] and logits_stage["summary"]["rows"] == augment["rows"]
    logits_file = tmp_path / "cache" / "teacher_logits" / logits_stage["key"] / logits_stage["summary"]["file"]
    table = TeacherLogits.load(logits_file)
    assert len(table.row_of) == augment["rows"] == task["train_examples"] and table.logits.shape == (augment["rows"], 2)

    # A Table 3 row removes its term in both stages: it reuses the teacher (and its logits on the same rows)
    # but trains its own general student, without the term.
    (tmp_path / "ablation").mkdir()
    run_kdrun(
        "experiment=tinybert_mrpc", "scale=smoke", "device=cpu", f"teacher.path={tiny_bert_dir}",
        f"data.glue_dir={glue_dir}", f"data.corpus={corpus}", *TINY_STUDENT, "evaluate.latency_repeats=1",
        "augment.n_iter=4", "ablation=no_attn", cwd=tmp_path / "ablation",
    )
    ablated = _results(tmp_path / "ablation")["stages"]
    assert ([ablated[name]["cache"] for name in ("finetune_teacher", "teacher_logits", "general_distill", "task_distill")]
            == ["hit", "hit", "computed", "computed"])  # the same teacher's logits on the same rows
    assert ablated["general_distill"]["key"] != stages["general_distill"]["key"]
    assert ablated["task_distill"]["summary"]["teacher_logits"] == logits_stage["key"]
    for stage_summary, full_summary in ((ablated["task_distill"]["summary"]["intermediate"], task["intermediate"]), (ablated["general_distill"]["summary"], general)):
        full_terms, ablated_terms = set(full_summary["history"][0]), set(stage_summary["history"][0])
        assert {"embedding", "attention", "hidden"} <= full_terms
        assert {"embedding", "hidden"} <= ablated_terms and "attention" not in ablated_terms

    # w/o TD (Table 2): no fine-tuned teacher is needed; the student, built in the teacher's shape, learns the labels.
    (tmp_path / "no_td").mkdir()
    run_kdrun(
        "experiment=tinybert_mrpc", "scale=smoke", "device=cpu", f"teacher.path={tiny_bert_dir}",
        f"data.glue_dir={glue_dir}", f"data.corpus={corpus}", *TINY_STUDENT, "evaluate.latency_repeats=1",
        "augment.n_iter=4", "ablation=no_td", cwd=tmp_path / "no_td",
    )
    no_td = _results(tmp_path / "no_td")
    assert list(no_td["stages"]) == ["general_distill", "fit_mlm_head", "augment", "task_distill", "evaluate"]
    assert no_td["stages"]["general_distill"]["cache"] == "hit"  # the full recipe's general student
    summary = no_td["stages"]["task_distill"]["summary"]
    assert "intermediate" not in summary and summary["prediction"]["steps"] == 3 and "teacher_logits" not in summary
    assert set(no_td["metrics"]) == {"f1", "accuracy"}


def test_table3_rows_remove_their_term_from_general_distillation_too() -> None:
    """Rows with the full general-distillation weights share one general student; each term ablation has its own."""
    from kdrun.pipeline import plan

    keys, weights = {}, {}
    for row in ("none", "no_pred", "no_embd", "no_attn", "no_hidn", "no_trm"):
        cfg = compose_config("experiment=tinybert_mrpc", f"ablation={row}")
        keys[row] = {p.stage.name: p.key for p in plan(cfg)}["general_distill"]
        weights[row] = {k: cfg.distill.general_weights[k] for k in ("embedding", "attention", "hidden")}
    assert keys["none"] == keys["no_pred"]
    assert len({keys[row] for row in ("none", "no_embd", "no_attn", "no_hidn", "no_trm")}) == 5
    assert weights == {
        "none": {"embedding": 1.0, "attention": 1.0, "hidden": 1.0},
        "no_pred": {"embedding": 1.0, "attention": 1.0, "hidden": 1.0},
        "no_embd": {"embedding": 0.0, "attention": 1.0, "hidden": 1.0},
        "no_attn": {"embedding": 1.0, "attention": 0.0, "hidden": 1.0},
        "no_hidn": {"embedding": 1.0, "attention": 1.0, "hidden": 0.0},
        "no_trm": {"embedding": 1.0, "attention": 0.0, "hidden": 0.0},
    }


def test_a_student_as_wide_as_its_teacher_still_learns_fit_dense() -> None:
    """TinyBERT-6 beside a 768-wide teacher: the official code trains fit_dense at equal widths too."""
    from kdrun.methods import method_named

    teacher = BertConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64)
    student = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    distill = compose_config("distill=tinybert").distill
    projections = method_named("tinybert").layer_objective(distill, student, teacher, "task_distill").projections
    assert not projections.is_identity and projections.fit_dense.weight.shape == (32, 32)


def test_ablations_compose_into_the_right_pipelines() -> None:
    from kdrun.pipeline import plan

    no_gd = compose_config("experiment=tinybert_sst2", "ablation=no_gd")
    assert list(no_gd.pipeline.stages) == ["finetune_teacher", "fit_mlm_head", "augment", "teacher_logits", "task_distill", "evaluate"]
    # No task distillation: the fine-tuned teacher and its logits are not needed and are not computed.
    assert [p.stage.name for p in plan(compose_config("experiment=tinybert_sst2", "ablation=no_td"))] == [
        "general_distill", "fit_mlm_head", "augment", "task_distill", "evaluate",
    ]
    assert compose_config("experiment=tinybert_sst2", "augment=tang", "ablation=no_da").augment.name == "none"
    no_td = compose_config("experiment=tinybert_sst2", "ablation=no_td")
    assert no_td.task_distill.intermediate.enabled is False and no_td.distill.prediction_target == "labels"
    no_trm = compose_config("experiment=tinybert_sst2", "ablation=no_trm").distill.weights
    assert (no_trm.embedding, no_trm.attention, no_trm.hidden) == (1.0, 0.0, 0.0)
    assert compose_config("experiment=tinybert_sst2", "ablation=map_top").distill.mapping.kind == "top"
    assert compose_config("experiment=tinybert_sst2", "ablation=no_embd").ablation == "no_embd"


def test_impossible_distillation_settings_fail_before_training(run_kdrun, tiny_bert_dir, glue_dir, tmp_path) -> None:
    common = ("experiment=tinybert_sst2", "scale=smoke", f"teacher.path={tiny_bert_dir}", f"data.glue_dir={glue_dir}", *TINY_STUDENT)
    mapping = run_kdrun(*common, "distill.mapping.kind=list", "distill.mapping.layers=[1]", "data.corpus=/nowhere", check=False)
    assert mapping.returncode == 2 and "distill.mapping" in mapping.stdout + mapping.stderr
    corpus = run_kdrun(*common, "data.corpus=null", env={"KDRUN_CORPUS": ""}, check=False)
    output = corpus.stdout + corpus.stderr
    assert corpus.returncode == 2 and "data.corpus=" in output and "KDRUN_CORPUS" in output and "Traceback" not in output
    assert not (tmp_path / "cache" / "finetune_teacher").exists()  # nothing trained


def test_a_stage_list_without_teacher_logits_fails_before_training(run_kdrun, tiny_bert_dir, glue_dir, tmp_path) -> None:
    stages = "pipeline.stages=[finetune_teacher,task_distill,evaluate]"
    common = ("experiment=tinybert_sst2", "scale=smoke", f"teacher.path={tiny_bert_dir}", f"data.glue_dir={glue_dir}", *TINY_STUDENT, stages)
    result = run_kdrun(*common, check=False)
    output = result.stdout + result.stderr
    assert result.returncode == 2 and "put teacher_logits after finetune_teacher" in output and "Traceback" not in output
    assert not (tmp_path / "cache" / "finetune_teacher").exists()  # nothing trained
    # Learning the gold labels alone, the prediction step needs no teacher logits, and the same list runs.
    assert run_kdrun(*common, "distill.prediction_target=labels", "task_distill.intermediate.enabled=false",
                     "evaluate.measure_latency=false", "evaluate.formats=[fp32]").returncode == 0


def test_hub_corpus_is_streamed_row_by_row(monkeypatch) -> None:
    import kdrun.data.corpus as corpus_module

    calls = []

    def fake_load_dataset(name, config, split, streaming):
        calls.append((name, config, split, streaming))
        return iter([{"text": "a bb\n\nccc"}, {"text": "dddd"}])

    monkeypatch.setattr(corpus_module.datasets, "load_dataset", fake_load_dataset)
    sequences = list(packed_sequences("hf:wikitext:wikitext-2-raw-v1", _WordTokenizer(), max_seq_length=8))
    assert calls == [("wikitext", "wikitext-2-raw-v1", "train", True)]
    assert [s["input_ids"] for s in sequences] == [[101, 1, 2, 102], [101, 3, 102], [101, 4, 102]]


def test_unreachable_hub_corpus_says_how_to_use_a_local_file(monkeypatch) -> None:
    import pytest

    import kdrun.data.corpus as corpus_module

    def offline(*args, **kwargs):
        raise ConnectionError("hub unreachable")

    monkeypatch.setattr(corpus_module.datasets, "load_dataset", offline)
    with pytest.raises(corpus_module.CorpusNotFound, match=r"ConnectionError: hub unreachable.*data.corpus=/path/to/corpus.txt"):
        list(packed_sequences("hf:wikitext", _WordTokenizer(), max_seq_length=8))


def test_task_distillation_on_tang_augmented_data(run_kdrun, tiny_bert_dir, glue_dir, tmp_path) -> None:
    """augment=tang writes the originals plus their copies; task distillation trains on all of them."""
    run_kdrun(
        "experiment=tinybert_sst2", "scale=smoke", "device=cpu", f"teacher.path={tiny_bert_dir}", f"data.glue_dir={glue_dir}",
        *TINY_STUDENT, "ablation=no_gd", "augment=tang", "augment.n_iter=4", "augment.shard_size=20",
        "evaluate.measure_latency=false",
    )
    stages = _results(tmp_path)["stages"]
    augment = stages["augment"]["summary"]
    assert augment["source_examples"] == 64 and augment["shards"] == 4
    assert 64 < augment["rows"] <= 64 * 5  # identical copies are dropped
    [shards] = list((tmp_path / "cache" / "augment").glob("*/shards"))
    rows = [json.loads(line) for path in sorted(shards.glob("*.jsonl")) for line in path.open()]
    assert len(rows) == augment["rows"] and len({r["id"] for r in rows}) == len(rows)
    assert all(r["id"] // 5 == r["source_id"] for r in rows)
    originals = {r["source_id"]: r for r in rows if r["id"] % 5 == 0}
    assert len(originals) == 64
    assert all(r["label"] == originals[r["source_id"]]["label"] for r in rows)
    assert stages["task_distill"]["summary"]["train_examples"] == augment["rows"]


def test_stsb_prediction_step_fits_the_gold_scores_as_the_official_code_does() -> None:
    """TinyBERT's regression prediction step: MSE to the labels (copied onto augmented rows), no teacher logits;
    Tang et al.'s BiLSTM and classification tasks still distil the teacher's outputs."""
    import pytest

    from kdrun.methods import method_of
    from kdrun.pipeline import PipelineError
    from kdrun.stages.task_distill import check

    def _prediction_settings(cfg):
        return method_of(cfg).prediction_settings(cfg.distill, cfg.task.name == "stsb")

    assert _prediction_settings(compose_config("experiment=tinybert_stsb")).hard_weight == 1.0
    assert _prediction_settings(compose_config("experiment=tinybert_sst2")).hard_weight == 0.0
    assert _prediction_settings(compose_config("experiment=bilstm_stsb")).hard_weight == 0.0
    assert _prediction_settings(compose_config("experiment=tinybert_stsb", "distill.regression_target=teacher")).hard_weight == 0.0
    with pytest.raises(PipelineError, match="distill.regression_target must be one of"):
        check(compose_config("experiment=tinybert_stsb", "distill.regression_target=gold"))


TINYBERT_ROWS = ("none", "no_embd", "no_pred", "no_trm", "no_attn", "no_hidn", "map_top", "map_bottom", "no_gd", "no_td", "no_da")


def test_every_tinybert_ablation_row_runs_end_to_end(tiny_bert_dir, glue_dir, tmp_path) -> None:
    """Tables 2, 3 and 4 row by row at scale=smoke, in one process and one cache (as a sweep runs them):
    a row that is only planned can still crash when it runs (no_td did)."""
    from kdrun.pipeline import run_pipeline

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(f"The film number {i} was a good one and people liked it a lot." for i in range(60)) + "\n")
    scores = {}
    for row in TINYBERT_ROWS:
        cfg = compose_config(
            "experiment=tinybert_mrpc", "scale=smoke", "device=cpu", f"teacher.path={tiny_bert_dir}", f"data.glue_dir={glue_dir}",
            f"data.corpus={corpus}", *TINY_STUDENT, "evaluate.measure_latency=false", "evaluate.formats=[fp32]",
            "augment.n_iter=2", f"cache.dir={tmp_path / 'cache'}", f"ablation={row}",
        )
        (tmp_path / row).mkdir()
        outputs = run_pipeline(cfg, tmp_path / row)
        evaluation = outputs["evaluate"].summary
        assert set(evaluation["dev"]) == {"f1", "accuracy"} and evaluation["model_from"] == "task_distill", row
        scores[row] = outputs
    assert "general_distill" not in scores["no_gd"] and "finetune_teacher" not in scores["no_td"]
    assert scores["no_da"]["augment"].summary.get("passthrough") is True
    # Rows that share the full general-distillation weights share the general student; term rows have their own.
    general = {row: out["general_distill"].key for row, out in scores.items() if "general_distill" in out}
    assert general["none"] == general["no_pred"] == general["no_da"] == general["no_td"]
    assert len({general[row] for row in ("none", "no_embd", "no_trm", "no_attn", "no_hidn", "map_top", "map_bottom")}) == 7
