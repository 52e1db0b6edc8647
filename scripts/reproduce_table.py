"""Reproduce one paper table at ``scale=cpu`` over seeds, and record it in ``docs/``.

    python scripts/reproduce_table.py qbert1_sst2 [--seeds 1,2,3] [--parallel 2] [--dry-run] [-- extra overrides]
    python scripts/reproduce_table.py qbert1_sst2 --sweep-dir outputs/multirun/qbert1/<id>   # record a finished sweep
    python scripts/reproduce_table.py --list

It runs the table's sweep, ``kdrun +table=<table> scale=cpu seed=<seeds> <the table's cpu budget>``, then
stores its table in ``docs/measurements/tables/<name>_seeds/`` (``python -m kdrun.report.docs --add-table``:
summary.md/.csv, and a note with the command, the wall time this script measured, the machine and what the
table shows) and renders docs/results.md again. A sweep with a failed job is not recorded: the script exits 1,
and running it again resumes the sweep (finished jobs are cache hits).

``seed`` is the seed of each row's own training (task distillation, Q-BERT's fine-tuning, the students'
training); the teacher, the augmented data and the general-distillation students keep theirs, so a table's
seeds share those cache entries. ``--parallel N`` runs N jobs at a time (Hydra's joblib launcher), each on
cores / N threads: on 2 cores, 2 jobs of one thread finish a sweep of small models sooner than one job of two.
Jobs side by side would time each other, so a parallel sweep measures no latency (its tables have none).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from kdrun.report.docs import add_table
from kdrun.report.docs import main as render_docs

ROOT = Path(__file__).resolve().parent.parent
MEASUREMENTS = ROOT / "docs" / "measurements"
RESULTS_PAGE = ROOT / "docs" / "results.md"

# A third of TinyBERT's cpu task-distillation budget: one row's task distillation takes about 12 minutes
# instead of 37, so a table of 6 rows x 3 seeds fits the 5 hours a table may take on 2 cores. Measured at one
# seed (docs/results.md: tinybert_sst2_cpu_short_none 82.45, tinybert_sst2_cpu_short_no_trm 79.59).
TINYBERT_TABLE_BUDGET = ("task_distill.intermediate.train.max_steps=3000", "task_distill.prediction.train.max_steps=2000")


@dataclass(frozen=True)
class TableRun:
    """One paper table at scale=cpu: its sweep config (``conf/table/<table>.yaml``), the overrides that pick its
    column and cpu budget, and what the rendered table shows (the first lines of its note)."""

    table: str
    overrides: tuple[str, ...] = ()
    about: str = ""


TABLES: dict[str, TableRun] = {
    "qbert1_sst2": TableRun(
        "qbert1", ("task=sst2",),
        "Q-BERT Table 1 on SST-2: the fine-tuned MiniLM teacher unquantized, Q-BERT's group-wise quantization at "
        "8/4/3/2-bit weights with quantization-aware fine-tuning, DirectQ (the same bits, no fine-tuning) and "
        "Hessian-guided mixed precision; seed = the seed of the quantization-aware fine-tuning."),
    "qbert_groups_sst2": TableRun(
        "qbert_groups", ("task=sst2",),
        "Q-BERT's group-wise ablation on SST-2 (4-bit weights; 1, 12 and 128 groups, one range per row)."),
    "tang1_sst2": TableRun(
        "tang1", ("task=sst2",),
        "Tang et al. Table 1 on SST-2: the teacher, the BiLSTM distilled on the augmented set, the BiLSTM on labels."),
    "tinybert3_sst2": TableRun(
        "tinybert3", ("task=sst2", *TINYBERT_TABLE_BUDGET),
        "TinyBERT Table 3 on SST-2: a term removed from both distillation stages per row, so each such row has "
        "its own general student; at a third of the cpu task-distillation budget."),
    "tinybert2_sst2": TableRun(
        "tinybert2", ("task=sst2", *TINYBERT_TABLE_BUDGET),
        "TinyBERT Table 2 on SST-2: without general distillation, task distillation or augmentation; at a third "
        "of the cpu task-distillation budget."),
    "tinybert3_mrpc": TableRun(
        "tinybert3", ("task=mrpc", *TINYBERT_TABLE_BUDGET),
        "TinyBERT Table 3 on MRPC (the MiniLM teacher is a sentence-embedding model, weak on pairs)."),
    "distilbert4_sst2": TableRun(
        "distilbert4", ("task=sst2",),
        "DistilBERT Table 4 on SST-2: each row removes one term of the triple loss from general distillation "
        "(or starts from random weights), then fine-tunes on the labels; cells are differences to the full recipe."),
}


def sweep_argv(spec: TableRun, seeds: str, parallel: int, extra: list[str], sweep_dir: Path) -> list[str]:
    """The kdrun command line of the table's sweep (kdrun.report.docs.sweep_command reads one back from a sweep)."""
    threads = max(1, (os.cpu_count() or 1) // parallel)
    # Jobs side by side time each other: their latencies would be no measurement, so they are not taken.
    launcher = ["hydra/launcher=joblib", f"hydra.launcher.n_jobs={parallel}", "evaluate.measure_latency=false"] if parallel > 1 else []
    return ["kdrun", f"+table={spec.table}", "scale=cpu", f"seed={seeds}", *spec.overrides, *launcher,
            f"device.threads={threads}", f"hydra.sweep.dir={sweep_dir}", *extra]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("name", nargs="?", choices=sorted(TABLES), help="the table and its column")
    parser.add_argument("--seeds", default="1,2,3", help="comma-separated seeds of each row (default 1,2,3)")
    parser.add_argument("--parallel", type=int, default=1, help="jobs at a time (default 1, on all cores)")
    parser.add_argument("--sweep-dir", type=Path, help="record this finished sweep instead of running one")
    parser.add_argument("--note", default="", help="what the results show, appended to the table's note")
    parser.add_argument("--dry-run", action="store_true", help="print the sweep command and stop")
    parser.add_argument("--list", action="store_true", help="list the tables and their sweeps")
    parser.add_argument("extra", nargs="*", help="more kdrun overrides (after --)")
    args = parser.parse_args(argv)
    if args.list or not args.name:
        for name, spec in TABLES.items():
            print(f"{name}: kdrun +table={spec.table} scale=cpu seed=1,2,3 {' '.join(spec.overrides)}")
        return 0
    if args.parallel < 1:
        parser.error("--parallel must be at least 1")
    spec = TABLES[args.name]
    record = f"{args.name}_seeds"
    sweep_dir = args.sweep_dir or (ROOT / "outputs" / "multirun" / record / time.strftime("%Y-%m-%d_%H-%M-%S"))
    wall_seconds = None  # recorded sweeps: read from the sweep directory
    if args.sweep_dir is None:
        command = sweep_argv(spec, args.seeds, args.parallel, args.extra, sweep_dir)
        print(" ".join(command), flush=True)
        if args.dry_run:
            return 0
        start = time.monotonic()
        code = subprocess.call(command, cwd=ROOT)
        wall_seconds = time.monotonic() - start
        if code != 0:
            print(f"The sweep exited with {code}: nothing recorded. Run this script again to resume it.", file=sys.stderr)
            return code
    note = " ".join(part for part in (spec.about, args.note) if part)
    target = add_table(MEASUREMENTS, sweep_dir, record, note, wall_seconds)
    render_docs(["--measurements", str(MEASUREMENTS), "--out", str(RESULTS_PAGE)])
    print(f"Recorded {target}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
