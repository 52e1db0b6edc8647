"""Stages export and import_model: the model as ONNX graphs, checked, measured, with a model card.

``export`` takes the model of the last model-producing stage (or, standalone, the one ``import_model``
brings in from ``export.model``) and writes ``onnx/`` into its cache entry: ``model.onnx`` (fp32),
``model_int8.onnx`` (ONNX Runtime dynamic int8), the tokenizer, ``config.json`` and ``README.md``, a
model card whose usage snippet runs from that directory alone.

Parity: each graph is scored on dev through an ONNX Runtime session with kdrun's own batching and
metrics, and its predictions are compared with PyTorch's. Below ``export.min_agreement`` the stage fails
with one line and publishes nothing. The deployment table (PyTorch fp32, bf16, torch.ao int8, ONNX fp32,
ONNX int8: dev score, agreement, size, latency at each ``evaluate.latency_batch_sizes`` on
``device.threads`` threads) is measured side by side in this one process.

The stage is cached like a trained model (its graphs are artefacts); its key holds the latency settings
and ``device.threads``, and its summary names the host the latencies were measured on.
"""

from __future__ import annotations

import io
import logging
import os
import platform
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig
from transformers import AutoModelForSequenceClassification

from kdrun import __version__
from kdrun.data.tasks import TaskSpec
from kdrun.deployment import FORMATS as PYTORCH_FORMATS
from kdrun.deployment import FormatRow, LatencySettings, deployment_table, format_rows, latency_inputs, measure_latency
from kdrun.export import FORMATS
from kdrun.metrics import Evaluation
from kdrun.models.loading import load_checked_config, load_tokenizer, save_tokenizer
from kdrun.models.measure import size_on_disk
from kdrun.contract import PipelineError
from kdrun.precision import Precision
from kdrun.predict import logits_to_predictions, main_metric_key
from kdrun.quant.int8 import export_int8
from kdrun.quant.modules import QuantizationPlan, enable_fake_quantization, materialize
from kdrun.report.tables import wide_console
from kdrun.stages.context import StageContext, check_data_available

logger = logging.getLogger(__name__)

EXPORT_DIR = "onnx"
GRAPH_FILES = {"onnx": "model.onnx", "onnx_int8": "model_int8.onnx"}
UNOPTIMIZED = "model_unoptimized.onnx"


class ExportParityError(PipelineError):
    """An exported graph disagrees with PyTorch beyond ``export.min_agreement``."""


# --------------------------------------------------------------------------- the model


def load_deployable(model_dir: Path) -> tuple[torch.nn.Module, QuantizationPlan | None]:
    """The model as it ships, loaded as the evaluate stage loads it, on the CPU, in eval mode; a Q-BERT model
    with its weights written onto its grids (activations are not quantized: see docs/export.md)."""
    model = AutoModelForSequenceClassification.from_pretrained(model_dir)
    plan = QuantizationPlan.load(model_dir)
    if plan is not None:
        materialize(enable_fake_quantization(model, plan))
    return model.to("cpu").eval(), plan


def pytorch_size_bytes(name: str, runnable: torch.nn.Module, model_dir: Path) -> int:
    """Bytes on disk of a PyTorch format: fp32 is the model directory's weight files; bf16 and int8 are
    their state dicts as safetensors (bf16) or ``torch.save`` (int8 packed weights) would write them."""
    if name == "fp32":
        return size_on_disk(model_dir)
    buffer = io.BytesIO()
    if name == "bf16":
        from safetensors.torch import save

        return len(save({k: v.contiguous() for k, v in runnable.state_dict().items()}))
    torch.save(runnable.state_dict(), buffer)
    return buffer.getbuffer().nbytes


def graph_size_bytes(path: Path) -> int:
    """The graph file plus any external-data files written beside it."""
    return sum(p.stat().st_size for p in path.parent.iterdir() if p.name == path.name or p.name.startswith(path.name + "."))


# --------------------------------------------------------------------------- parity


def agreement_share(task: TaskSpec, exported: Evaluation, reference: Evaluation, tolerance: float) -> tuple[float, int, int]:
    """(share, agreeing, total) of dev examples whose prediction the export shares with PyTorch: the same class,
    or for a regression a score within ``tolerance``."""
    agreeing = total = 0
    for split, logits in exported.logits.items():
        ours, theirs = logits_to_predictions(task, logits), logits_to_predictions(task, reference.logits[split])
        same = np.abs(ours - theirs) <= tolerance if task.is_regression else ours == theirs
        agreeing += int(same.sum())
        total += len(theirs)
    return (agreeing / total if total else 1.0), agreeing, total


def check_parity(name: str, share: float, agreeing: int, total: int, threshold: float, task: TaskSpec, tolerance: float) -> None:
    if share >= threshold:
        return
    what = f"within {tolerance} of PyTorch's score" if task.is_regression else "the same class as PyTorch"
    raise ExportParityError(
        f"export: the {name} graph gives {what} on {agreeing} of {total} dev examples ({100 * share:.2f}%), below "
        f"export.min_agreement.{name}={threshold}; nothing was published (lower the threshold only if that loss is acceptable)."
    )


# --------------------------------------------------------------------------- the stage


def _example_batch(tokenizer: Any, texts: tuple[list[str], list[str] | None]) -> dict[str, torch.Tensor]:
    """Two dev rows of different lengths, padded: what the exporter traces."""
    a, b = texts
    pair = b[:2] if b else None
    return dict(tokenizer(a[:2], pair, padding=True, truncation=True, max_length=64, return_tensors="pt"))


def load_latent(model_dir: Path, plan: QuantizationPlan) -> torch.nn.Module:
    """A Q-BERT model with its latent weights and fake-quantized layers (where its grids' scales come from)."""
    return enable_fake_quantization(AutoModelForSequenceClassification.from_pretrained(model_dir), plan)


def _write_graphs(
    settings: DictConfig, model: torch.nn.Module, example: dict[str, torch.Tensor], directory: Path, grids: tuple[torch.nn.Module, QuantizationPlan] | None
) -> dict[str, Any]:
    """model.onnx (optimized when asked and applicable; a Q-BERT model's with its grids, given ``grids``) and,
    when asked, model_int8.onnx, quantized from the fp32 graph."""
    from kdrun.export.graphs import check_graph, export_onnx, optimize_bert, quantize_int8

    directory.mkdir(parents=True, exist_ok=True)
    fp32 = directory / GRAPH_FILES["onnx"]
    plain = directory / UNOPTIMIZED
    inputs = export_onnx(model, example, plain, settings.opset)
    fusions = optimize_bert(plain, fp32, model.config) if settings.optimize else None
    if fusions is None:
        plain.rename(fp32)
    else:
        plain.unlink()
    if "onnx_int8" in settings.formats:
        quantize_int8(fp32, directory / GRAPH_FILES["onnx_int8"], settings.per_channel)
    carried = None
    if "onnx" not in settings.formats:  # only the int8 graph was asked for: the fp32 one was its source
        fp32.unlink()
    elif grids is not None:
        from kdrun.export.grids import carry_grids

        carried = carry_grids(fp32, *grids)
        check_graph(fp32, full=fusions is None)
    return {"inputs": inputs, "fusions": fusions, "grids": carried}


def run(ctx: StageContext) -> dict[str, Any]:
    out_dir = ctx.out_dir
    for stale in out_dir.iterdir():  # nothing to resume: an earlier attempt's files would only mislead
        shutil.rmtree(stale) if stale.is_dir() else stale.unlink()
    try:
        return _export(ctx)
    except BaseException:
        shutil.rmtree(out_dir / EXPORT_DIR, ignore_errors=True)
        raise


def _export(ctx: StageContext) -> dict[str, Any]:
    from kdrun.export.card import card_example, command_line, write_card
    from kdrun.export.runtime import OnnxRuntimeModel, inference_session

    cfg, task, out_dir, source = ctx.cfg, ctx.task, ctx.out_dir, ctx.model_input
    settings, timing_settings = cfg.export, cfg.evaluate
    model_dir = ctx.model_dir().resolve()
    threads = cfg.device.threads or torch.get_num_threads()
    tokenizer = load_tokenizer(str(model_dir))
    model, plan = load_deployable(model_dir)
    text = ctx.text(tokenizer)
    collate, dev_sets = text.collate, text.dev_sets
    texts = text.first_dev_texts()

    directory = out_dir / EXPORT_DIR
    grids = (load_latent(model_dir, plan), plan) if plan is not None and settings.qbert_grids else None
    written = _write_graphs(settings, model, _example_batch(tokenizer, texts), directory, grids)
    save_tokenizer(tokenizer, directory)
    model.config.save_pretrained(directory)

    latency = None
    if timing_settings.measure_latency:
        timing = LatencySettings(tuple(timing_settings.latency_batch_sizes), timing_settings.latency_warmup, timing_settings.latency_repeats)
        length = timing_settings.latency_seq_length
        latency = (timing, {bs: latency_inputs(tokenizer, *texts, bs, length) for bs in timing.batch_sizes})
    batch_size = timing_settings.batch_size
    pytorch = [name for name in PYTORCH_FORMATS if name in settings.pytorch_formats or name == "fp32"]
    rows = format_rows(model, pytorch, task, dev_sets, collate, batch_size, latency, required="fp32")
    sizes = {name: pytorch_size_bytes(name, _runnable(name, model), model_dir) for name in rows if rows[name].skipped is None}

    parity: dict[str, Any] = {}
    reference = rows["fp32"].evaluation
    assert reference is not None
    for name in [f for f in FORMATS if f in settings.formats]:
        path = directory / GRAPH_FILES[name]
        runnable = OnnxRuntimeModel(inference_session(path, threads))
        evaluation = text.score(runnable, batch_size)
        share, agreeing, total = agreement_share(task, evaluation, reference, settings.regression_tolerance)
        threshold = float(settings.min_agreement[name])
        parity[name] = {"agreement": share, "agreeing": agreeing, "examples": total, "min_agreement": threshold}
        check_parity(name, share, agreeing, total, threshold, task, settings.regression_tolerance)
        timed = measure_latency(runnable, latency[1], latency[0], Precision("fp32", "cpu")) if latency else None
        rows[name] = FormatRow(name, evaluation, timed)
        sizes[name] = graph_size_bytes(path)
        logger.info("export: %s %s; agrees with PyTorch on %d/%d", name, ", ".join(f"{k} {v:.4f}" for k, v in evaluation.metrics.items()), agreeing, total)

    main_metric = main_metric_key(task)
    deployment = {name: row.as_dict(task, main_metric, rows["fp32"]) for name, row in rows.items()}
    for name, size in sizes.items():
        deployment[name]["size_bytes"] = size
    shipped = "onnx_int8" if "onnx_int8" in settings.formats else "onnx"
    example = card_example(task, texts, tokenizer, inference_session(directory / GRAPH_FILES[shipped], threads), cfg.data.max_seq_length)
    summary = {
        "model_from": source.name,
        "model_dir": str(model_dir),
        "export_dir": EXPORT_DIR,
        "files": {name: f"{EXPORT_DIR}/{GRAPH_FILES[name]}" for name in FORMATS if name in settings.formats},
        "inputs": written["inputs"],
        "opset": settings.opset,
        "per_channel": settings.per_channel,
        "fusions": written["fusions"],
        "qbert": None if plan is None else {
            "layer_bits": list(plan.layer_bits), "groups": plan.groups, "embedding_bits": plan.embedding_bits,
            "onnx_weights": "grid integers + scales + DequantizeLinear" if written["grids"] else "grid values as fp32", "converted": written["grids"],
        },
        "parity": parity,
        "main_metric": main_metric,
        "deployment": deployment,
        "measured_on": {
            "host": platform.node(), "cpu": _cpu_name(), "threads": threads, "latency_seq_length": timing_settings.latency_seq_length,
            "torch": torch.__version__, "onnxruntime": _version("onnxruntime"), "onnx": _version("onnx"), "kdrun": __version__,
        },
        "command": command_line(),
        "shipped_format": shipped,
        "card_example": example,
    }
    write_card(directory, cfg, summary, task)
    wide_console().print(deployment_table(deployment, main_metric, f"{task.name}: {source.name} model, exported formats ({threads} threads)"))
    logger.info("export: wrote %s", directory)
    return summary


def _runnable(name: str, model: torch.nn.Module) -> torch.nn.Module:
    """The PyTorch module whose size a format's row reports (deployment.format_rows builds the same)."""
    return export_int8(model) if name == "int8" else Precision(name, "cpu").inference_model(model)


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


def check(cfg: DictConfig) -> None:
    settings = cfg.export
    unknown = [name for name in settings.formats if name not in FORMATS]
    if unknown or not settings.formats:
        raise PipelineError(f"export.formats names unknown format(s) {unknown}; choose among {list(FORMATS)}." if unknown else "export.formats is empty.")
    unknown = [name for name in settings.pytorch_formats if name not in PYTORCH_FORMATS]
    if unknown:
        raise PipelineError(f"export.pytorch_formats names unknown format(s) {unknown}; known: {list(PYTORCH_FORMATS)}.")
    check_data_available(cfg)



# --------------------------------------------------------------------------- import_model


def _link_or_copy(source: str, target: str) -> None:
    """A hard link where the file system allows one (the cache never rewrites a file in place), else a copy."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def run_import(ctx: StageContext) -> dict[str, Any]:
    source = Path(ctx.cfg.export.model).expanduser().resolve()
    target = ctx.out_dir / "model"
    shutil.rmtree(target, ignore_errors=True)
    # Hidden files are no part of a model (and are not in its fingerprint, kdrun/fingerprint.py).
    shutil.copytree(source, target, copy_function=_link_or_copy, ignore=shutil.ignore_patterns(".*", "__pycache__"))
    return {"model_dir": "model", "imported_from": str(source)}


def check_import(cfg: DictConfig) -> None:
    if not cfg.export.model:
        raise PipelineError("Stage import_model brings in a model directory: set export.model=<directory with config.json, weights and tokenizer>.")
    if not Path(cfg.export.model).expanduser().is_dir():
        raise PipelineError(f"export.model={cfg.export.model} is not a directory.")
    load_checked_config(str(Path(cfg.export.model).expanduser()))


