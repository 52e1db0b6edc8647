"""BERT -> BiLSTM (Tang et al.): the student, its tokenizer, the logit loss, cached logits, the recipe."""

from __future__ import annotations

import json
import re
import math
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from kdrun.data.tasks import get_task
from kdrun.distill.prediction import PredictionLossSettings, prediction_loss
from kdrun.distill.layers import StudentWithProjections
from kdrun.distill.teacher_logits import TeacherLogits
from kdrun.models.bilstm import BiLstmConfig, BiLstmForSequenceClassification, training_vocabulary, word_tokenizer
from kdrun.models.students import bilstm_student_for_task
from kdrun.pipeline import plan

from composing import compose_config

TEXTS = ["A fine, fine film.", "a dull film", "the actors are fine"]


def _model(pair: bool, labels: int = 2) -> tuple[BiLstmForSequenceClassification, object]:
    tokenizer = word_tokenizer(training_vocabulary(TEXTS))
    torch.manual_seed(0)
    config = BiLstmConfig(vocab_size=len(tokenizer), embedding_dim=6, lstm_hidden_size=5, classifier_hidden_size=7, pair=pair, num_labels=labels)
    return BiLstmForSequenceClassification(config).eval(), tokenizer


def test_vocabulary_is_normalised_and_by_frequency() -> None:
    assert training_vocabulary(TEXTS) == ["fine", "a", "film", ",", ".", "actors", "are", "dull", "the"]
    assert training_vocabulary(TEXTS, min_count=2) == ["fine", "a", "film"]  # ties alphabetical


def test_tokenizer_marks_the_second_sentence() -> None:
    tokenizer = word_tokenizer(["a", "film"])
    encoded = tokenizer("A film", "unseen film")
    assert encoded["input_ids"] == [3, 4, 2, 1, 4]  # [SEP] = 2, [UNK] = 1
    assert encoded["token_type_ids"] == [0, 0, 1, 1, 1]


def test_single_sentence_shapes_and_padding_does_not_matter() -> None:
    model, tokenizer = _model(pair=False, labels=3)
    batch = tokenizer(["a fine film", "dull"], padding=True, return_tensors="pt")
    logits = model(**batch).logits
    alone = model(**tokenizer(["dull"], return_tensors="pt")).logits
    assert logits.shape == (2, 3)
    assert torch.allclose(logits[1], alone[0], atol=1e-6)
    # The feature is [last forward state, last backward state] of the BiLSTM.
    ids = tokenizer(["a fine film"], return_tensors="pt")["input_ids"]
    output, _ = model.lstm(model.embeddings(ids))
    expected = torch.cat([output[0, -1, :5], output[0, 0, 5:]])
    assert torch.allclose(model.encode(ids, torch.tensor([3]))[0], expected, atol=1e-6)


def test_pairs_are_siamese() -> None:
    model, tokenizer = _model(pair=True)
    batch = tokenizer(["a fine film", "dull"], ["the actors are fine", "a film ."], padding=True, return_tensors="pt")
    logits = model(**batch).logits

    def encode(text: str) -> torch.Tensor:
        ids = tokenizer([text], return_tensors="pt")["input_ids"]
        return model.encode(ids, torch.tensor([ids.shape[1]]))

    for row, (a, b) in enumerate([("a fine film", "the actors are fine"), ("dull", "a film .")]):
        h1, h2 = encode(a), encode(b)
        expected = model.classifier(torch.cat([h1, h2, h1 * h2, (h1 - h2).abs()], dim=-1))
        assert torch.allclose(logits[row], expected[0], atol=1e-6)


def test_saved_and_loaded_like_any_model(tmp_path: Path) -> None:
    model, tokenizer = _model(pair=True)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    loaded_tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    batch = loaded_tokenizer(["a fine film"], ["dull"], return_tensors="pt")
    assert type(loaded) is BiLstmForSequenceClassification
    assert torch.equal(loaded(**batch).logits, model(**batch).logits)


def test_glove_initialises_the_embeddings_of_known_words(tmp_path: Path) -> None:
    glove = tmp_path / "glove.txt"
    glove.write_text("film 1 2 3\nfine 0.5 0 -1\n")
    student = OmegaConf.create({
        "vocab_min_count": 1, "embedding_dim": 3, "lstm_hidden_size": 4, "classifier_hidden_size": 5,
        "pair_lstm_hidden_size": 6, "pair_classifier_hidden_size": 7, "dropout": 0.0, "embeddings": "glove", "glove": str(glove),
    })
    model, tokenizer, coverage = bilstm_student_for_task(student, get_task("sst2"), TEXTS, 64)
    vocab = tokenizer.get_vocab()
    assert torch.equal(model.embeddings.weight[vocab["film"]], torch.tensor([1.0, 2.0, 3.0]))
    assert torch.equal(model.embeddings.weight[vocab["fine"]], torch.tensor([0.5, 0.0, -1.0]))
    assert coverage["glove_coverage"] == pytest.approx(2 / 9)
    assert model.config.lstm_hidden_size == 4 and not model.config.pair
    pair_model, _, _ = bilstm_student_for_task(student, get_task("mrpc"), TEXTS, 64)
    assert pair_model.config.pair and pair_model.config.lstm_hidden_size == 6 and pair_model.config.classifier_hidden_size == 7


# ---------------------------------------------------------------------- loss and logits


class _Fixed(torch.nn.Module):
    """A 'student' whose logits are a parameter: the loss can be checked by hand."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.logits = torch.nn.Parameter(logits)

    def forward(self, input_ids=None, attention_mask=None, labels=None):
        return type("Out", (), {"logits": self.logits})()


def test_prediction_loss_by_hand() -> None:
    student = StudentWithProjections(_Fixed(torch.tensor([[1.0, 0.0], [0.0, 2.0]])))
    table = TeacherLogits(torch.tensor([20, 10]), torch.tensor([[0.0, 1.0], [3.0, 0.0]]))
    batch = {"input_ids": torch.zeros(2, 3, dtype=torch.long), "attention_mask": torch.ones(2, 3, dtype=torch.long),
             "example_id": torch.tensor([10, 20]), "labels": torch.tensor([1, 1])}
    # Example 10 gets teacher row [3, 0], example 20 gets [0, 1] (looked up by id, not by position).
    mse = ((1 - 3) ** 2 + 0 + 0 + (2 - 1) ** 2) / 4
    loss, parts = prediction_loss(PredictionLossSettings(kind="mse"), False, table)(student, batch)
    assert loss.item() == pytest.approx(mse) and parts == {"distill": pytest.approx(mse)}
    ce = (-math.log(math.exp(0) / (math.exp(1) + 1)) - math.log(math.exp(2) / (1 + math.exp(2)))) / 2
    loss, parts = prediction_loss(PredictionLossSettings(kind="mse", hard_weight=0.25), False, table)(student, batch)
    assert parts["hard"] == pytest.approx(ce) and loss.item() == pytest.approx(0.25 * ce + 0.75 * mse)
    only_labels, parts = prediction_loss(PredictionLossSettings(hard_weight=1.0), False, None)(student, batch)
    assert only_labels.item() == pytest.approx(ce) and set(parts) == {"hard"}
    with pytest.raises(ValueError, match="teacher's logits"):
        prediction_loss(PredictionLossSettings(), False, None)


def test_cached_teacher_logits_follow_shuffled_ids(tmp_path: Path) -> None:
    ids = torch.tensor([5, 3, 9, 1])
    logits = torch.arange(8.0).reshape(4, 2)
    table = TeacherLogits(ids, logits)
    table.save(tmp_path / "t.safetensors")
    loaded = TeacherLogits.load(tmp_path / "t.safetensors")
    order = torch.tensor([1, 9, 5, 3])
    assert torch.equal(loaded(order), torch.tensor([[6.0, 7.0], [4.0, 5.0], [0.0, 1.0], [2.0, 3.0]]))


# ------------------------------------------------------------------------------ recipe


def test_bilstm_experiments_compose() -> None:
    cfg = compose_config("experiment=bilstm_sst2")
    assert (cfg.student.kind, cfg.distill.prediction_loss, cfg.distill.weights.hard, cfg.augment.name) == ("bilstm", "mse", 0.0, "tang")
    assert [p.stage.name for p in plan(cfg)] == ["finetune_teacher", "augment", "teacher_logits", "task_distill", "evaluate"]
    nokd = compose_config("experiment=bilstm_nokd_sst2")
    assert nokd.augment.name == "none" and nokd.distill.prediction_target == "labels"
    assert [p.stage.name for p in plan(nokd)] == ["task_distill", "evaluate"]


def test_bilstm_end_to_end_with_and_without_distillation(run_kdrun, tiny_bert_dir, glue_dir, tmp_path) -> None:
    common = ("scale=smoke", "device=cpu", f"teacher.path={tiny_bert_dir}", f"data.glue_dir={glue_dir}", "evaluate.latency_repeats=1")
    first = run_kdrun("experiment=bilstm_mrpc", "augment.n_iter=3", *common, cwd=tmp_path)
    run_kdrun("experiment=bilstm_nokd_mrpc", *common, cwd=tmp_path)
    runs = {p.parent.parent.name: json.loads(p.read_text()) for p in (tmp_path / "outputs" / "runs").rglob("results.json")}
    distilled, plain = runs["bilstm_mrpc"], runs["bilstm_nokd_mrpc"]
    # Another student on the same teacher and augmented rows takes the teacher's logits from the cache.
    assert re.search(r"teacher logits: \d+/\d+ rows", first.stderr + first.stdout)
    assert distilled["stages"]["teacher_logits"]["cache"] == "computed"
    (tmp_path / "other").mkdir()
    run_kdrun("experiment=bilstm_mrpc", "augment.n_iter=3", "student.pair_classifier_hidden_size=64", *common, cwd=tmp_path / "other")
    other_result = json.loads(next((tmp_path / "other" / "outputs" / "runs").rglob("results.json")).read_text())
    assert other_result["stages"]["teacher_logits"]["cache"] == "hit"
    shared = other_result["stages"]["task_distill"]["summary"]["teacher_logits"]
    assert shared == distilled["stages"]["task_distill"]["summary"]["teacher_logits"] == distilled["stages"]["teacher_logits"]["key"]
    assert other_result["stages"]["task_distill"]["key"] != distilled["stages"]["task_distill"]["key"]
    task = distilled["stages"]["task_distill"]["summary"]
    assert task["train_examples"] == distilled["stages"]["augment"]["summary"]["rows"] > 64
    assert "distill" in task["prediction"]["history"][0] and "hard" not in task["prediction"]["history"][0]
    assert list(plain["stages"]) == ["task_distill", "evaluate"]
    assert plain["stages"]["task_distill"]["summary"]["train_examples"] == 64
    for result in (distilled, plain):
        assert set(result["metrics"]) == {"f1", "accuracy"}
        assert result["efficiency"]["parameters"] == result["stages"]["task_distill"]["summary"]["parameters"]
        assert result["efficiency"]["latency_ms_bs1"] > 0
