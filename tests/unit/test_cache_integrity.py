"""A cache is a promise: keys that see the content of the data a stage reads, and entries verified before reuse.

Unit tests on the cache and the fingerprints, then the issue's repros end to end at scale=smoke, in-process: a
teacher trained on relabelled data is not reused for the real data, and a damaged cached teacher, augment
shard or teacher-logits file is reported, moved aside and computed again.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import pytest

from kdrun.fingerprint import HashMemo, path_fingerprint
from kdrun.pipeline import MANIFEST, PlannedStage, Stage, StageCache, plan, run_pipeline

from composing import compose_config


def _planned(key: str = "k1") -> PlannedStage:
    return PlannedStage(Stage(name="demo", run=lambda ctx: {}), inputs=[], key=key, slice={"x": 1})


def _compute(calls: list[int]):
    def compute(out: Path) -> dict:
        calls.append(1)
        (out / "weights.bin").write_bytes(bytes(range(256)) * 4096)  # 1 MiB
        (out / "shards").mkdir()
        for i in range(4):
            (out / "shards" / f"{i}.json").write_text(json.dumps(list(range(i * 10))))
        (out / "shards" / "cache_generator.lock").write_text("")  # what datasets leaves: no content, not listed
        return {"rows": 4}

    return compute


def _zeros_inside(path: Path) -> None:
    """What the issue did to a cached teacher: zeros over 600 KB inside the file, its size unchanged."""
    with path.open("r+b") as handle:
        handle.seek(100_000)
        handle.write(bytes(600_000))


DAMAGES = {
    "zeros written inside, same size": (lambda entry: _zeros_inside(entry / "weights.bin"), "weights.bin is not the file that was published"),
    "truncated": (lambda entry: os.truncate(entry / "weights.bin", 1000), "weights.bin has 1,000 bytes, not the 1,048,576"),
    "one of four shards deleted": (lambda entry: (entry / "shards" / "2.json").unlink(), "shards/2.json is missing"),
    "manifest without a file list": (
        lambda entry: (entry / MANIFEST).write_text(json.dumps({k: v for k, v in json.loads((entry / MANIFEST).read_text()).items() if k != "files"})),
        "lists no files",
    ),
    "manifest cut short": (lambda entry: (entry / MANIFEST).write_text('{"stage": "de'), "is not valid JSON"),
}


@pytest.mark.parametrize("damage", DAMAGES, ids=list(DAMAGES))
def test_a_damaged_entry_is_reported_moved_aside_and_computed_again(damage: str, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cache, calls = StageCache(tmp_path / "cache"), []
    first = cache.get_or_compute(_planned(), _compute(calls))
    manifest = json.loads((first.path / MANIFEST).read_text())
    assert sorted(manifest["files"]) == ["shards/0.json", "shards/1.json", "shards/2.json", "shards/3.json", "weights.bin"]
    assert manifest["files"]["weights.bin"]["size"] == 1 << 20
    (first.path / "shards" / "cache_generator.lock").unlink()  # a library tidying its lock files damages nothing
    assert cache.get_or_compute(_planned(), _compute(calls)).cache == "hit"  # intact: verified and reused

    spoil, reported = DAMAGES[damage]
    spoil(first.path)
    with caplog.at_level(logging.WARNING, logger="kdrun.pipeline"):
        again = cache.get_or_compute(_planned(), _compute(calls))
    assert again.cache == "computed" and len(calls) == 2
    [warning] = [m for m in caplog.messages if "is damaged" in m]
    assert reported in warning and "computing it again" in warning
    [aside] = list((tmp_path / "cache" / "demo").glob("k1.damaged-*"))
    assert aside.is_dir()  # kept for a post-mortem, never used
    assert (again.path / "weights.bin").read_bytes() == bytes(range(256)) * 4096
    assert cache.get_or_compute(_planned(), _compute(calls)).cache == "hit"


def test_size_only_verification_misses_same_size_damage_that_full_catches(tmp_path: Path) -> None:
    """cache.verify=size is the cheap mode for huge entries; auto and full hash."""
    calls: list[int] = []
    entry = StageCache(tmp_path / "cache").get_or_compute(_planned(), _compute(calls)).path
    _zeros_inside(entry / "weights.bin")
    assert StageCache(tmp_path / "cache", verify="size").get_or_compute(_planned(), _compute(calls)).cache == "hit"
    assert StageCache(tmp_path / "cache", verify="full").get_or_compute(_planned(), _compute(calls)).cache == "computed"


# Keys that see the data.


def _relabelled_glue(glue_dir: Path, target: Path, label: str | None) -> Path:
    """A copy of SST-2 (train and dev), with every training label set to ``label`` (None: an exact copy)."""
    (target / "SST-2").mkdir(parents=True)
    lines = (glue_dir / "SST-2" / "train.tsv").read_text().splitlines(keepends=True)
    if label is not None:
        lines = [lines[0]] + [line.rsplit("\t", 1)[0] + f"\t{label}\n" for line in lines[1:]]
    (target / "SST-2" / "train.tsv").write_text("".join(lines))
    shutil.copy(glue_dir / "SST-2" / "dev.tsv", target / "SST-2" / "dev.tsv")
    return target


def _keys(*overrides: str) -> dict[str, str]:
    return {step.stage.name: step.key for step in plan(compose_config(*overrides))}


def test_the_key_follows_the_content_of_the_glue_files_not_their_path(glue_dir: Path, tmp_path: Path) -> None:
    base = ("experiment=teacher_sst2", f"cache.dir={tmp_path / 'cache'}")
    real = _keys(*base, f"data.glue_dir={_relabelled_glue(glue_dir, tmp_path / 'copy', None)}")
    moved = _keys(*base, f"data.glue_dir={_relabelled_glue(glue_dir, tmp_path / 'elsewhere', None)}")
    relabelled = _keys(*base, f"data.glue_dir={_relabelled_glue(glue_dir, tmp_path / 'ones', '1')}")
    assert real == moved  # the same files in another place: the same entries, a cache portable across machines
    assert relabelled["finetune_teacher"] != real["finetune_teacher"]
    assert relabelled["evaluate"] != real["evaluate"]
    train = tmp_path / "copy" / "SST-2" / "train.tsv"
    os.utime(train, (1, 1))  # touched only: rehashed, same content, same key
    assert _keys(*base, f"data.glue_dir={tmp_path / 'copy'}") == real
    with train.open("a") as handle:
        handle.write("an added sentence\t0\n")
    assert _keys(*base, f"data.glue_dir={tmp_path / 'copy'}")["finetune_teacher"] != real["finetune_teacher"]


def test_the_key_follows_the_teacher_files_and_the_corpus(tiny_bert_dir: Path, tmp_path: Path) -> None:
    teacher = tmp_path / "teacher"
    shutil.copytree(tiny_bert_dir, teacher)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("One paragraph.\n\nAnother one.\n")
    base = ("experiment=tinybert_sst2", f"teacher.path={teacher}", f"data.corpus={corpus}", f"cache.dir={tmp_path / 'cache'}")
    before = _keys(*base)
    weights = teacher / "model.safetensors"
    _zeros_inside(weights) if weights.stat().st_size > 700_000 else weights.write_bytes(weights.read_bytes()[::-1])
    after_weights = _keys(*base)
    assert all(after_weights[stage] != before[stage] for stage in ("finetune_teacher", "general_distill", "fit_mlm_head", "task_distill"))
    corpus.write_text("One paragraph, edited.\n\nAnother one.\n")
    after_corpus = _keys(*base)
    assert after_corpus["general_distill"] != after_weights["general_distill"]
    assert after_corpus["finetune_teacher"] == after_weights["finetune_teacher"]  # it reads no corpus


def test_hashes_are_remembered_by_size_and_mtime(tmp_path: Path) -> None:
    data = tmp_path / "data.bin"
    data.write_bytes(b"a" * 1000)
    memo = HashMemo(tmp_path / "cache")
    first = path_fingerprint(str(data), memo)
    memo.save()
    remembered = HashMemo(tmp_path / "cache")
    assert str(data.resolve()) in remembered.known
    remembered.known[str(data.resolve())][2] = "remembered"  # proves the file is not read again
    assert path_fingerprint(str(data), remembered)["sha256"] != first["sha256"]
    data.write_bytes(b"b" * 1000)  # same size, new mtime: hashed again
    fresh = HashMemo(tmp_path / "cache")
    assert path_fingerprint(str(data), fresh)["sha256"] not in (first["sha256"],)
    assert path_fingerprint("some-org/some-model", fresh, "v1") == "some-org/some-model@v1"  # a hub id: name and revision


# The repros, end to end.

SMOKE = ("scale=smoke", "device=cpu", "evaluate.measure_latency=false", "evaluate.formats=[fp32]")


def test_a_teacher_trained_on_other_data_is_not_reused(tiny_bert_dir: Path, glue_dir: Path, tmp_path: Path) -> None:
    ones = _relabelled_glue(glue_dir, tmp_path / "ones", "1")
    cache = f"cache.dir={tmp_path / 'cache'}"
    relabelled = run_pipeline(compose_config("experiment=teacher_sst2", *SMOKE, f"teacher.path={tiny_bert_dir}", f"data.glue_dir={ones}", cache), tmp_path / "a")
    real = run_pipeline(compose_config("experiment=teacher_sst2", *SMOKE, f"teacher.path={tiny_bert_dir}", f"data.glue_dir={glue_dir}", cache), tmp_path / "b")
    assert relabelled["finetune_teacher"].cache == "computed"
    assert real["finetune_teacher"].cache == "computed"  # before: "cache hit", and the relabelled run's score
    assert real["finetune_teacher"].key != relabelled["finetune_teacher"].key


def test_damaged_teacher_and_teacher_logits_are_recomputed(tiny_bert_dir: Path, glue_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from test_tinybert import TINY_STUDENT

    overrides = (
        "experiment=tinybert_sst2", *SMOKE, *TINY_STUDENT, f"teacher.path={tiny_bert_dir}", f"data.glue_dir={glue_dir}",
        "augment=none", "pipeline.stages=[finetune_teacher,teacher_logits,task_distill,evaluate]", "task_distill.intermediate.enabled=false",
        f"cache.dir={tmp_path / 'cache'}",
    )
    first = run_pipeline(compose_config(*overrides), tmp_path / "a")
    logits = first["teacher_logits"].path / first["teacher_logits"].summary["file"]
    _zeros_inside(first["finetune_teacher"].path / "model" / "model.safetensors")
    with caplog.at_level(logging.WARNING):
        second = run_pipeline(compose_config(*overrides), tmp_path / "b")
    assert second["finetune_teacher"].cache == "computed"
    assert any("finetune_teacher: the cached entry" in m and "model/model.safetensors is not the file" in m for m in caplog.messages)
    # Recomputed bit-identically (exact training), so the later stages' keys are unchanged and their entries reused.
    assert [second[name].cache for name in ("teacher_logits", "task_distill")] == ["hit", "hit"]
    assert second["task_distill"].key == first["task_distill"].key

    os.truncate(logits, 100)  # the teacher-logits file, cut short
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        third = run_pipeline(compose_config(*overrides, "cache.force=[task_distill]"), tmp_path / "c")
    assert (third["teacher_logits"].cache, third["task_distill"].cache) == ("computed", "computed")
    assert any("teacher_logits: the cached entry" in m and "logits.safetensors" in m for m in caplog.messages)
    assert len(list(logits.parent.parent.glob("*.damaged-*"))) == 1
    assert third["evaluate"].summary["dev"] == first["evaluate"].summary["dev"]  # the same logits, recomputed
