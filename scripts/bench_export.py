"""Benchmark: PyTorch fp32 against ONNX Runtime fp32 and int8 graphs of one model, side by side.

Exports ``--model`` (a fine-tuned classifier directory, e.g. a finetune_teacher cache entry's ``model/``)
the way the export stage does, in every variant the stage can be configured to (the transformer
optimizer on or off, int8 weight scales per channel or per matrix), scores each on the task's dev set
through kdrun's own scoring code, and times each at every ``--batch-sizes`` on real dev sentences padded
to ``--seq-length``, with kdrun's own latency code (``kdrun.deployment.measure_latency``). Timing goes in
rounds, every variant once a round, and reports the median over rounds, so that noise on a shared machine
hits all variants alike. Prints JSON, including the speed-up of each variant over PyTorch fp32 and its
dev-score difference.

    python scripts/bench_export.py --model DIR [--task sst2] [--threads 2] [--rounds 5] [--batch-sizes 1 32]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer

from kdrun.data.batching import tokenize_examples
from kdrun.data.glue import load_glue_split
from kdrun.data.tasks import get_task
from kdrun.deployment import LatencySettings, agreement, latency_inputs, measure_latency
from kdrun.export.graphs import export_onnx, optimize_bert, quantize_int8
from kdrun.export.grids import carry_grids
from kdrun.export.runtime import OnnxRuntimeModel, inference_session
from kdrun.precision import Precision
from kdrun.predict import main_metric_key, score_dev_sets
from kdrun.quant.int8 import export_int8
from kdrun.stages.export import graph_size_bytes, load_deployable, load_latent, pytorch_size_bytes
from kdrun.stages.context import collator


def build_variants(model: torch.nn.Module, example: dict[str, torch.Tensor], directory: Path, opset: int, grids: tuple | None) -> dict[str, Path]:
    """Every graph the export stage can write, by name (``onnx_grids``: a Q-BERT model's grids as QDQ weights)."""
    plain = directory / "plain.onnx"
    export_onnx(model, example, plain, opset)
    graphs = {"onnx": plain}
    if grids is not None:
        graphs["onnx_grids"] = directory / "grids.onnx"
        shutil.copyfile(plain, graphs["onnx_grids"])
        carry_grids(graphs["onnx_grids"], *grids)
    optimized = directory / "optimized.onnx"
    fusions = optimize_bert(plain, optimized, model.config)
    if fusions is not None:
        graphs["onnx_optimized"] = optimized
    for source_name, source in [(name, path) for name, path in graphs.items() if name != "onnx_grids"]:
        for per_channel in (False, True):
            name = f"{source_name.replace('onnx', 'onnx_int8')}{'_per_channel' if per_channel else ''}"
            graphs[name] = directory / f"{name}.onnx"
            quantize_int8(source, graphs[name], per_channel)
    return graphs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--task", default="sst2")
    parser.add_argument("--glue-dir", default=None, help="GLUE directory (default: $GLUE_DIR)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--seq-length", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=5, help="timed forwards per variant and round (median taken)")
    parser.add_argument("--opset", type=int, default=17)
    parser.add_argument("--dev-examples", type=int, default=None, help="score on the first N dev examples (default: all)")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    task = get_task(args.task)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model, plan = load_deployable(args.model)
    dev = load_glue_split(task, task.eval_splits[0], args.glue_dir or os.environ.get("GLUE_DIR"))
    if args.dev_examples:
        dev = dev.select(range(args.dev_examples))
    dev_sets = {task.eval_splits[0]: tokenize_examples(dev, tokenizer, args.seq_length)}
    texts = (list(dev["text_a"]), list(dev["text_b"]) if task.is_pair else None)
    inputs = {bs: latency_inputs(tokenizer, *texts, bs, args.seq_length) for bs in args.batch_sizes}
    example = dict(tokenizer(texts[0][:2], texts[1][:2] if texts[1] else None, padding=True, return_tensors="pt"))
    collate = collator(tokenizer, task)

    with tempfile.TemporaryDirectory() as scratch:
        started = time.perf_counter()
        graphs = build_variants(model, example, Path(scratch), args.opset, (load_latent(args.model, plan), plan) if plan else None)
        export_seconds = time.perf_counter() - started
        runners = {"pytorch_fp32": model, "pytorch_int8": export_int8(model)}
        runners.update({name: OnnxRuntimeModel(inference_session(path, args.threads)) for name, path in graphs.items()})
        sizes = {name: pytorch_size_bytes(name.removeprefix("pytorch_"), runner, args.model) for name, runner in runners.items() if name.startswith("pytorch")}
        sizes.update({name: graph_size_bytes(path) for name, path in graphs.items()})

        main_metric = main_metric_key(task)
        evaluations = {name: score_dev_sets(runner, task, dev_sets, collate, 128) for name, runner in runners.items()}
        one_round = LatencySettings(tuple(args.batch_sizes), warmup=2, repeats=args.repeats)
        fp32 = Precision("fp32", "cpu")
        rounds: dict[str, list[dict[str, float]]] = {name: [] for name in runners}
        for _ in range(args.rounds):
            for name, runner in runners.items():
                rounds[name].append(measure_latency(runner, inputs, one_round, fp32))

    reference = evaluations["pytorch_fp32"]
    results = {}
    for name, evaluation in evaluations.items():
        row = {"dev": evaluation.metrics, "size_mb": round(sizes[name] / 1e6, 2)}
        if name != "pytorch_fp32":
            row.update(agreement(task, evaluation, reference))
            row["dev_points_vs_pytorch_fp32"] = round(100 * (evaluation.metrics[main_metric] - reference.metrics[main_metric]), 2)
        for bs in args.batch_sizes:
            key = f"latency_ms_bs{bs}"
            row[key] = round(statistics.median(r[key] for r in rounds[name]), 2)
        results[name] = row
    for row in results.values():
        for bs in args.batch_sizes:
            row[f"speedup_vs_pytorch_fp32_bs{bs}"] = round(results["pytorch_fp32"][f"latency_ms_bs{bs}"] / row[f"latency_ms_bs{bs}"], 2)
    print(json.dumps({
        "model": str(args.model), "task": task.name, "quantized_model": plan is not None, "threads": args.threads,
        "seq_length": args.seq_length, "rounds": args.rounds, "repeats_per_round": args.repeats, "dev_examples": len(dev),
        "main_metric": main_metric, "export_seconds": round(export_seconds, 1),
        "torch": torch.__version__, "onnxruntime": __import__("onnxruntime").__version__,
        "results": results,
    }, indent=2))


if __name__ == "__main__":
    main()
