"""TinyBERT loss terms against values worked out by hand, plus the objective's wiring."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from kdrun.distill.losses import (
    LossWeights,
    ObjectiveConfig,
    TinyBertObjective,
    WidthProjections,
    attention_mse,
    embedding_mse,
    hidden_mse,
    logit_mse,
    soft_cross_entropy,
)
from kdrun.distill.mapping import LayerMapping
from kdrun.models.capture import CapturedOutputs


def t(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


# Two samples, one head, two queries, two keys: [2, 1, 2, 2].
STUDENT = t([[[[1, 2], [3, 4]]], [[[0, 0], [0, 0]]]])
TEACHER = t([[[[0, 2], [1, 1]]], [[[1, 1], [1, 1]]]])


def test_attention_mse_without_padding_by_hand() -> None:
    # sample 0 differences 1, 0, 2, 3 -> squares 1 + 0 + 4 + 9 = 14; sample 1: four 1s = 4.
    # mean over 8 elements: 18 / 8 = 2.25
    assert attention_mse(STUDENT, TEACHER, None).item() == pytest.approx(2.25)


def test_attention_mse_zeroes_padded_keys_in_both_models() -> None:
    mask = torch.tensor([[1, 1], [1, 0]])  # key 1 of sample 1 is padding
    # sample 0 unchanged: 14; sample 1 keeps only key 0: (0-1)^2 + 0 + (0-1)^2 + 0 = 2.
    # the zeroed entries still count in the mean: 16 / 8 = 2.0
    assert attention_mse(STUDENT, TEACHER, mask).item() == pytest.approx(2.0)


def test_attention_mse_averages_heads() -> None:
    student = t([[[[1, 1]], [[2, 0]]]])  # [1, 2 heads, 1, 2]
    teacher = torch.zeros(1, 2, 1, 2)
    # head 0: (1 + 1) / 2 = 1; head 1: (4 + 0) / 2 = 2; (1 + 2) / 2 = 1.5
    assert attention_mse(student, teacher, None).item() == pytest.approx(1.5)


def test_padded_key_column_changes_nothing() -> None:
    generator = torch.Generator().manual_seed(0)
    student = torch.randn(2, 3, 4, 4, generator=generator)
    teacher = torch.randn(2, 3, 4, 4, generator=generator)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    base = attention_mse(student, teacher, mask)
    student2, teacher2 = student.clone(), teacher.clone()
    student2[1, :, :, 2:] = 55.0
    teacher2[1, :, :, 2:] = -7.0
    assert attention_mse(student2, teacher2, mask).item() == pytest.approx(base.item())


def test_scores_with_additive_mask_give_the_same_loss() -> None:
    generator = torch.Generator().manual_seed(1)
    student = torch.randn(2, 2, 3, 3, generator=generator)
    teacher = torch.randn(2, 2, 3, 3, generator=generator)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    additive = (1.0 - mask.float())[:, None, None, :] * -10000.0  # the official BERT mask
    explicit = attention_mse(student, teacher, mask)
    official = attention_mse(student + additive, teacher + additive, None)
    both = attention_mse(student + additive, teacher + additive, mask)
    assert official.item() == pytest.approx(explicit.item())
    assert both.item() == pytest.approx(explicit.item())


def test_attention_probs_by_hand() -> None:
    # student scores [0, ln 3] -> probs [1/4, 3/4]; teacher probs [1/2, 1/2]
    student = torch.softmax(t([[[[0.0, math.log(3.0)]]]]), dim=-1)
    teacher = t([[[[0.5, 0.5]]]])
    # ((1/4 - 1/2)^2 + (3/4 - 1/2)^2) / 2 = (1/16 + 1/16) / 2 = 1/16
    assert attention_mse(student, teacher, None, target="probs").item() == pytest.approx(1 / 16)


def test_probs_target_does_not_apply_the_score_threshold() -> None:
    # -200 is "masked" for scores (zeroed) but a plain value for the probs target.
    student, teacher = t([[[[-200.0, 1.0]]]]), t([[[[0.0, 1.0]]]])
    assert attention_mse(student, teacher, None, target="scores").item() == pytest.approx(0.0)
    assert attention_mse(student, teacher, None, target="probs").item() == pytest.approx(200.0**2 / 2)


def test_probs_and_scores_differ_on_real_maps() -> None:
    scores_s, scores_t = t([[[[0.0, 2.0]]]]), t([[[[1.0, 1.0]]]])
    by_scores = attention_mse(scores_s, scores_t, None, "scores")  # (1 + 1) / 2 = 1
    by_probs = attention_mse(scores_s.softmax(-1), scores_t.softmax(-1), None, "probs")
    p = 1 / (1 + math.exp(2.0))  # softmax([0, 2])[0]
    assert by_scores.item() == pytest.approx(1.0)
    assert by_probs.item() == pytest.approx((p - 0.5) ** 2)


def test_attention_rejects_head_mismatch_and_unknown_target() -> None:
    with pytest.raises(ValueError, match="same number of heads"):
        attention_mse(torch.zeros(1, 2, 3, 3), torch.zeros(1, 4, 3, 3), None)
    with pytest.raises(ValueError, match="target"):
        attention_mse(torch.zeros(1, 2, 3, 3), torch.zeros(1, 2, 3, 3), None, target="logits")


def projection_2_to_3() -> nn.Linear:
    projection = nn.Linear(2, 3)
    with torch.no_grad():
        projection.weight.copy_(t([[1, 0], [0, 1], [1, 1]]))
        projection.bias.zero_()
    return projection


def test_hidden_mse_with_projection_by_hand() -> None:
    student = t([[[1, 0], [0, 1]]])  # [1, 2 tokens, width 2]
    teacher = t([[[1, 1, 1], [0, 0, 0]]])
    # projected rows: [1, 0, 1] and [0, 1, 1]; differences [0, -1, 0] and [0, 1, 1]
    # squares 0 + 1 + 0 + 0 + 1 + 1 = 3, mean over 6 = 0.5
    projection = projection_2_to_3()
    loss = hidden_mse(student, teacher, projection)
    assert loss.item() == pytest.approx(0.5)
    loss.backward()
    # d/dW of mean((W h - t)^2): 2/6 * sum over tokens of (W h - t) h^T
    # token 0: residual [0, -1, 0] x h [1, 0]; token 1: residual [0, 1, 1] x h [0, 1]
    expected = (2 / 6) * t([[0, 0], [-1, 1], [0, 1]])
    assert torch.allclose(projection.weight.grad, expected)
    assert embedding_mse(student, teacher, projection_2_to_3()).item() == pytest.approx(0.5)


def test_hidden_mse_without_projection_and_width_mismatch() -> None:
    # (1 - 0)^2 + (2 - 0)^2 over 2 elements = 2.5
    assert hidden_mse(t([[[1, 2]]]), t([[[0, 0]]]), None).item() == pytest.approx(2.5)
    with pytest.raises(ValueError, match="pass a projection"):
        hidden_mse(torch.zeros(1, 2, 2), torch.zeros(1, 2, 3), None)


def test_soft_cross_entropy_by_hand() -> None:
    student = t([[0.0, 0.0], [0.0, math.log(3.0)]])
    teacher = t([[0.0, math.log(3.0)], [math.log(3.0), 0.0]])
    # sample 0: student log-probs [-ln 2, -ln 2] -> CE = ln 2 whatever the teacher says
    # sample 1: teacher probs [3/4, 1/4], student log-probs [ln 1/4, ln 3/4]
    ce1 = -(0.75 * math.log(0.25) + 0.25 * math.log(0.75))
    assert soft_cross_entropy(student, teacher).item() == pytest.approx((math.log(2.0) + ce1) / 2)


def test_soft_cross_entropy_temperature_and_t2_scaling() -> None:
    student = t([[0.0, math.log(3.0)]])
    teacher = t([[math.log(9.0), 0.0]])
    # at t = 2: teacher [ln 3, 0] -> probs [3/4, 1/4]; student [0, ln sqrt3] -> log-probs
    # [-ln(1 + sqrt3), ln sqrt3 - ln(1 + sqrt3)]; CE = ln(1 + sqrt3) - (1/4) ln sqrt3
    expected = math.log(1 + math.sqrt(3.0)) - 0.25 * math.log(math.sqrt(3.0))
    assert soft_cross_entropy(student, teacher, temperature=2.0).item() == pytest.approx(expected)
    assert soft_cross_entropy(student, teacher, 2.0, scale_by_t2=True).item() == pytest.approx(4 * expected)
    # at t = 1 the factor is 1 either way
    assert soft_cross_entropy(student, teacher, 1.0, True).item() == pytest.approx(
        soft_cross_entropy(student, teacher, 1.0, False).item()
    )
    with pytest.raises(ValueError, match="positive"):
        soft_cross_entropy(student, teacher, temperature=0.0)


def test_logit_mse_by_hand_and_shape_tolerance() -> None:
    # (1 - 0.5)^2 + (2 - 3)^2 = 0.25 + 1, mean 0.625
    assert logit_mse(t([[1.0], [2.0]]), t([[0.5], [3.0]])).item() == pytest.approx(0.625)
    assert logit_mse(t([[1.0], [2.0]]), t([0.5, 3.0])).item() == pytest.approx(0.625)


def test_inference_mode_teacher_tensors_are_usable() -> None:
    student = torch.randn(2, 2, 3, 3, requires_grad=True)
    with torch.inference_mode():
        teacher = torch.randn(2, 2, 3, 3)
        teacher_logits = torch.randn(2, 3)
    student_logits = torch.randn(2, 3, requires_grad=True)
    total = (
        attention_mse(student, teacher, torch.ones(2, 3))
        + hidden_mse(student, teacher, None)
        + soft_cross_entropy(student_logits, teacher_logits)
        + logit_mse(student_logits, teacher_logits)
    )
    total.backward()
    assert student.grad is not None and student_logits.grad is not None


def test_width_projections() -> None:
    identity = WidthProjections(8, 8, student_layers=4)
    assert identity.is_identity and identity.for_layer(3) is None and not list(identity.parameters())
    learnt = WidthProjections(8, 8, student_layers=4, always=True)  # the official student's fit_dense at equal widths
    assert not learnt.is_identity and learnt.for_layer(3) is learnt.fit_dense and learnt.fit_dense.weight.shape == (8, 8)
    shared = WidthProjections(4, 8, student_layers=2)
    assert shared.for_layer(0) is shared.for_layer(2) is shared.fit_dense
    assert shared(torch.zeros(1, 3, 4), 1).shape == (1, 3, 8)
    separate = WidthProjections(4, 8, student_layers=2, shared=False)
    assert len({id(separate.for_layer(m)) for m in range(3)}) == 3
    restored = WidthProjections(4, 8, student_layers=2, shared=False)
    restored.load_state_dict(separate.state_dict())
    assert torch.equal(restored.for_layer(2).weight, separate.for_layer(2).weight)
    assert set(shared.state_dict()) == {"fit_dense.weight", "fit_dense.bias"}


# ---- the objective ----------------------------------------------------------------------------------------

def fake_outputs(seed: int, width: int, layers: int, logits: int = 3) -> CapturedOutputs:
    generator = torch.Generator().manual_seed(seed)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator).requires_grad_()

    return CapturedOutputs(
        embeddings=rand(2, 3, width),
        hidden_states={n: rand(2, 3, width) for n in range(1, layers + 1)},
        attention_scores={n: rand(2, 2, 3, 3) for n in range(1, layers + 1)},
        logits=rand(2, logits),
    )


def make_objective(weights: dict[str, float], **extra) -> TinyBertObjective:
    config = {"weights": weights, "temperature": 2.0, "mapping": {"kind": "uniform"}, **extra}
    return TinyBertObjective(config, student_layers=2, teacher_layers=4, projections=projections_4_to_6())


def projections_4_to_6() -> WidthProjections:
    return WidthProjections(4, 6, student_layers=2)


def test_objective_sums_weighted_terms_over_mapped_layers() -> None:
    student, teacher = fake_outputs(0, 4, 2), fake_outputs(1, 6, 4)
    weights = {"embedding": 0.5, "attention": 2.0, "hidden": 1.0, "prediction": 3.0}
    objective = make_objective(weights)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    total, report = objective(student, teacher, mask, is_regression=False)
    fit = objective.projections.fit_dense
    # uniform 2-from-4 pairs student 1 with teacher 2, student 2 with teacher 4
    pairs = [(1, 2), (2, 4)]
    attention = sum(attention_mse(student.attention_scores[m], teacher.attention_scores[n], mask) for m, n in pairs)
    hidden = sum(hidden_mse(student.hidden_states[m], teacher.hidden_states[n], fit) for m, n in pairs)
    embedding = hidden_mse(student.embeddings, teacher.embeddings, fit)
    prediction = soft_cross_entropy(student.logits, teacher.logits, 2.0)
    expected = 0.5 * embedding + 2.0 * attention + 1.0 * hidden + 3.0 * prediction
    assert total.item() == pytest.approx(expected.item(), rel=1e-6)
    assert report["attention"] == pytest.approx(attention.item(), rel=1e-6)
    assert report["total"] == pytest.approx(expected.item(), rel=1e-6)
    assert set(report) == {"embedding", "attention", "hidden", "prediction", "total"}
    total.backward()
    assert fit.weight.grad is not None and fit.weight.grad.abs().sum() > 0


def test_objective_declares_what_it_needs() -> None:
    objective = make_objective({})
    assert objective.needs_attention_layers(student=True) == {1, 2}
    assert objective.needs_attention_layers(student=False) == {2, 4}
    assert objective.needs_hidden_layers(student=False) == {2, 4}
    assert objective.needs_embeddings() and objective.needs_logits()
    request = objective.capture_request(student=False)
    assert request["attention_layers"] == {2, 4} and request["attention_target"] == "scores"


@pytest.mark.parametrize("term", ["embedding", "attention", "hidden", "prediction"])
def test_zero_weight_removes_term_and_its_need(term: str) -> None:
    objective = make_objective({term: 0.0})
    needs = {
        "embedding": objective.needs_embeddings(),
        "attention": bool(objective.needs_attention_layers(True) | objective.needs_attention_layers(False)),
        "hidden": bool(objective.needs_hidden_layers(True) | objective.needs_hidden_layers(False)),
        "prediction": objective.needs_logits(),
    }
    assert needs[term] is False
    assert all(needed for name, needed in needs.items() if name != term)
    # the term's inputs may be absent entirely
    student, teacher = fake_outputs(0, 4, 2), fake_outputs(1, 6, 4)
    for outputs in (student, teacher):
        if term == "embedding":
            outputs.embeddings = None
        elif term == "attention":
            outputs.attention_scores = {}
        elif term == "hidden":
            outputs.hidden_states = {}
        else:
            outputs.logits = None
    total, report = objective(student, teacher, None, is_regression=False)
    assert term not in report
    others = sum(report[name] for name in report if name not in ("total", term))
    assert total.item() == pytest.approx(others, rel=1e-6)  # remaining weights are 1


def test_regression_uses_logit_mse() -> None:
    objective = make_objective({"embedding": 0, "attention": 0, "hidden": 0})
    student = CapturedOutputs(logits=t([[1.0], [2.0]]))
    teacher = CapturedOutputs(logits=t([[0.5], [3.0]]))
    total, report = objective(student, teacher, None, is_regression=True)
    assert total.item() == pytest.approx(0.625)
    assert report == {"prediction": pytest.approx(0.625), "total": pytest.approx(0.625)}


def test_objective_config_errors() -> None:
    with pytest.raises(ValueError, match="unknown loss weights"):
        make_objective({"attn": 1.0})
    with pytest.raises(ValueError, match="all loss weights are 0"):
        make_objective({"embedding": 0, "attention": 0, "hidden": 0, "prediction": 0})
    with pytest.raises(ValueError, match="attention_target"):
        make_objective({}, attention_target="values")
    with pytest.raises(KeyError, match="teacher attention of layer 4"):
        student, teacher = fake_outputs(0, 4, 2), fake_outputs(1, 6, 4)
        del teacher.attention_scores[4]
        make_objective({})(student, teacher, None, is_regression=False)
    config = ObjectiveConfig(weights=LossWeights(prediction=0.0), mapping=LayerMapping("top"))
    assert TinyBertObjective(config, 2, 4).layer_pairs == [(1, 3), (2, 4)]
