"""Stage evaluate: the final model's task metrics, size and speed.

Takes the model of the last model-producing stage, scores it on every dev split
with the task's metrics in the run's precision, counts its parameters and weight
bytes, scores and times it in each deployment format (``evaluate.formats``: fp32,
bf16, int8, side by side on real dev inputs), optionally writes the
GLUE-submission files for the test split(s), and prints both tables. Not cached:
latency belongs to the machine the run is on.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

from omegaconf import DictConfig
from rich.table import Table
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from kdrun.data.submission import write_glue_submission
from kdrun.deployment import FORMATS, LatencySettings, deployment_table, format_rows, latency_inputs
from kdrun.models.loading import count_parameters
from kdrun.models.measure import size_on_disk
from kdrun.quant.modules import QuantizationPlan, enable_fake_quantization, materialize
from kdrun.quant.size import packed_size
from kdrun.report.tables import wide_console
from kdrun.contract import PipelineError
from kdrun.precision import Precision, resolve_precision
from kdrun.predict import logits_to_predictions, main_metric_key, predict_logits
from kdrun.stages.context import StageContext, check_data_available
from kdrun.train import get_accelerator

logger = logging.getLogger(__name__)


def run(ctx: StageContext) -> dict[str, Any]:
    cfg, task, out_dir = ctx.cfg, ctx.task, ctx.out_dir
    settings = cfg.evaluate
    source = ctx.model_input
    model_dir = ctx.model_dir()
    accelerator = get_accelerator(cfg.device)
    precision = resolve_precision(cfg.device)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).to(accelerator.device).eval()
    text = ctx.text(tokenizer)
    collate, dev_sets = text.collate, text.dev_sets
    plan = QuantizationPlan.load(model_dir)
    # A quantized model is scored with its fake quantization in fp32 (bf16 would move weights off their
    # grids); its deployment formats start from its weights written onto the grids.
    main_format = "fp32" if plan is not None else precision.name
    efficiency: dict[str, Any] = {
        "parameters": count_parameters(model),
        "size_on_disk_bytes": size_on_disk(model_dir),
        "device": str(accelerator.device),
        "precision": main_format,
        "latency_seq_length": settings.latency_seq_length,
    }
    texts = text.first_dev_texts()
    latency = None
    if settings.measure_latency:
        timing = LatencySettings(tuple(settings.latency_batch_sizes), settings.latency_warmup, settings.latency_repeats)
        latency = (timing, {bs: latency_inputs(tokenizer, *texts, bs, settings.latency_seq_length) for bs in timing.batch_sizes})
    graph = materialize(enable_fake_quantization(copy.deepcopy(model), plan)) if plan is not None else model
    rows = format_rows(graph, [*settings.formats, main_format], task, dev_sets, collate, settings.batch_size, latency, required=main_format)
    efficiency.update(rows[main_format].latency or {})
    if plan is not None:
        enable_fake_quantization(model, plan)
        efficiency["quantization"] = {"layer_bits": list(plan.layer_bits), "groups": plan.groups, **packed_size(model, plan)}
        evaluation = text.score(model, settings.batch_size, Precision("fp32", precision.device_type))
    else:
        evaluation = rows[main_format].evaluation
    assert evaluation is not None
    metrics = evaluation.metrics

    submissions: list[str] = []
    if settings.predict_test:
        for split, examples in ctx.test_examples().items():
            features = text.features(examples)
            test_precision = Precision(main_format, precision.device_type)
            runnable = model if plan is not None else test_precision.inference_model(model)
            logits = predict_logits(runnable, features, collate, settings.batch_size, precision=test_precision)
            path = write_glue_submission(task, split, list(examples["id"]), logits_to_predictions(task, logits), out_dir / "glue_submission")
            submissions.append(str(path))

    main_metric = main_metric_key(task)
    summary = {
        "model_from": source.name,
        "model_dir": str(model_dir),
        "dev": metrics,
        "main_metric": main_metric,
        "main_score": metrics[main_metric],
        # Set when the model is a constant predictor (e.g. always 'equivalent' on MRPC): tables mark its score.
        "predicts_one_class": evaluation.not_selectable_because,
        "dev_examples": {split: len(ds) for split, ds in dev_sets.items()},
        "efficiency": efficiency,
        "deployment": {name: row.as_dict(task, main_metric, rows.get("fp32")) for name, row in rows.items()},
        "submissions": submissions,
    }
    if accelerator.is_main_process:
        print_summary(task.name, source.name, summary)
    return summary


def print_summary(task_name: str, model_from: str, summary: dict[str, Any]) -> None:
    table = Table(title=f"{task_name}: {model_from} model")
    table.add_column("measure")
    table.add_column("value", justify="right")
    for name, value in summary["dev"].items():
        table.add_row(f"dev {name}", f"{100 * value:.2f}")
    if summary.get("predicts_one_class"):
        table.add_row("[bold red]constant predictor", summary["predicts_one_class"])
    for name, value in summary["efficiency"].items():
        for label, item in (value.items() if isinstance(value, dict) else [(None, value)]):
            label = name if label is None else f"{name}: {label}"
            table.add_row(label, f"{item:,}" if isinstance(item, int) else str(item))
    for path in summary["submissions"]:
        table.add_row("submission", path)
    console = wide_console()
    console.print(table)
    console.print(deployment_table(summary["deployment"], summary["main_metric"], f"{task_name}: {model_from} model, deployment formats"))


def check(cfg: DictConfig) -> None:
    unknown = [name for name in cfg.evaluate.formats if name not in FORMATS]
    if unknown:
        raise PipelineError(f"evaluate.formats names unknown format(s) {unknown}; known: {list(FORMATS)}.")
    check_data_available(cfg)
    if cfg.evaluate.predict_test:  # read now, not after every model of the run has trained
        StageContext("evaluate", cfg).test_examples()
