"""MiniLM distillation: its loss against a hand computation, value capture against a manual one, and a run end to end."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import BertConfig, BertModel

from kdrun.methods.minilm import MiniLmObjective, relation_kl, value_relation_logits
from kdrun.models.capture import CapturedOutputs, forward_with_capture

from composing import compose_config


def _kl_by_hand(teacher: np.ndarray, student: np.ndarray, mask: np.ndarray) -> float:
    """MiniLM's relation loss with explicit loops: per example, the mean over heads and real query rows of
    KL(softmax(teacher row) || softmax(student row)) over the real keys; then the mean over examples."""
    batch, heads, length, _ = teacher.shape
    per_example = []
    for b in range(batch):
        real = [k for k in range(length) if mask[b, k] == 1]
        total = 0.0
        for h in range(heads):
            for q in real:
                t = [math.exp(teacher[b, h, q, k]) for k in real]
                s = [math.exp(student[b, h, q, k]) for k in real]
                t = [x / sum(t) for x in t]
                s = [x / sum(s) for x in s]
                total += sum(p * math.log(p / r) for p, r in zip(t, s))
        per_example.append(total / (heads * len(real)))
    return sum(per_example) / batch


@pytest.fixture
def relations() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    teacher = torch.randn(2, 3, 4, 4, generator=generator) * 2
    student = torch.randn(2, 3, 4, 4, generator=generator) * 2
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    return teacher, student, mask


def test_relation_kl_matches_a_hand_computation(relations) -> None:
    teacher, student, mask = relations
    expected = _kl_by_hand(teacher.numpy(), student.numpy(), mask.numpy())
    assert relation_kl(teacher, student, mask).item() == pytest.approx(expected, rel=1e-5)
    # Without padding every row and key counts.
    assert relation_kl(teacher, student, None).item() == pytest.approx(_kl_by_hand(teacher.numpy(), student.numpy(), np.ones((2, 4))), rel=1e-5)
    # What padded keys hold does not matter, and equal relations cost nothing.
    noisy = teacher.clone()
    noisy[1, :, :, 2:] = 1e3
    assert relation_kl(noisy, student, mask).item() == pytest.approx(expected, rel=1e-5)
    assert relation_kl(teacher, teacher, mask).item() == pytest.approx(0.0, abs=1e-6)


def test_value_relation_and_weighted_total_match_a_hand_computation(relations) -> None:
    _, _, mask = relations
    generator = torch.Generator().manual_seed(4)
    teacher_values = torch.randn(2, 3, 4, 5, generator=generator)  # head size 5
    student_values = torch.randn(2, 3, 4, 2, generator=generator)  # a narrower student: head size 2
    by_hand = np.zeros((2, 3, 4, 4))
    for b in range(2):
        for h in range(3):
            for i in range(4):
                for j in range(4):
                    by_hand[b, h, i, j] = sum(float(teacher_values[b, h, i, d] * teacher_values[b, h, j, d]) for d in range(5)) / math.sqrt(5)
    assert np.allclose(value_relation_logits(teacher_values).numpy(), by_hand, atol=1e-5)

    teacher_scores, student_scores = torch.randn(2, 3, 4, 4, generator=generator), torch.randn(2, 3, 4, 4, generator=generator)
    objective = MiniLmObjective(attention=0.5, value_relation=2.0, student_layers=2, teacher_layers=6)
    assert objective.capture_request(student=True)["value_layers"] == {2} and objective.capture_request(student=False)["attention_layers"] == {6}
    student_out = CapturedOutputs(attention_scores={2: student_scores}, values={2: student_values})
    teacher_out = CapturedOutputs(attention_scores={6: teacher_scores}, values={6: teacher_values})
    total, parts = objective(student_out, teacher_out, mask, is_regression=False)
    attention = _kl_by_hand(teacher_scores.numpy(), student_scores.numpy(), mask.numpy())
    value = _kl_by_hand(by_hand, value_relation_logits(student_values).numpy(), mask.numpy())
    assert parts["attention"] == pytest.approx(attention, rel=1e-5) and parts["value_relation"] == pytest.approx(value, rel=1e-5)
    assert total.item() == pytest.approx(0.5 * attention + 2.0 * value, rel=1e-5)
    with pytest.raises(ValueError, match="not both 0"):
        MiniLmObjective(0.0, 0.0, 2, 6)


def test_captured_values_are_the_layers_value_vectors() -> None:
    torch.manual_seed(0)
    heads, width = 4, 32
    model = BertModel(BertConfig(vocab_size=100, hidden_size=width, num_hidden_layers=3, num_attention_heads=heads,
                                 intermediate_size=64, max_position_embeddings=32)).eval()
    inputs = {"input_ids": torch.randint(1, 100, (2, 7)), "attention_mask": torch.tensor([[1] * 7, [1, 1, 1, 1, 0, 0, 0]])}
    out = forward_with_capture(model, inputs, {3}, {2}, want_embeddings=False, want_logits=False, attention_target="probs", value_layers={1, 3})
    eager = model(**inputs, output_hidden_states=True)  # hidden_states[n - 1]: the input of layer n
    for number in (1, 3):
        hidden = eager.hidden_states[number - 1]
        manual = model.encoder.layer[number - 1].attention.self.value(hidden).view(2, 7, heads, width // heads).transpose(1, 2)
        assert out.values[number].shape == (2, heads, 7, width // heads)
        assert torch.allclose(out.values[number], manual, atol=1e-5)
    assert set(out.attention_scores) == {3} and set(out.values) == {1, 3}  # layer 1 gave its values only
    assert torch.allclose(out.hidden_states[2], eager.hidden_states[2], atol=1e-5)


def test_minilm_checks_heads_and_keys_only_what_it_reads(tiny_bert_dir: Path, glue_dir: Path, tmp_path: Path) -> None:
    from kdrun.pipeline import PipelineError, plan, registered_stages

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("a few words\n")
    base = ("experiment=minilm_sst2", f"teacher.path={tiny_bert_dir}", f"data.glue_dir={glue_dir}", f"data.corpus={corpus}",
            "student.num_hidden_layers=2", "student.hidden_size=24", "student.intermediate_size=48")
    with pytest.raises(PipelineError, match=r"distill=minilm compares attention maps and value relations head by head.*has 2 heads"):
        registered_stages()["general_distill"].check(compose_config(*base, "student.num_attention_heads=3"))
    registered_stages()["general_distill"].check(compose_config(*base, "student.num_attention_heads=2"))  # the width is free: 24 != 32
    keys = {p.stage.name: p.key for p in plan(compose_config(*base, "student.num_attention_heads=2"))}
    hotter = {p.stage.name: p.key for p in plan(compose_config(*base, "student.num_attention_heads=2", "distill.temperature=2"))}
    no_vr = {p.stage.name: p.key for p in plan(compose_config(*base, "student.num_attention_heads=2", "distill.weights.value_relation=0"))}
    assert hotter["general_distill"] == keys["general_distill"] and hotter["task_distill"] != keys["task_distill"]
    assert no_vr["general_distill"] != keys["general_distill"]


def test_planning_a_minilm_run_imports_no_torch() -> None:
    code = (
        "import sys; from tests.unit.composing import compose_config; from kdrun.pipeline import plan; "
        "plan(compose_config('experiment=minilm_sst2', 'device=cpu', 'device.precision=fp32')); print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[2], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "[]"


def test_minilm_general_and_task_distillation_end_to_end(tiny_bert_dir: Path, glue_dir: Path, tmp_path: Path) -> None:
    from kdrun.pipeline import run_pipeline

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(f"The film number {i} was a good one and people liked it a lot." for i in range(60)) + "\n")
    cfg = compose_config(
        "experiment=minilm_sst2", "scale=smoke", "device=cpu", f"teacher.path={tiny_bert_dir}", f"data.glue_dir={glue_dir}",
        f"data.corpus={corpus}", "student.num_hidden_layers=2", "student.hidden_size=24", "student.intermediate_size=48",
        "student.num_attention_heads=2", "pipeline.stages=[finetune_teacher,general_distill,teacher_logits,task_distill,evaluate]",
        "evaluate.measure_latency=false", "evaluate.formats=[fp32]", f"cache.dir={tmp_path / 'cache'}",
    )
    outputs = run_pipeline(cfg, tmp_path / "run")
    general, task = outputs["general_distill"].summary, outputs["task_distill"].summary
    assert general["steps"] == 2 and general["corpus_sequences"] == 32
    assert set(general["history"][0]) >= {"attention", "value_relation"}
    assert task["init"] == str(outputs["general_distill"].path / "model")
    assert task["projections_from_general"] is False  # MiniLM learns no projection
    assert set(task["intermediate"]["history"][0]) >= {"attention", "value_relation"} and task["prediction"]["steps"] == 3
    assert not (outputs["general_distill"].path / "model" / "projections.safetensors").exists()
    evaluation = outputs["evaluate"].summary
    assert evaluation["model_from"] == "task_distill" and set(evaluation["dev"]) == {"accuracy"}
    assert evaluation["efficiency"]["parameters"] == task["parameters"]
