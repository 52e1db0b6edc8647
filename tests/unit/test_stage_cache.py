"""The stage cache: miss, hit, force, resume of a partial output, and the lock between processes."""

from __future__ import annotations

import json
import multiprocessing
import time
from pathlib import Path

import pytest

from kdrun.pipeline import MANIFEST, PlannedStage, Stage, StageCache, stage_key


def _planned(name: str = "demo", key: str = "k1") -> PlannedStage:
    return PlannedStage(Stage(name=name, run=lambda ctx: {}), inputs=[], key=key, slice={"x": 1})


def _compute_counting(counter: Path, seconds: float = 0.0):
    def compute(out: Path) -> dict:
        time.sleep(seconds)
        with counter.open("a") as f:
            f.write("x")
        (out / "payload.txt").write_text("done")
        return {"value": 42}

    return compute


def test_miss_then_hit(tmp_path: Path) -> None:
    cache = StageCache(tmp_path / "cache")
    counter = tmp_path / "count"
    first = cache.get_or_compute(_planned(), _compute_counting(counter))
    second = cache.get_or_compute(_planned(), _compute_counting(counter))
    assert (first.cache, second.cache) == ("computed", "hit")
    assert counter.read_text() == "x"
    assert first.path == second.path == tmp_path / "cache" / "demo" / "k1"
    assert (first.path / "payload.txt").read_text() == "done"
    manifest = json.loads((first.path / MANIFEST).read_text())
    assert manifest["summary"] == {"value": 42} == second.summary
    assert manifest["config"] == {"x": 1}
    assert not (tmp_path / "cache" / "demo" / "k1.partial").exists()


def test_other_key_is_a_miss(tmp_path: Path) -> None:
    cache = StageCache(tmp_path / "cache")
    counter = tmp_path / "count"
    cache.get_or_compute(_planned(key="a"), _compute_counting(counter))
    assert cache.get_or_compute(_planned(key="b"), _compute_counting(counter)).cache == "computed"
    assert counter.read_text() == "xx"


def test_force_recomputes_and_replaces(tmp_path: Path) -> None:
    cache = StageCache(tmp_path / "cache")
    counter = tmp_path / "count"
    cache.get_or_compute(_planned(), _compute_counting(counter))
    forced = cache.get_or_compute(_planned(), _compute_counting(counter), force=True)
    assert forced.cache == "computed"
    assert counter.read_text() == "xx"
    leftovers = sorted(p.name for p in (tmp_path / "cache" / "demo").iterdir() if not p.name.endswith(".lock"))
    assert leftovers == ["k1"]


def test_failed_compute_publishes_nothing_and_next_run_resumes(tmp_path: Path) -> None:
    cache = StageCache(tmp_path / "cache")

    def crash(out: Path) -> dict:
        (out / "checkpoint").mkdir()
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        cache.get_or_compute(_planned(), crash)
    assert cache.lookup("demo", "k1") is None
    seen: list[bool] = []

    def resume(out: Path) -> dict:
        seen.append((out / "checkpoint").is_dir())
        return {}

    assert cache.get_or_compute(_planned(), resume).cache == "resumed"
    assert seen == [True]


def _worker(root: str, counter: str, results: str) -> None:
    output = StageCache(Path(root)).get_or_compute(_planned(), _compute_counting(Path(counter), seconds=1.5))
    with open(results, "a") as f:
        f.write(output.cache + "\n")


def test_two_processes_compute_once(tmp_path: Path) -> None:
    counter, results = tmp_path / "count", tmp_path / "results"
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=_worker, args=(str(tmp_path / "cache"), str(counter), str(results))) for _ in range(2)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=60)
    assert [w.exitcode for w in workers] == [0, 0]
    assert counter.read_text() == "x"
    assert sorted(results.read_text().split()) == ["computed", "hit"]


def test_key_depends_on_config_inputs_and_version() -> None:
    base = stage_key("s", "1", {"a": 1}, {"up": "k"})
    assert base == stage_key("s", "1", {"a": 1}, {"up": "k"})
    assert base != stage_key("s", "1", {"a": 2}, {"up": "k"})
    assert base != stage_key("s", "1", {"a": 1}, {"up": "other"})
    assert base != stage_key("s", "2", {"a": 1}, {"up": "k"})


