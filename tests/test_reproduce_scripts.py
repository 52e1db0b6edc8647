"""scripts/reproduce_<paper>_<table>.sh: valid bash, the right sweeps, and one run end to end (slow)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


@pytest.mark.parametrize("script", sorted(SCRIPTS.glob("reproduce_*.sh")), ids=lambda p: p.name)
def test_script_is_valid_bash(script: Path) -> None:
    subprocess.run(["bash", "-n", str(script)], check=True)


def test_experiments_for_expands_tasks() -> None:
    out = subprocess.run(
        ["bash", "-c", f'source "{SCRIPTS}/reproduce_common.sh"; experiments_for tinybert mnli,mrpc,cola'],
        check=True, capture_output=True, text=True,
    ).stdout.strip()
    assert out == "tinybert_mnli,tinybert_mrpc,tinybert_cola"


@pytest.mark.slow
def test_qbert_groups_script_end_to_end(tiny_bert_dir, glue_dir, tmp_path) -> None:
    environment = {**os.environ, "KDRUN_CACHE_DIR": str(tmp_path / "cache"), "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run(
        ["bash", str(SCRIPTS / "reproduce_qbert_groups.sh"), "scale=smoke", f"teacher.path={tiny_bert_dir}",
         f"data.glue_dir={glue_dir}", "evaluate.latency_repeats=1"],
        cwd=tmp_path, env=environment, capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    [summary] = list((tmp_path / "outputs" / "multirun" / "reproduce_qbert_groups").glob("*/summary.md"))
    text = summary.read_text()
    for row in ("qbert_g1", "qbert_g12", "qbert_g128", "qbert_grow"):
        assert f"| {row} |" in text
