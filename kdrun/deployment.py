"""One model in each format it could ship in, scored and timed side by side.

A user picks the format to deploy from one table: for each of ``fp32``, ``bf16``
and ``int8`` the dev metrics, how often its predictions agree with fp32's, the
largest change of an output, and latency at each batch size, all measured in one
process on the same inputs so that the ratios mean something on a shared machine.

- ``fp32``, ``bf16``: the model on its device; bf16 with its weights stored in bf16,
  under autocast (only where the device runs bf16 natively; elsewhere it is
  emulated, slower than fp32, and skipped).
- ``int8``: dynamic int8 linear layers (``kdrun.quant.int8``), CPU kernels, so
  measured only when the model runs on the CPU (``device=cpu``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import datasets
import numpy as np
import torch
from rich.table import Table

from kdrun.data.tasks import TaskSpec
from kdrun.metrics import Evaluation
from kdrun.models.inputs import forward_inputs
from kdrun.models.measure import median_latency_ms
from kdrun.precision import Precision, cpu_native_bf16
from kdrun.predict import logits_to_predictions, model_device, score_dev_sets
from kdrun.quant.int8 import export_int8

logger = logging.getLogger(__name__)

FORMATS = ("fp32", "bf16", "int8")


@dataclass(frozen=True)
class LatencySettings:
    batch_sizes: tuple[int, ...]
    warmup: int
    repeats: int


@dataclass
class FormatRow:
    """One format's numbers; ``skipped`` says why a format was not measured."""

    name: str
    evaluation: Evaluation | None = None
    latency: dict[str, float] | None = None
    skipped: str | None = None

    def as_dict(self, task: TaskSpec, main_metric: str, reference: FormatRow | None) -> dict[str, Any]:
        if self.skipped:
            return {"skipped": self.skipped}
        assert self.evaluation is not None
        row: dict[str, Any] = {"dev": self.evaluation.metrics, "main_score": self.evaluation.metrics[main_metric]}
        if self.evaluation.not_selectable_because:
            row["predicts_one_class"] = self.evaluation.not_selectable_because
        if reference is not None and reference.evaluation is not None and reference is not self:
            row.update(agreement(task, self.evaluation, reference.evaluation))
        if self.latency:
            row.update(self.latency)
            if reference is not None and reference.latency and reference is not self:
                for key, value in self.latency.items():
                    if key.startswith("latency_ms_bs") and key in reference.latency:
                        row[f"speedup_vs_fp32_bs{key.removeprefix('latency_ms_bs')}"] = round(reference.latency[key] / value, 3)
        return row


def agreement(task: TaskSpec, evaluation: Evaluation, reference: Evaluation) -> dict[str, float]:
    """How far one format's outputs are from fp32's on the same dev rows: the share of equal predicted
    classes (classification) and the largest absolute change of any output (logit or score)."""
    result: dict[str, float] = {}
    same, total, largest = 0, 0, 0.0
    for split, logits in evaluation.logits.items():
        base = reference.logits[split]
        largest = max(largest, float(np.max(np.abs(logits - base)))) if len(base) else largest
        if not task.is_regression:
            same += int((logits_to_predictions(task, logits) == logits_to_predictions(task, base)).sum())
            total += len(base)
    if not task.is_regression:
        result["agreement_with_fp32"] = same / total if total else 1.0
    result["max_abs_diff_vs_fp32"] = largest
    return result


def latency_inputs(tokenizer: Any, texts_a: list[str], texts_b: list[str] | None, batch_size: int, length: int) -> dict[str, torch.Tensor]:
    """``batch_size`` real dev inputs (repeated as needed) padded to ``length``."""
    repeat = -(-batch_size // len(texts_a))
    a = (texts_a * repeat)[:batch_size]
    b = (texts_b * repeat)[:batch_size] if texts_b else None
    return dict(tokenizer(a, b, padding="max_length", truncation=True, max_length=length, return_tensors="pt"))


def measure_latency(
    model: torch.nn.Module, inputs_by_batch: Mapping[int, dict[str, torch.Tensor]], settings: LatencySettings, precision: Precision
) -> dict[str, float]:
    """Median forward latency (ms) and throughput per batch size, under ``precision``'s autocast."""
    device = model_device(model)
    results: dict[str, float] = {}
    for batch_size in settings.batch_sizes:
        inputs = forward_inputs(model, {k: v.to(device) for k, v in inputs_by_batch[batch_size].items()})
        with precision.autocast():
            ms = median_latency_ms(model, inputs, settings.warmup, settings.repeats)
        results[f"latency_ms_bs{batch_size}"] = round(ms, 3)
        results[f"throughput_ex_per_s_bs{batch_size}"] = round(batch_size * 1000.0 / ms, 2)
    return results


def unsupported_reason(name: str, device_type: str) -> str | None:
    """Why ``name`` cannot be measured meaningfully here, or None."""
    if name == "int8" and device_type != "cpu":
        return "torch.ao's int8 kernels run on the CPU; evaluate with device=cpu to compare them with fp32"
    if name == "bf16" and device_type == "cpu":
        native, feature = cpu_native_bf16()
        if not native:
            return f"this CPU has {feature}: bf16 would be emulated, slower than fp32"
    if name == "bf16" and device_type == "cuda" and not torch.cuda.is_bf16_supported():
        return "this GPU has no bf16"
    return None


def format_rows(
    model: torch.nn.Module,
    formats: list[str],
    task: TaskSpec,
    dev_sets: Mapping[str, datasets.Dataset],
    collate: Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]],
    batch_size: int,
    latency: tuple[LatencySettings, Mapping[int, dict[str, torch.Tensor]]] | None,
    required: str | None = None,
) -> dict[str, FormatRow]:
    """Score (and, given ``latency``, time) ``model`` in each of ``formats``. fp32 is measured too when
    another format is asked for, as the reference they are compared with. ``required`` (the run's own
    precision) is measured even where it would otherwise be skipped."""
    device_type = model_device(model).type
    unknown = [name for name in formats if name not in FORMATS]
    if unknown:
        raise ValueError(f"unknown deployment format(s) {unknown}; known: {list(FORMATS)}")
    wanted = [name for name in FORMATS if name in formats or (name == "fp32" and formats)]
    rows: dict[str, FormatRow] = {}
    for name in wanted:
        reason = None if name == required else unsupported_reason(name, device_type)
        if reason:
            rows[name] = FormatRow(name, skipped=reason)
            continue
        if name == "int8":
            runnable, precision = export_int8(model), Precision("fp32", "cpu")  # a copy
        else:
            precision = Precision(name, device_type)
            runnable = precision.inference_model(model)
        evaluation = score_dev_sets(runnable, task, dev_sets, collate, batch_size, precision=precision)
        timed = measure_latency(runnable, latency[1], latency[0], precision) if latency else None
        rows[name] = FormatRow(name, evaluation, timed)
        logger.info("evaluate: %s %s", name, ", ".join(f"{k} {v:.4f}" for k, v in evaluation.metrics.items()))
    return rows


def deployment_table(deployment: dict[str, dict[str, Any]], main_metric: str, title: str) -> Table:
    """Formats side by side: dev score, agreement with fp32, latency and speed-up per batch size."""
    batch_sizes = sorted({int(k.removeprefix("latency_ms_bs")) for row in deployment.values() for k in row if k.startswith("latency_ms_bs")})
    table = Table(title=title)
    for column in ("format", f"dev {main_metric}", "agrees with fp32", "max |Δ| vs fp32"):
        table.add_column(column, justify="left" if column == "format" else "right")
    for batch_size in batch_sizes:
        table.add_column(f"ms bs{batch_size}", justify="right")
        table.add_column(f"× fp32 bs{batch_size}", justify="right")
    for name, row in deployment.items():
        if "skipped" in row:
            table.add_row(name, f"skipped: {row['skipped']}")
            continue
        agree = row.get("agreement_with_fp32")
        diff = row.get("max_abs_diff_vs_fp32")
        cells = [name, f"{100 * row['main_score']:.2f}", "" if agree is None else f"{100 * agree:.2f}%", "" if diff is None else f"{diff:.3g}"]
        for batch_size in batch_sizes:
            ms, speedup = row.get(f"latency_ms_bs{batch_size}"), row.get(f"speedup_vs_fp32_bs{batch_size}")
            cells += ["" if ms is None else f"{ms:.1f}", "" if speedup is None else f"{speedup:.2f}"]
        table.add_row(*cells)
    return table
