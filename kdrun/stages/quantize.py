"""Stage quantize: Q-BERT quantization of the model before it (Shen et al., AAAI 2020).

Takes the model of the last model-producing stage, chooses bits per encoder layer
(uniform, or mixed by the ``sensitivity`` stage's Hessian spectrum), makes it
compute on those grids (group-wise weight ranges, 8-bit embeddings and
activations), optionally fine-tunes it quantization-aware through the shared
training loop (on the labels, or distilling the full-precision model's logits),
and writes ``model/`` (latent weights + ``quantization.json``) and ``bits.json``.
``quantize=none`` passes the model through, so the fp32 row of a sweep is one
more value of the same group.

Quantization-aware fine-tuning runs in fp32 whatever ``device.precision`` says:
under bf16 autocast a weight on an 8-bit grid, q * scale, is rounded again to
bf16's 8 significant bits before the matrix product, which moves it by up to a
quarter of a grid step, so the model would train on other weights than the grid
it is learning. The stage's output therefore does not depend on the precision.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from omegaconf import DictConfig
from rich.console import Console
from rich.table import Table
from transformers import AutoModelForSequenceClassification

from kdrun.distill.prediction import PredictionLossSettings, prediction_loss
from kdrun.distill.layers import StudentWithProjections
from kdrun.distill.teacher_logits import TeacherLogits
from kdrun.contract import PipelineError
from kdrun.precision import Precision, device_type_of
from kdrun.report.plots import plot_sensitivities
from kdrun.predict import main_metric_key
from kdrun.quant.allocation import mixed_precision_bits, uniform_bits
from kdrun.quant.modules import QuantizationPlan, enable_fake_quantization, encoder_layers
from kdrun.quant.size import packed_size
from kdrun.stages.context import StageContext
from kdrun.quant.sensitivity import print_sensitivity_table, read_sensitivities
from kdrun.train import TrainingJob, seed_everything, train
from kdrun.models.loading import load_tokenizer, model_saver

logger = logging.getLogger(__name__)

RECIPES = ("none", "qbert", "qbert_mp", "direct")
BITS_FILE = "bits.json"


def check(cfg: DictConfig) -> None:
    settings = cfg.quantize
    if settings.name not in RECIPES:
        raise PipelineError(f"quantize={settings.name} is unknown; choose one of {RECIPES}.")
    if settings.name == "qbert_mp":
        if len(settings.mixed_bits) != 2:
            raise PipelineError(f"quantize.mixed_bits must be a pair [low, high], got {list(settings.mixed_bits)}.")
        try:  # the pair and the target average width, checked by the allocation itself on one layer
            mixed_precision_bits([0.0], *settings.mixed_bits, settings.target_average_bits)
        except ValueError as error:
            raise PipelineError(f"quantize.mixed_bits / quantize.target_average_bits: {error}.") from error
        if "sensitivity" not in cfg.pipeline.stages:
            raise PipelineError("quantize=qbert_mp allocates bits by Hessian sensitivity: add 'sensitivity' before 'quantize' in pipeline.stages.")


def bit_plan(settings: DictConfig, num_layers: int, sensitivities: list[dict[str, Any]] | None) -> QuantizationPlan:
    if settings.name == "qbert_mp":
        low, high = settings.mixed_bits
        bits = mixed_precision_bits([layer["sensitivity"] for layer in sensitivities], low, high, settings.target_average_bits)
    else:
        bits = uniform_bits(num_layers, settings.weight_bits)
    return QuantizationPlan(tuple(bits), settings.groups, settings.embedding_bits, settings.activation_bits)


def print_bits_table(plan: QuantizationPlan, size: dict[str, Any], title: str) -> None:
    table = Table(title=title)
    table.add_column("encoder layer", justify="right")
    table.add_column("weight bits", justify="right")
    for layer, bits in enumerate(plan.layer_bits, start=1):
        table.add_row(str(layer), str(bits))
    table.caption = (
        f"groups {plan.groups}, embeddings {plan.embedding_bits}-bit, activations {plan.activation_bits}-bit; "
        f"packed {size['packed_bytes'] / 1e6:.2f} MB ({size['compression']}x smaller than fp32)"
    )
    Console().print(table)


def run(ctx: StageContext) -> dict[str, Any]:
    cfg, out_dir = ctx.cfg, ctx.out_dir
    settings = cfg.quantize
    source_dir = ctx.model_dir()
    if settings.name == "none":
        (out_dir / "model").symlink_to(source_dir.resolve(), target_is_directory=True)
        return {"model_dir": "model", "quantized": False}

    task = ctx.task
    tokenizer = load_tokenizer(str(source_dir))
    model = AutoModelForSequenceClassification.from_pretrained(source_dir)
    sensitivities = read_sensitivities(ctx.inputs["sensitivity"].path) if "sensitivity" in ctx.inputs else None
    plan = bit_plan(settings, len(encoder_layers(model)), sensitivities)
    text = ctx.text(tokenizer)
    collate = text.collate
    save_model = model_saver(tokenizer, lambda wrapper: wrapper.student, also=lambda wrapper, directory: plan.save(directory))
    evaluate = text.evaluator(settings.train.eval_batch_size, lambda wrapper: wrapper.student)

    summary: dict[str, Any] = {"model_dir": "model", "quantized": True, "plan": plan.__dict__ | {"layer_bits": list(plan.layer_bits)}}
    if settings.finetune:
        train_set = text.features(ctx.train_examples())
        full_precision_logits = None
        if settings.distill_from_full_precision:
            full_precision_logits = TeacherLogits.cached(
                model, train_set, collate, settings.train.eval_batch_size, out_dir / "full_precision_logits.safetensors"
            )
        loss_settings = PredictionLossSettings(hard_weight=0.0 if settings.distill_from_full_precision else 1.0)
        seed_everything(settings.train.seed)
        enable_fake_quantization(model, plan)
        outcome = train(
            TrainingJob(
                model=StudentWithProjections(model),
                train_features=train_set,
                collate=collate,
                compute_loss=prediction_loss(loss_settings, task.is_regression, full_precision_logits),
                save_model=save_model,
                evaluate=evaluate,
                best_metric=main_metric_key(task),
                keep_best=settings.keep_best,
                description=f"quantize ({settings.name}) {task.name}",
            ),
            settings.train,
            cfg.device,
            out_dir / "qat",
            Precision("fp32", device_type_of(cfg.device), "quantization-aware training keeps the grids exact"),
        )
        outcome.model_dir.rename(out_dir / "model")
        summary.update(train_examples=len(train_set), **outcome.summary())
    else:
        enable_fake_quantization(model, plan)
        save_model(StudentWithProjections(model), out_dir / "model")
        summary["best_dev"] = evaluate(StudentWithProjections(model)).metrics

    size = packed_size(model, plan)
    summary["size"] = size
    (out_dir / BITS_FILE).write_text(json.dumps({"layer_bits": list(plan.layer_bits), "plan": summary["plan"], "sensitivity": sensitivities, "size": size}, indent=2))
    title = f"{task.name}: {settings.name} bits per layer"
    if sensitivities is not None:
        print_sensitivity_table(sensitivities, plan.layer_bits, title)
        plot_sensitivities(
            [layer["mean"] for layer in sensitivities], [layer["std"] for layer in sensitivities], out_dir / "bits",
            plan.layer_bits, title,
        )
    print_bits_table(plan, size, title)
    return summary
