"""Stage evaluate: the final model's task metrics, size and speed.

Takes the model of the last model-producing stage, scores it on every dev split
with the task's metrics, counts its parameters and weight bytes, times forward
passes on real dev inputs at each configured batch size, optionally writes the
GLUE-submission files for the test split(s), and prints a table. Not cached:
latency belongs to the machine the run is on.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from rich.console import Console
from rich.table import Table
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from kdrun.data.submission import write_glue_submission
from kdrun.models.loading import count_parameters
from kdrun.models.inputs import forward_inputs
from kdrun.models.measure import median_latency_ms, size_on_disk
from kdrun.quant.int8 import export_int8
from kdrun.quant.modules import QuantizationPlan, enable_fake_quantization, materialize
from kdrun.quant.size import packed_size
from kdrun.pipeline import Stage, StageOutput, register
from kdrun.predict import logits_to_predictions, main_metric_key, predict_logits, score_dev_sets
from kdrun.stages import task_data
from kdrun.train import get_accelerator

logger = logging.getLogger(__name__)


def _latency(model, tokenizer, texts_a: list[str], texts_b: list[str] | None, cfg: DictConfig, device) -> dict[str, Any]:
    settings = cfg.evaluate
    results: dict[str, Any] = {}
    for batch_size in settings.latency_batch_sizes:
        repeat = -(-batch_size // len(texts_a))
        a = (texts_a * repeat)[:batch_size]
        b = (texts_b * repeat)[:batch_size] if texts_b else None
        inputs = tokenizer(
            a, b, padding="max_length", truncation=True, max_length=settings.latency_seq_length, return_tensors="pt"
        ).to(device)
        ms = median_latency_ms(model, forward_inputs(model, inputs), settings.latency_warmup, settings.latency_repeats)
        results[f"latency_ms_bs{batch_size}"] = round(ms, 3)
        results[f"throughput_ex_per_s_bs{batch_size}"] = round(batch_size * 1000.0 / ms, 2)
    return results


def _int8_export(model, tokenizer, task, dev_sets, collate, latency_texts, cfg: DictConfig) -> dict[str, Any]:
    """Score and time the model on real int8 CPU kernels beside its full-precision graph, in one process.

    Both run on the CPU from the same (grid) weights, so the ratio is the speed-up of
    the kernels alone; scoring the int8 model shows what its re-quantization costs.
    """
    cpu = torch.device("cpu")
    full_precision = materialize(copy.deepcopy(model)).to(cpu).eval()
    int8_model = export_int8(full_precision)
    result: dict[str, Any] = {"dev": score_dev_sets(int8_model, task, dev_sets, collate, cfg.evaluate.batch_size).metrics}
    fp32 = _latency(full_precision, tokenizer, *latency_texts, cfg, cpu)
    int8 = _latency(int8_model, tokenizer, *latency_texts, cfg, cpu)
    for batch_size in cfg.evaluate.latency_batch_sizes:
        key = f"latency_ms_bs{batch_size}"
        result[f"fp32_{key}"], result[f"int8_{key}"] = fp32[key], int8[key]
        result[f"speedup_bs{batch_size}"] = round(fp32[key] / int8[key], 3)
    return result


def run(cfg: DictConfig, inputs: dict[str, StageOutput], out_dir: Path) -> dict[str, Any]:
    task = task_data.task_of(cfg)
    source = list(inputs.values())[-1]
    model_dir = source.path / "model"
    accelerator = get_accelerator(cfg.device)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).to(accelerator.device).eval()
    collate = task_data.collator(tokenizer, task)

    dev_examples = task_data.dev_examples(cfg)
    dev_sets = task_data.tokenized(dev_examples, tokenizer, cfg)
    efficiency: dict[str, Any] = {
        "parameters": count_parameters(model),
        "size_on_disk_bytes": size_on_disk(model_dir),
        "device": str(accelerator.device),
        "latency_seq_length": cfg.evaluate.latency_seq_length,
    }
    first = next(iter(dev_examples.values()))
    latency_texts = (list(first["text_a"]), list(first["text_b"]) if task.is_pair else None)
    if cfg.evaluate.measure_latency:  # of the plain full-precision graph, before any fake quantization
        efficiency.update(_latency(model, tokenizer, *latency_texts, cfg, accelerator.device))
    plan = QuantizationPlan.load(model_dir)
    if plan is not None:
        enable_fake_quantization(model, plan)
        efficiency["quantization"] = {"layer_bits": list(plan.layer_bits), "groups": plan.groups, **packed_size(model, plan)}
    evaluation = score_dev_sets(model, task, dev_sets, collate, cfg.evaluate.batch_size)
    metrics = evaluation.metrics
    int8 = _int8_export(model, tokenizer, task, dev_sets, collate, latency_texts, cfg) if cfg.evaluate.int8 else None

    submissions: list[str] = []
    if cfg.evaluate.predict_test:
        for split, examples in task_data.test_examples(cfg).items():
            features = task_data.tokenized({split: examples}, tokenizer, cfg)[split]
            predictions = logits_to_predictions(task, predict_logits(model, features, collate, cfg.evaluate.batch_size))
            path = write_glue_submission(task, split, list(examples["id"]), predictions, out_dir / "glue_submission")
            submissions.append(str(path))

    summary = {
        "model_from": source.name,
        "model_dir": str(model_dir),
        "dev": metrics,
        "main_metric": main_metric_key(task),
        "main_score": metrics[main_metric_key(task)],
        # Set when the model is a constant predictor (e.g. always 'equivalent' on MRPC): tables mark its score.
        "predicts_one_class": evaluation.not_selectable_because,
        "dev_examples": {split: len(ds) for split, ds in dev_sets.items()},
        "efficiency": efficiency,
        "submissions": submissions,
    }
    if int8 is not None:
        summary["int8"] = int8
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
    for name, value in summary.get("int8", {}).items():
        if name == "dev":
            table.add_row("int8 kernels: dev", ", ".join(f"{k} {100 * v:.2f}" for k, v in value.items()))
        else:
            table.add_row(f"int8 kernels: {name}", str(value))
    for path in summary["submissions"]:
        table.add_row("submission", path)
    Console().print(table)


STAGE = register(
    Stage(
        name="evaluate",
        run=run,
        check=lambda cfg: task_data.check_data_available(cfg),
        reads=("task", "data.max_seq_length", "data.max_eval_examples", "data.sample_seed", "evaluate"),
        consumes_model=True,
        cached=False,
    )
)
