"""The kill/resume matrix: each stage interrupted at each hard point, re-run, and compared with an uninterrupted run.

For every row the stage runs as a user runs it (``kdrun ...`` in a subprocess) with ``KDRUN_FAULT`` sending
the process SIGKILL (``kill -9``) or SIGINT (Ctrl-C) at one point of one step, then the same command again.
The row passes when every file of the published entries (the stage's and those after it) has the SHA-256 of
the uninterrupted run's, and its training history (losses, evaluations, kept best model) is the same.

The recipe is TinyBERT on SST-2 with the embedded MiniLM teacher, cut to a couple of minutes: 2,000 training
rows, so that every loop crosses an epoch boundary. Each row starts from a copy of the reference cache
without the interrupted stage and the ones after it, so only they are recomputed.

    python scripts/resume_matrix.py --out docs/measurements/resume_matrix.json
    python -m kdrun.report.docs          # renders it into docs/results.md

Prints the JSON on stdout as well. Needs GLUE_DIR and KDRUN_CORPUS.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

STAGES = ("finetune_teacher", "general_distill", "task_distill")
RECIPE = (
    "experiment=tinybert_sst2",
    "scale=cpu",
    "augment=none",
    "pipeline.stages=[finetune_teacher,general_distill,teacher_logits,task_distill]",
    "data.max_train_examples=2000",
    "data.max_eval_examples=300",
    "device.threads=1",
    # The teacher: 63 steps an epoch, 80 in all; evaluations every 20 steps and at the epoch end (63).
    "finetune_teacher.train.max_steps=80",
    "finetune_teacher.train.eval_every_steps=20",
    "finetune_teacher.train.checkpoint_every_steps=10",
    # General distillation: 240 sequences of 8, 30 steps an epoch, 2 epochs.
    "general_distill.max_sequences=240",
    "general_distill.train.batch_size=8",
    "general_distill.train.epochs=2",
    "general_distill.train.max_steps=null",
    "general_distill.train.checkpoint_every_steps=10",
    # Task distillation: 63 steps an epoch in each step; step 2 evaluates every 20.
    "task_distill.intermediate.train.epochs=2",
    "task_distill.intermediate.train.max_steps=80",
    "task_distill.intermediate.train.checkpoint_every_steps=10",
    "task_distill.prediction.train.epochs=2",
    "task_distill.prediction.train.max_steps=80",
    "task_distill.prediction.train.eval_every_steps=20",
    "task_distill.prediction.train.checkpoint_every_steps=10",
)
# (stage, KDRUN_FAULT, what the row shows)
ROWS = (
    ("finetune_teacher", "kill@step:70:finetune_teacher", "kill -9 after step 70, in epoch 2 (steps 64-80)"),
    ("finetune_teacher", "kill@step:45:finetune_teacher", "kill -9 in epoch 1; the re-run crosses into epoch 2"),
    ("finetune_teacher", "kill@eval:60:finetune_teacher", "kill -9 inside an evaluation"),
    ("finetune_teacher", "kill@checkpoint:50:finetune_teacher", "kill -9 inside a checkpoint write"),
    # Step 20's model is a constant predictor (never kept as best): step 40 is the first best-model save.
    ("finetune_teacher", "kill@save_best:40:finetune_teacher", "kill -9 inside a best-model save"),
    ("finetune_teacher", "interrupt@forward:44:finetune_teacher", "Ctrl-C in the middle of a step"),
    ("finetune_teacher", "interrupt@eval:63:finetune_teacher", "Ctrl-C during the evaluation ending epoch 1"),
    ("general_distill", "kill@step:40:general_distill", "kill -9 at step 10 of epoch 2 (30-step epochs)"),
    ("general_distill", "interrupt@forward:35:general_distill", "Ctrl-C in the middle of a step of epoch 2"),
    ("task_distill", "kill@step:70:task_distill step 1", "kill -9 in epoch 2 of step 1"),
    ("task_distill", "kill@step:70:task_distill step 2", "kill -9 in epoch 2 of step 2 (step 1 done)"),
    ("task_distill", "interrupt@eval:40:task_distill step 2", "Ctrl-C during an evaluation of step 2"),
)


def _kdrun(cache: Path, workdir: Path, fault: str | None = None) -> tuple[int, float]:
    env = {**os.environ, "KDRUN_CACHE_DIR": str(cache), "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    env.pop("KDRUN_FAULT", None)
    if fault:
        env["KDRUN_FAULT"] = fault
    started = time.time()
    result = subprocess.run([sys.executable, "-m", "kdrun.cli", *RECIPE], cwd=workdir, env=env, capture_output=True, text=True)
    if fault is None and result.returncode != 0:
        raise RuntimeError(f"kdrun failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return result.returncode, time.time() - started


def _entries(cache: Path) -> dict[str, dict]:
    """stage -> its published manifest (one entry per stage in these caches)."""
    entries = {}
    for stage in STAGES:
        published = [p for p in (cache / stage).iterdir() if p.is_dir() and "." not in p.name] if (cache / stage).is_dir() else []
        if len(published) == 1:
            entries[stage] = json.loads((published[0] / "stage.json").read_text())
    return entries


def _history(summary: dict) -> list:
    return [summary.get(part, summary).get("history") for part in ("intermediate", "prediction")] if "prediction" in summary else [summary.get("history")]


# A finished loop's outcome.json records its wall-clock time and where it resumed from: the one file that differs.
TIMING_RECORDS = ("outcome.json",)


def _only_timing_or_locks(differing: list[str]) -> bool:
    """Lock files hold no content (datasets names its own after the directory it ran in; kdrun >= this script
    leaves them out of stage.json)."""
    return all(Path(name).name in TIMING_RECORDS or name.endswith(".lock") for name in differing)


def _resumed_from(summary: dict, fault: str) -> int | None:
    """The step the interrupted loop resumed from: task distillation has one loop per step."""
    part = "intermediate" if fault.endswith("step 1") else "prediction" if fault.endswith("step 2") else None
    return (summary.get(part) or {}).get("resumed_from_step") if part else summary.get("resumed_from_step")


def _compare(stage: str, fault: str, run: dict[str, dict], reference: dict[str, dict]) -> dict:
    later = STAGES[STAGES.index(stage):]
    differing = sorted(
        f"{s}/{name}" for s in later for name in set(run[s]["files"]) | set(reference[s]["files"])
        if run[s]["files"].get(name) != reference[s]["files"].get(name)
    )
    weights = {s: sorted(n for n in reference[s]["files"] if n.endswith(".safetensors")) for s in later}
    return {
        "keys_equal": all(run[s]["key"] == reference[s]["key"] for s in later),
        "weight_files": sum(len(v) for v in weights.values()),
        "weights_identical": all(run[s]["files"][n] == reference[s]["files"][n] for s in later for n in weights[s]),
        "differing_files": differing,
        "other_files_identical": _only_timing_or_locks(differing),
        "history_identical": _history(run[stage]["summary"]) == _history(reference[stage]["summary"]),
        "best_dev_identical": run[stage]["summary"].get("best_dev") == reference[stage]["summary"].get("best_dev"),
        "resumed_from_step": _resumed_from(run[stage]["summary"], fault),
    }


def measure(root: Path, selected: list[int] | None = None) -> dict:
    """The reference run, then every row of ROWS (or the ``selected`` indexes)."""
    reference_cache = root / "reference"
    (root / "work").mkdir(parents=True, exist_ok=True)
    _, seconds = _kdrun(reference_cache, root / "work")
    reference = _entries(reference_cache)
    rows = []
    for index, (stage, fault, meaning) in enumerate(ROWS):
        if selected is not None and index not in selected:
            continue
        cache = root / f"case-{index}"
        shutil.copytree(reference_cache, cache, ignore=shutil.ignore_patterns(*STAGES[STAGES.index(stage):], "teacher_logits"))
        code, interrupted_seconds = _kdrun(cache, root / "work", fault)
        if code == 0:
            raise RuntimeError(f"KDRUN_FAULT={fault} never fired (the run finished): pick a step where that point is reached.")
        _, rerun_seconds = _kdrun(cache, root / "work")
        row = {"index": index, "stage": stage, "fault": fault, "meaning": meaning, "interrupted_exit_code": code,
               **_compare(stage, fault, _entries(cache), reference)}
        row["seconds"] = round(interrupted_seconds + rerun_seconds, 1)
        rows.append(row)
        print(json.dumps(row), file=sys.stderr)
        shutil.rmtree(cache)
    return {"recipe": list(RECIPE), "reference_seconds": round(seconds, 1), "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="write the measurements here (JSON)")
    parser.add_argument("--workdir", type=Path, help="scratch directory (default: a temporary one)")
    parser.add_argument("--rows", help="measure only these rows (indexes into ROWS, e.g. 4,7,8) and replace them in --out")
    args = parser.parse_args()
    selected = [int(index) for index in args.rows.split(",")] if args.rows else None
    with tempfile.TemporaryDirectory() as scratch:
        measured = measure(args.workdir or Path(scratch), selected)
    if selected is not None and args.out and args.out.is_file():
        kept = [row for row in json.loads(args.out.read_text())["rows"] if row.get("index") not in selected]
        measured["rows"] = sorted(kept + measured["rows"], key=lambda row: row["index"])
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(measured, indent=2) + "\n")
    print(json.dumps(measured, indent=2))


if __name__ == "__main__":
    main()
