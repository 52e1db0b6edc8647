"""Benchmark: wall time of one 4-job sweep run serially vs in parallel (joblib launcher).

The same multirun (default: four seeds of the BiLSTM on a seeded sample of SST-2,
`experiment=bilstm_nokd_sst2`) runs twice, each time into its own fresh cache so
that neither reuses the other's work:

- serial:   Hydra's basic launcher, one job after the other, each with all cores
            (``device.threads`` = the core count);
- parallel: ``hydra/launcher=joblib hydra.launcher.n_jobs=N``, each job on
            ``device.threads`` = cores / N.

Prints JSON: wall seconds of each, the speed-up, and each job's dev score (the same
seeds give the same scores whichever launcher ran them, up to thread-count rounding).

    python scripts/bench_sweep.py [--jobs 4] [--parallel 2] [--max-train-examples 8000] [-- extra overrides]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def run_sweep(overrides: list[str], workdir: Path) -> tuple[float, list[float]]:
    """Wall seconds of ``kdrun -m overrides`` in a fresh cache, and the jobs' main dev scores in job order."""
    sweep_dir = workdir / "sweep"
    env = {**os.environ, "KDRUN_CACHE_DIR": str(workdir / "cache")}
    command = [sys.executable, "-m", "kdrun.cli", "-m", *overrides, f"hydra.sweep.dir={sweep_dir}"]
    start = time.perf_counter()
    subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL)
    seconds = time.perf_counter() - start
    scores = []
    for job in sorted((p for p in sweep_dir.iterdir() if p.name.isdigit()), key=lambda p: int(p.name)):
        scores.append(json.loads((job / "results.json").read_text())["main_score"])
    return seconds, scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=4)
    parser.add_argument("--parallel", type=int, default=2, help="joblib n_jobs")
    parser.add_argument("--experiment", default="bilstm_nokd_sst2")
    parser.add_argument("--max-train-examples", type=int, default=8000)
    parser.add_argument("extra", nargs="*", help="further overrides for both sweeps")
    args = parser.parse_args()

    cores = os.cpu_count() or 1
    seeds = ",".join(str(seed) for seed in range(1, args.jobs + 1))
    common = [
        f"experiment={args.experiment}",
        "scale=cpu",
        f"data.max_train_examples={args.max_train_examples}",
        f"task_distill.prediction.train.seed={seeds}",
        "evaluate.measure_latency=false",
        *args.extra,
    ]
    runs = {
        "serial": [*common, f"device.threads={cores}"],
        "parallel": [
            *common,
            "hydra/launcher=joblib",
            f"hydra.launcher.n_jobs={args.parallel}",
            f"device.threads={max(cores // args.parallel, 1)}",
        ],
    }
    report: dict[str, object] = {"cores": cores, "jobs": args.jobs, "parallel_jobs": args.parallel, "overrides": common}
    with tempfile.TemporaryDirectory() as tmp:
        for name, overrides in runs.items():
            seconds, scores = run_sweep(overrides, Path(tmp) / name)
            report[f"{name}_seconds"] = round(seconds, 1)
            report[f"{name}_scores"] = scores
    report["speedup"] = round(report["serial_seconds"] / report["parallel_seconds"], 2)  # type: ignore[operator]
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
