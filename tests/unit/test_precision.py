"""device.precision: what auto resolves to, fp32 loss terms under bf16, the training loop's autocast, cache keys."""

from __future__ import annotations

from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kdrun import precision as precision_module
from kdrun.config import DeviceConfig, TrainConfig, config_dir
from kdrun.distill.losses import attention_mse, hidden_mse, logit_mse, soft_cross_entropy
from kdrun.pipeline import PipelineError, plan
from kdrun.precision import Precision, PrecisionError, cpu_native_bf16, resolve_precision
from kdrun.train import TrainingJob, train
from composing import compose_config

CONF_DIR = config_dir()
NATIVE_BF16, BF16_FEATURE = cpu_native_bf16()
needs_native_bf16 = pytest.mark.skipif(not NATIVE_BF16, reason=f"this CPU has {BF16_FEATURE}: no native bf16")




@pytest.fixture
def cpu_bf16(monkeypatch: pytest.MonkeyPatch):
    """Pretend the CPU does (True) or does not (False) multiply bf16 natively."""

    def pretend(native: bool) -> None:
        monkeypatch.setattr(precision_module, "cpu_native_bf16", lambda: (native, "AVX512-BF16" if native else "neither AVX512-BF16 nor AMX"))

    return pretend


def test_auto_is_bf16_only_on_a_cpu_that_runs_it_natively(cpu_bf16) -> None:
    cpu_bf16(True)
    chosen = resolve_precision(DeviceConfig(type="cpu", precision="auto"))
    assert (chosen.name, chosen.device_type) == ("bf16", "cpu") and "AVX512-BF16" in chosen.reason
    cpu_bf16(False)
    chosen = resolve_precision(DeviceConfig(type="cpu", precision="auto"))
    assert chosen.name == "fp32" and "emulated" in chosen.reason
    # An explicit choice is taken as it is, native or not.
    assert resolve_precision(DeviceConfig(type="cpu", precision="bf16")).name == "bf16"
    assert resolve_precision(DeviceConfig(type="cpu", precision="fp32")).name == "fp32"


def test_fp16_on_a_cpu_and_unknown_names_are_refused() -> None:
    with pytest.raises(PrecisionError, match="fp16 runs only on CUDA.*bf16"):
        resolve_precision(DeviceConfig(type="cpu", precision="fp16"))
    with pytest.raises(PrecisionError, match="auto, fp32, bf16, fp16; got 'half'"):
        resolve_precision(DeviceConfig(type="cpu", precision="half"))


def test_fp16_on_a_cpu_fails_when_planning_before_any_work() -> None:
    with pytest.raises(PipelineError, match="fp16 runs only on CUDA"):
        plan(compose_config("experiment=teacher_sst2", "device=cpu", "device.precision=fp16"))


@needs_native_bf16
def test_this_machine_resolves_auto_to_bf16() -> None:
    assert resolve_precision(DeviceConfig(type="cpu")).name == "bf16"


def test_the_resolved_precision_is_part_of_the_keys_of_stages_that_compute_in_it(cpu_bf16) -> None:
    cpu_bf16(True)
    experiment = ("experiment=qbert_sst2", "quantize=qbert_mp", "device=cpu")
    auto = {s.stage.name: s for s in plan(compose_config(*experiment))}
    bf16 = {s.stage.name: s for s in plan(compose_config(*experiment, "device.precision=bf16"))}
    fp32 = {s.stage.name: s for s in plan(compose_config(*experiment, "device.precision=fp32"))}
    # auto means bf16 here, so it is the very same artefact: same key, and the key names bf16, never auto.
    assert {n: s.key for n, s in auto.items()} == {n: s.key for n, s in bf16.items()}
    assert auto["finetune_teacher"].slice["device.precision"] == "bf16"
    assert fp32["finetune_teacher"].slice["device.precision"] == "fp32"
    assert fp32["finetune_teacher"].key != bf16["finetune_teacher"].key
    # Hessian power iteration and quantization-aware training always run fp32: precision is not in their
    # own slice (their keys still differ, through the teacher they consume).
    assert "device.precision" not in fp32["sensitivity"].slice and "device.precision" not in fp32["quantize"].slice
    assert fp32["sensitivity"].slice == bf16["sensitivity"].slice
    # Tang's augmentation uses no model, TinyBERT's masked LM does.
    tang = [{s.stage.name: s for s in plan(compose_config("experiment=bilstm_sst2", f"device.precision={p}"))}["augment"] for p in ("fp32", "bf16")]
    assert tang[0].key == tang[1].key and "device.precision" not in tang[0].slice
    tinybert = [{s.stage.name: s for s in plan(compose_config("experiment=tinybert_sst2", f"device.precision={p}"))} for p in ("fp32", "bf16")]
    assert tinybert[0]["augment"].slice["device.precision"] == "fp32" and tinybert[0]["augment"].key != tinybert[1]["augment"].key


def test_attention_loss_under_bf16_is_computed_in_fp32_from_the_bf16_values() -> None:
    """Scores of magnitude ~1e2 in bf16 (8 significant bits): the loss subtracts and squares in fp32."""
    torch.manual_seed(0)
    student = (torch.randn(2, 3, 5, 5) * 100).to(torch.bfloat16)
    teacher = (torch.randn(2, 3, 5, 5) * 100).to(torch.bfloat16)
    mask = torch.ones(2, 5, dtype=torch.long)
    mask[1, 3:] = 0
    loss = attention_mse(student, teacher, mask)
    assert loss.dtype == torch.float32
    s, t = student.float(), teacher.float()
    drop = (mask == 0)[:, None, None, :]
    s = torch.where(drop | (s <= -1e2), 0.0, s)
    t = torch.where(drop | (t <= -1e2), 0.0, t)
    assert loss.item() == pytest.approx(((s - t) ** 2).mean().item(), rel=1e-6)


def test_every_tinybert_term_returns_fp32_for_bf16_inputs() -> None:
    torch.manual_seed(1)
    hidden_s, hidden_t = torch.randn(2, 4, 8).to(torch.bfloat16), torch.randn(2, 4, 8).to(torch.bfloat16)
    logits_s, logits_t = torch.randn(4, 3).to(torch.bfloat16), torch.randn(4, 3).to(torch.bfloat16)
    projection = torch.nn.Linear(8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # as in the training loop: the projection runs in bf16
        hidden = hidden_mse(hidden_s, hidden_t, projection)
    assert hidden.dtype == torch.float32
    soft = soft_cross_entropy(logits_s, logits_t)
    expected = -(F.softmax(logits_t.float(), -1) * F.log_softmax(logits_s.float(), -1)).sum(-1).mean()
    assert soft.dtype == torch.float32 and soft.item() == pytest.approx(expected.item(), rel=1e-6)
    mse = logit_mse(logits_s[:, :1], logits_t[:, :1])
    assert mse.dtype == torch.float32
    assert mse.item() == pytest.approx(((logits_s[:, 0].float() - logits_t[:, 0].float()) ** 2).mean().item(), rel=1e-6)


def _linear_job(seen: list[torch.dtype]) -> TrainingJob:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
    model[0].register_forward_hook(lambda module, args, output: seen.append(output.dtype))
    features = datasets.Dataset.from_dict({"x": torch.randn(32, 8).tolist(), "label": [0, 1] * 16, "length": [8] * 32})

    def collate(rows: list[dict]) -> dict[str, torch.Tensor]:
        return {"input_ids": torch.tensor([r["x"] for r in rows]), "label": torch.tensor([r["label"] for r in rows])}

    def save_model(module: torch.nn.Module, directory: Path) -> None:
        directory.mkdir(parents=True)
        torch.save(module.state_dict(), directory / "weights.pt")

    return TrainingJob(model, features, collate, lambda m, b: F.cross_entropy(m(b["input_ids"]), b["label"]), save_model)


@pytest.mark.parametrize("name", ["fp32", "bf16"])
def test_the_loop_autocasts_forwards_and_keeps_fp32_master_weights(tmp_path: Path, name: str) -> None:
    seen: list[torch.dtype] = []
    job = _linear_job(seen)
    cfg = TrainConfig(epochs=1, max_steps=4, batch_size=8, warmup_ratio=0.0, learning_rate=1e-2, checkpoint_every_steps=2)
    outcome = train(job, cfg, DeviceConfig(type="cpu", precision=name), tmp_path)
    assert outcome.precision == name and outcome.summary()["precision"] == name
    assert set(seen) == {torch.bfloat16 if name == "bf16" else torch.float32}
    assert all(p.dtype == torch.float32 for p in job.model.parameters())
    kept = torch.load(tmp_path / "model" / "weights.pt")
    assert all(v.dtype == torch.float32 for v in kept.values())
    assert outcome.summary()["tokens_per_second"] == 0.0  # this job's batches have no attention mask to count



def test_agreement_counts_equal_classes_and_the_largest_output_change() -> None:
    from kdrun.data.tasks import get_task
    from kdrun.deployment import agreement
    from kdrun.metrics import Evaluation

    reference = Evaluation({}, None, {"dev": np.array([[1.0, 0.0], [0.0, 1.0], [2.0, 1.0], [0.0, 3.0]])})
    other = Evaluation({}, None, {"dev": np.array([[0.9, 0.2], [0.6, 0.5], [2.0, 1.0], [0.0, 2.5]])})
    # rows 0, 2, 3 keep their class; the largest change is row 1's 0.6.
    assert agreement(get_task("sst2"), other, reference) == {"agreement_with_fp32": 0.75, "max_abs_diff_vs_fp32": pytest.approx(0.6)}
    scores = Evaluation({}, None, {"dev": np.array([[1.0], [2.0]])})
    moved = Evaluation({}, None, {"dev": np.array([[1.25], [2.0]])})
    assert agreement(get_task("stsb"), moved, scores) == {"max_abs_diff_vs_fp32": 0.25}


def test_inference_models_store_their_weights_in_the_low_precision() -> None:
    model = torch.nn.Linear(4, 2)
    assert Precision("fp32", "cpu").inference_model(model) is model
    bf16 = Precision("bf16", "cpu")
    copied = bf16.inference_model(model)
    assert copied is not model and copied.weight.dtype == torch.bfloat16 and model.weight.dtype == torch.float32
    assert torch.equal(copied.weight, model.weight.to(torch.bfloat16))
    assert bf16.inference_model(copied) is copied  # already bf16: nothing to copy
    frozen = bf16.inference_model(model, copy=False)
    assert frozen is model and model.weight.dtype == torch.bfloat16


def test_a_precision_sweep_becomes_a_table_with_bf16_speed_ups() -> None:
    from kdrun.report import build_table

    def record(precision: str, score: float, speedup: float) -> dict:
        return {
            "experiment": "teacher_sst2", "recipe": "teacher", "task": "sst2", "ablation": "none", "precision": precision,
            "main_score": score, "overrides": [f"device.precision={precision}"], "report": {"rows": "ablation", "columns": "task"},
            "deployment": {"fp32": {"main_score": 0.891}, "bf16": {"main_score": 0.893, "speedup_vs_fp32_bs32": speedup}},
        }

    table = build_table([record("fp32", 0.8911, 3.85), record("bf16", 0.8933, 3.83)], {"rows": "precision"})
    assert table.rows == ["fp32", "bf16"]
    assert table.cells[("fp32", "sst2")].values == [pytest.approx(89.11)] and table.cells[("bf16", "sst2")].values == [pytest.approx(89.33)]
    assert table.extras["bf16 speed-up bs32"] == {"fp32": 3.85, "bf16": 3.83}
