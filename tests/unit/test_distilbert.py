"""DistilBERT: the student copied from teacher layers, the triple loss, and the recipe end to end."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import BertConfig, BertForMaskedLM, BertModel

from kdrun.distill.distilbert import MaskedLmStudent, TripleLossSettings, cosine_loss, kl_soft_targets, triple_loss
from kdrun.models.distil_student import distil_from_teacher, teacher_layers_to_keep, teacher_tensor_names
from kdrun.pipeline import plan

from composing import compose_config


def _teacher(layers: int = 6, seed: int = 0) -> BertForMaskedLM:
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=layers, num_attention_heads=2, intermediate_size=32, max_position_embeddings=40)
    return BertForMaskedLM(config).eval()


# ------------------------------------------------------------------------------ losses


def test_kl_soft_targets_by_hand() -> None:
    student = torch.tensor([[0.0, 0.0], [1.0, -1.0]])
    teacher = torch.tensor([[math.log(3.0), 0.0], [0.0, 0.0]])

    def kl(p: list[float], q: list[float]) -> float:
        return sum(a * math.log(a / b) for a, b in zip(p, q))

    def softmax(z: list[float]) -> list[float]:
        e = [math.exp(v) for v in z]
        return [v / sum(e) for v in e]

    for t in (1.0, 2.0):
        rows = [kl(softmax([v / t for v in teacher[i].tolist()]), softmax([v / t for v in student[i].tolist()])) for i in range(2)]
        assert kl_soft_targets(student, teacher, t).item() == pytest.approx(t * t * sum(rows) / 2, rel=1e-6)
    # T = 1, first row alone: 0.75 ln(0.75 / 0.5) + 0.25 ln(0.25 / 0.5)
    assert kl_soft_targets(student[:1], teacher[:1], 1.0).item() == pytest.approx(0.75 * math.log(1.5) + 0.25 * math.log(0.5), rel=1e-6)


def test_cosine_loss_by_hand() -> None:
    student = torch.tensor([[1.0, 0.0], [1.0, 0.0], [2.0, 2.0]])
    teacher = torch.tensor([[0.0, 3.0], [1.0, 1.0], [1.0, 1.0]])
    assert cosine_loss(student, teacher).item() == pytest.approx((1.0 + (1 - 1 / math.sqrt(2)) + 0.0) / 3, rel=1e-6)
    with pytest.raises(ValueError, match="widths to match"):
        cosine_loss(torch.zeros(2, 3), torch.zeros(2, 4))


def test_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="ce_positions"):
        TripleLossSettings(ce_positions="some")
    with pytest.raises(ValueError, match="not all 0"):
        TripleLossSettings(ce=0, mlm=0, cos=0)


def test_triple_loss_equals_its_terms_computed_from_full_outputs() -> None:
    teacher = _teacher()
    student = distil_from_teacher(teacher).eval()  # no dropout: the loss and the reference see the same network
    torch.manual_seed(1)
    input_ids = torch.randint(5, 50, (3, 9))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 6:] = 0
    attention_mask[2, 4:] = 0
    labels = torch.full_like(input_ids, -100)
    labels[0, 2], labels[1, 3], labels[2, 1] = 7, 8, 9
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
    total, parts = triple_loss(teacher, TripleLossSettings())(MaskedLmStudent(student), batch)

    real, masked = attention_mask.bool(), labels != -100
    with torch.no_grad():
        t_out = teacher(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
        s_out = student(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
    p_t = F.softmax(t_out.logits[real] / 2, -1)
    log_p_s = F.log_softmax(s_out.logits[real] / 2, -1)
    ce = 4 * (p_t * (p_t.log() - log_p_s)).sum(-1).mean()
    mlm = F.cross_entropy(s_out.logits[masked], labels[masked])
    cos = (1 - F.cosine_similarity(s_out.hidden_states[-1][real], t_out.hidden_states[-1][real], dim=-1)).mean()
    assert parts["ce"] == pytest.approx(ce.item(), rel=1e-4)
    assert parts["mlm"] == pytest.approx(mlm.item(), rel=1e-5)
    assert parts["cos"] == pytest.approx(cos.item(), abs=2e-6)  # 1 - cos near 0: float32 leaves ~1e-7
    assert total.item() == pytest.approx(5 * ce.item() + 2 * mlm.item() + cos.item(), rel=1e-4)
    total.backward()
    assert student.distilbert.transformer.layer[0].ffn.lin1.weight.grad is not None

    masked_only, parts_masked = triple_loss(teacher, TripleLossSettings(ce=1, mlm=0, cos=0, ce_positions="masked"))(MaskedLmStudent(student), batch)
    p_t = F.softmax(t_out.logits[masked] / 2, -1)
    expected = 4 * (p_t * (p_t.log() - F.log_softmax(s_out.logits[masked] / 2, -1))).sum(-1).mean()
    assert masked_only.item() == pytest.approx(expected.item(), abs=2e-6) and set(parts_masked) == {"ce"}  # KL of near-equal rows


# ----------------------------------------------------------------------------- student


def test_default_layers_are_distilberts_choice() -> None:
    assert teacher_layers_to_keep(12) == [0, 2, 4, 7, 9, 11]
    assert teacher_layers_to_keep(6) == [0, 2, 4]
    assert teacher_layers_to_keep(6, [1, 5]) == [1, 5]
    with pytest.raises(ValueError, match="increasing, distinct"):
        teacher_layers_to_keep(6, [4, 2])
    with pytest.raises(ValueError, match="0..5"):
        teacher_layers_to_keep(6, [6])


def test_student_tensors_are_exactly_the_chosen_teacher_tensors() -> None:
    teacher = _teacher()
    student = distil_from_teacher(teacher, [1, 3, 5])
    assert student.config.n_layers == 3 and student.config.dim == 16
    names = teacher_tensor_names([1, 3, 5], with_head=True)
    teacher_state, student_state = teacher.state_dict(), student.state_dict()
    for student_name, teacher_name in names.items():
        assert torch.equal(student_state[student_name], teacher_state[teacher_name]), student_name
    assert torch.equal(student.distilbert.transformer.layer[2].ffn.lin2.weight, teacher.bert.encoder.layer[5].output.dense.weight)
    # Tied decoder; no token-type embeddings, no pooler.
    assert student.vocab_projector.weight.data_ptr() == student.distilbert.embeddings.word_embeddings.weight.data_ptr()
    assert not any("token_type" in n or "pooler" in n for n in student_state)


def test_a_student_with_every_layer_computes_the_teachers_outputs() -> None:
    teacher = _teacher(layers=2)
    with torch.no_grad():
        teacher.bert.embeddings.token_type_embeddings.weight.zero_()  # DistilBERT has none
    student = distil_from_teacher(teacher, [0, 1]).eval()
    ids = torch.randint(0, 50, (2, 11))
    assert torch.equal(student(input_ids=ids).logits, teacher(input_ids=ids).logits)


def test_a_teacher_without_mlm_head_gives_a_student_with_a_new_head() -> None:
    torch.manual_seed(0)
    encoder = BertModel(_teacher().config)
    student = distil_from_teacher(encoder)
    assert torch.equal(student.distilbert.embeddings.word_embeddings.weight, encoder.embeddings.word_embeddings.weight)


# ------------------------------------------------------------------------------ config


def test_distilbert_experiments_and_table_4_ablations_compose() -> None:
    cfg = compose_config("experiment=distilbert_sst2")
    assert (cfg.student.kind, cfg.distill.name, cfg.task_distill.intermediate.enabled) == ("distilbert", "distilbert", False)
    assert (cfg.distill.weights.ce, cfg.distill.weights.mlm, cfg.distill.weights.cos, cfg.distill.temperature) == (5.0, 2.0, 1.0, 2.0)
    # The paper's protocol fine-tunes the distilled model on the labels: no stage needs a fine-tuned teacher.
    assert cfg.distill.prediction_target == "labels"
    assert [p.stage.name for p in plan(cfg)] == ["fit_mlm_head", "general_distill", "task_distill", "evaluate"]
    distilled = compose_config("experiment=distilbert_sst2", "distill.prediction_target=teacher")
    assert [p.stage.name for p in plan(distilled)] == ["finetune_teacher", "fit_mlm_head", "general_distill", "teacher_logits", "task_distill", "evaluate"]
    assert compose_config("experiment=distilbert_sst2", "ablation=distil_no_ce").distill.weights.ce == 0.0
    assert compose_config("experiment=distilbert_sst2", "ablation=distil_no_cos").distill.weights.cos == 0.0
    assert compose_config("experiment=distilbert_sst2", "ablation=distil_no_mlm").distill.weights.mlm == 0.0
    assert compose_config("experiment=distilbert_sst2", "ablation=distil_random_init").student.init == "random"
    # The fit_mlm_head stage is for the teacher's MLM head: TinyBERT pipelines do not use it for general distillation.
    keys = {p.stage.name: p.key for p in plan(cfg)}
    ablated = {p.stage.name: p.key for p in plan(compose_config("experiment=distilbert_sst2", "ablation=distil_no_cos"))}
    assert keys["fit_mlm_head"] == ablated["fit_mlm_head"]
    assert keys["general_distill"] != ablated["general_distill"]


def test_distilbert_end_to_end(run_kdrun, tiny_bert_dir, glue_dir, tmp_path) -> None:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(f"The film number {i} was a good one and people liked it a lot." for i in range(60)) + "\n")
    run_kdrun(
        "experiment=distilbert_mrpc", "scale=smoke", "device=cpu", f"teacher.path={tiny_bert_dir}",
        f"data.glue_dir={glue_dir}", f"data.corpus={corpus}", "evaluate.latency_repeats=1",
    )
    [results_file] = list((tmp_path / "outputs" / "runs").rglob("results.json"))
    results = json.loads(results_file.read_text())
    stages = results["stages"]
    assert list(stages) == ["fit_mlm_head", "general_distill", "task_distill", "evaluate"]
    general = stages["general_distill"]["summary"]
    assert general["student_layers"] == [0] and general["steps"] == 2  # half of the 2-layer tiny teacher
    assert general["teacher_mlm"].endswith("/model") and "fit_mlm_head" in general["teacher_mlm"]
    assert {"ce", "mlm", "cos"} <= set(general["history"][0])
    model_dir = Path(stages["task_distill"]["summary"]["model_dir"])
    config = json.loads((tmp_path / "cache" / "task_distill" / stages["task_distill"]["key"] / model_dir / "config.json").read_text())
    assert config["model_type"] == "distilbert" and config["n_layers"] == 1
    assert set(results["metrics"]) == {"f1", "accuracy"} and results["efficiency"]["parameters"] > 0


DISTILBERT_ROWS = ("none", "distil_no_ce", "distil_no_cos", "distil_no_mlm", "distil_random_init")


def test_every_distilbert_ablation_row_runs_end_to_end(tiny_bert_dir, glue_dir, tmp_path) -> None:
    """Table 4 row by row at scale=smoke, in one process and one cache (as its sweep runs them), with the
    paper's protocol (the distilled model fine-tuned on the task's labels: no teacher logits)."""
    from kdrun.pipeline import run_pipeline

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(f"The film number {i} was a good one and people liked it a lot." for i in range(60)) + "\n")
    common = ("experiment=distilbert_mrpc", "scale=smoke", "device=cpu", f"teacher.path={tiny_bert_dir}", f"data.glue_dir={glue_dir}",
              f"data.corpus={corpus}", "evaluate.measure_latency=false", "evaluate.formats=[fp32]", f"cache.dir={tmp_path / 'cache'}")
    outputs = {}
    for row in (*DISTILBERT_ROWS, "distilled"):
        overrides = ("distill.prediction_target=teacher",) if row == "distilled" else (f"ablation={row}",)
        (tmp_path / row).mkdir()
        outputs[row] = run_pipeline(compose_config(*common, *overrides), tmp_path / row)
        evaluation = outputs[row]["evaluate"].summary
        assert set(evaluation["dev"]) == {"f1", "accuracy"} and evaluation["model_from"] == "task_distill", row
    keys = {stage: {row: out[stage].key for row, out in outputs.items()} for stage in ("fit_mlm_head", "general_distill")}
    assert len(set(keys["fit_mlm_head"].values())) == 1
    # Fine-tuning on labels needs no fine-tuned teacher (the MLM head is fitted on the pre-trained one).
    assert [row for row, out in outputs.items() if "finetune_teacher" in out] == ["distilled"]
    assert len({keys["general_distill"][row] for row in DISTILBERT_ROWS}) == len(DISTILBERT_ROWS)  # each row its own student
    assert keys["general_distill"]["distilled"] == keys["general_distill"]["none"]
    # Fine-tuned on labels (the rows) against distilled from the teacher's logits (the option).
    assert all("teacher_logits" not in outputs[row]["task_distill"].summary for row in DISTILBERT_ROWS)
    assert "teacher_logits" in outputs["distilled"]["task_distill"].summary
    assert outputs["distilled"]["task_distill"].key != outputs["none"]["task_distill"].key
    # A removed term is not computed at all: it is absent from the row's loss history.
    assert "ce" in outputs["none"]["general_distill"].summary["history"][0]
    assert "ce" not in outputs["distil_no_ce"]["general_distill"].summary["history"][0]
