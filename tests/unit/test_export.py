"""The export stage: ONNX graphs with dynamic axes, parity through ONNX Runtime, failure below the agreement
threshold, the deployment table in results.json, the model card's snippet run as a user runs it, the BiLSTM
and Q-BERT models, standalone export of a model directory, the cache, and the missing-extra error."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import yaml
from transformers import BertConfig, BertForSequenceClassification, DistilBertConfig, DistilBertForSequenceClassification

from kdrun.export.card import extract_snippet
from kdrun.export.graphs import export_onnx
from kdrun.export.runtime import OnnxRuntimeModel, inference_session
from kdrun.models.bilstm import BiLstmConfig, BiLstmForSequenceClassification, training_vocabulary, word_tokenizer
from kdrun.models.loading import load_tokenizer
from kdrun.pipeline import PipelineError, plan, run_pipeline
from kdrun.quant.modules import QuantizationPlan
from kdrun.results import build_results
from kdrun.stages.export import load_deployable

from conftest import MINILM
from composing import compose_config

FAST = ("scale=smoke", "device=cpu", "device.threads=2", "evaluate.latency_warmup=1", "evaluate.latency_repeats=1",
        "evaluate.latency_batch_sizes=[1,32]", "evaluate.latency_seq_length=128")
NO_TIMING = ("evaluate.measure_latency=false", "export.pytorch_formats=[fp32]")
SENTENCES = (["a fine film", "dull"], ["a fine , fine film about the actors", "dull", "x", "the actors are fine and the film is not"])


def _export_entry(outputs) -> Path:
    return outputs["export"].path / "onnx"


@pytest.fixture(scope="module")
def teacher_run(tiny_bert_dir, glue_dir, tmp_path_factory):
    """finetune_teacher -> evaluate -> export on the tiny BERT, every format measured (computed once)."""
    root = tmp_path_factory.mktemp("export-teacher")
    overrides = ("experiment=teacher_sst2", *FAST, f"teacher.path={tiny_bert_dir}", f"data.glue_dir={glue_dir}",
                 f"cache.dir={root / 'cache'}", "pipeline.stages=[finetune_teacher,evaluate,export]", "evaluate.formats=[fp32]")
    cfg = compose_config(*overrides)
    return cfg, overrides, run_pipeline(cfg, root / "run"), root


def _session_logits(path: Path, batch: dict[str, torch.Tensor]) -> np.ndarray:
    return OnnxRuntimeModel(inference_session(path, 1))(**batch).logits.numpy()


def test_graphs_are_checked_and_have_dynamic_batch_and_sequence_axes(teacher_run) -> None:
    cfg, _, outputs, _ = teacher_run
    directory = _export_entry(outputs)
    graph = onnx.load(str(directory / "model.onnx"))
    onnx.checker.check_model(graph, full_check=True)
    shapes = {item.name: [d.dim_param or d.dim_value for d in item.type.tensor_type.shape.dim] for item in graph.graph.input}
    assert shapes == {name: ["batch", "sequence"] for name in ("input_ids", "attention_mask", "token_type_ids")}
    model, _ = load_deployable(Path(outputs["export"].summary["model_dir"]))
    tokenizer = load_tokenizer(str(directory))
    for texts in SENTENCES:  # 2 x 4 tokens and 4 x 11: other batch sizes and lengths than the trace's
        batch = dict(tokenizer(texts, padding=True, return_tensors="pt"))
        with torch.inference_mode():
            expected = model(**batch).logits.numpy()
        np.testing.assert_allclose(_session_logits(directory / "model.onnx", batch), expected, atol=1e-5)
        np.testing.assert_allclose(_session_logits(directory / "model_int8.onnx", batch), expected, atol=0.05)


def test_parity_is_measured_through_onnx_runtime_and_matches_pytorch(teacher_run) -> None:
    cfg, _, outputs, _ = teacher_run
    summary = outputs["export"].summary
    deployment = summary["deployment"]
    assert list(deployment) == ["fp32", "bf16", "int8", "onnx", "onnx_int8"]
    fp32, onnx_row = deployment["fp32"], deployment["onnx"]
    # The fp32 graph gives PyTorch's class on all 64 dev examples, hence exactly its metrics.
    assert summary["parity"]["onnx"] == {"agreement": 1.0, "agreeing": 64, "examples": 64, "min_agreement": 0.99}
    assert onnx_row["dev"] == fp32["dev"] and onnx_row["agreement_with_fp32"] == 1.0
    assert onnx_row["max_abs_diff_vs_fp32"] < 1e-5
    int8 = summary["parity"]["onnx_int8"]
    assert int8["examples"] == 64 and int8["agreement"] == int8["agreeing"] / 64 >= 0.97
    assert deployment["onnx_int8"]["agreement_with_fp32"] == int8["agreement"]
    # The evaluate stage scored the same PyTorch model on the same 64 examples.
    assert fp32["dev"] == outputs["evaluate"].summary["deployment"]["fp32"]["dev"]
    for name in ("fp32", "int8", "onnx", "onnx_int8"):
        row = deployment[name]
        assert row["size_bytes"] > 0 and row["latency_ms_bs1"] > 0 and row["latency_ms_bs32"] > 0
    assert deployment["onnx_int8"]["size_bytes"] < deployment["onnx"]["size_bytes"] / 2
    assert summary["measured_on"]["threads"] == 2 and summary["measured_on"]["latency_seq_length"] == 128


def test_results_json_holds_the_deployment_rows(teacher_run, tmp_path) -> None:
    cfg, overrides, outputs, _ = teacher_run
    record = build_results(cfg, outputs, list(overrides), "test-run")
    assert record["deployment"] == outputs["export"].summary["deployment"]
    assert {"onnx", "onnx_int8"} <= set(record["deployment"])
    assert record["export"]["files"]["onnx_int8"].endswith("onnx/model_int8.onnx")
    assert record["main_score"] == outputs["evaluate"].summary["main_score"]  # the evaluate stage's, as before
    from kdrun.report.tables import build_table

    table = build_table([record], {"latency_format": "onnx_int8", "latency_batch_size": 32})
    assert "latency bs32 (ms, onnx_int8)" in table.extras and "onnx int8 speed-up bs32" in table.extras
    assert table.extras["latency bs32 (ms, onnx_int8)"][record["ablation"]] == record["deployment"]["onnx_int8"]["latency_ms_bs32"]
    assert table.extras["size (MB)"][record["ablation"]] == record["deployment"]["onnx_int8"]["size_bytes"] * 1e-6
    from kdrun.report.tables import write_report

    other = {**record, "ablation": "other", "main_score": 0.5}  # a second row: a Pareto plot needs two points
    written = write_report([record, other], tmp_path, {"latency_format": "onnx_int8", "latency_batch_size": 32})
    assert written["pareto_latency"].is_file()


def test_model_card_snippet_runs_from_the_exported_directory(teacher_run) -> None:
    _, _, outputs, _ = teacher_run
    directory = _export_entry(outputs)
    card = (directory / "README.md").read_text()
    front = yaml.safe_load(card.split("---", 2)[1])
    assert front["language"] == "en" and front["datasets"] == ["nyu-mll/glue"] and front["metrics"] == ["accuracy"]
    assert {"kdrun", "onnx", "int8"} <= set(front["tags"])
    assert front["model-index"][0]["results"][0]["dataset"]["config"] == "sst2"
    assert "teacher_sst2" in card and "## Usage" in card and "kdrun 0.1.0" in card
    snippet = extract_snippet(card)
    assert "model_int8.onnx" in snippet
    # As a user would: a fresh interpreter, in the exported directory, with nothing else.
    result = subprocess.run([sys.executable, "-c", snippet], cwd=directory, capture_output=True, text=True, timeout=120,
                            env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == outputs["export"].summary["card_example"]["prediction"]


def test_rerun_is_a_cache_hit(teacher_run) -> None:
    _, overrides, outputs, root = teacher_run
    # Without the evaluate stage (the export does not read its output): the same key, found in the cache.
    again = run_pipeline(compose_config(*overrides, "pipeline.stages=[finetune_teacher,export]"), root / "again")
    assert again["export"].cache == "hit" and again["export"].path == outputs["export"].path
    assert again["export"].summary == outputs["export"].summary


def test_disagreeing_graph_fails_loudly_and_publishes_nothing(teacher_run, glue_dir, tmp_path, monkeypatch) -> None:
    """A corrupted fp32 graph (its classifier's logits negated) fails the standalone export of the same model."""
    _, _, outputs, _ = teacher_run
    import kdrun.export.graphs as graphs

    original = graphs.export_onnx

    def corrupted(*args, **kwargs):
        names = original(*args, **kwargs)
        path = Path(args[2])
        graph = onnx.load(str(path))
        for tensor in graph.graph.initializer:
            if tensor.name.endswith("classifier.weight") or tensor.name.endswith("classifier.bias"):
                tensor.CopyFrom(onnx.numpy_helper.from_array(-onnx.numpy_helper.to_array(tensor), tensor.name))
        onnx.save(graph, str(path))
        return names

    monkeypatch.setattr(graphs, "export_onnx", corrupted)
    model_dir = Path(outputs["export"].summary["model_dir"])
    overrides = ("experiment=export_model", *FAST, *NO_TIMING, f"data.glue_dir={glue_dir}", f"export.model={model_dir}", f"cache.dir={tmp_path / 'cache'}")
    with pytest.raises(PipelineError) as failure:
        run_pipeline(compose_config(*overrides), tmp_path / "run")
    message = str(failure.value)
    assert "\n" not in message and "export.min_agreement.onnx=0.99" in message and "of 64 dev examples" in message
    assert [p.name for p in (tmp_path / "cache" / "export").iterdir() if not p.name.endswith((".lock", ".partial"))] == []
    assert not any((tmp_path / "cache" / "export").glob("*.partial/*"))
    assert not (tmp_path / "run" / "results.json").exists()

    monkeypatch.setattr(graphs, "export_onnx", original)  # the same standalone export, uncorrupted
    exported = run_pipeline(compose_config(*overrides), tmp_path / "run")
    # The model directory was brought in by the failed run (that stage succeeded); the export is computed now.
    assert exported["import_model"].cache == "hit" and exported["export"].cache == "computed"
    assert exported["export"].summary["parity"]["onnx"]["agreement"] == 1.0
    record = build_results(compose_config(*overrides), exported, list(overrides), "standalone")
    assert record["main_score"] == exported["export"].summary["deployment"]["fp32"]["main_score"]


def test_missing_extra_is_one_line_before_any_compute(tiny_bert_dir, glue_dir, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if not installed
    cfg = compose_config("experiment=teacher_sst2", "scale=smoke", f"teacher.path={tiny_bert_dir}", "pipeline.stages=[finetune_teacher,evaluate,export]")
    with pytest.raises(PipelineError) as failure:
        plan(cfg)
    assert str(failure.value) == "Invalid config: the export stage needs onnxruntime, which does not import here: pip install 'kdrun[export]'"


def _word_model_dir(directory: Path, texts: list[str], pair: bool) -> Path:
    tokenizer = word_tokenizer(training_vocabulary(texts))
    torch.manual_seed(0)
    config = BiLstmConfig(vocab_size=len(tokenizer), embedding_dim=8, lstm_hidden_size=6, classifier_hidden_size=10, pair=pair, num_labels=2)
    BiLstmForSequenceClassification(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.mark.parametrize("task", ["sst2", "mrpc"])
def test_bilstm_student_exports_with_exact_parity(task, glue_dir, tmp_path) -> None:
    from kdrun.data.glue import load_glue_split
    from kdrun.data.tasks import get_task

    spec = get_task(task)
    rows = load_glue_split(spec, "dev", str(glue_dir))
    texts = list(rows["text_a"]) + (list(rows["text_b"]) if spec.is_pair else [])
    model_dir = _word_model_dir(tmp_path / "bilstm", texts[:400], spec.is_pair)
    overrides = ("experiment=export_model", f"task={task}", *FAST, *NO_TIMING, f"data.glue_dir={glue_dir}", f"export.model={model_dir}",
                 f"cache.dir={tmp_path / 'cache'}")
    outputs = run_pipeline(compose_config(*overrides), tmp_path / "run")
    summary = outputs["export"].summary
    assert summary["inputs"] == (["input_ids", "attention_mask", "token_type_ids"] if spec.is_pair else ["input_ids", "attention_mask"])
    assert summary["parity"]["onnx"]["agreement"] == 1.0
    assert summary["deployment"]["onnx"]["max_abs_diff_vs_fp32"] < 1e-5
    assert summary["parity"]["onnx_int8"]["agreement"] >= 0.97
    graph = onnx.load(str(_export_entry(outputs) / "model.onnx"))
    assert [node.op_type for node in graph.graph.node].count("LSTM") == 2  # the two directions, unpacked


@pytest.mark.parametrize("kind", ["bert", "distilbert"])
def test_graphs_match_pytorch_at_any_batch_and_length(kind, tmp_path) -> None:
    tokenizer = load_tokenizer(MINILM)
    torch.manual_seed(0)
    if kind == "bert":
        model = BertForSequenceClassification(BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                                         intermediate_size=32)).eval()
    else:
        model = DistilBertForSequenceClassification(DistilBertConfig(vocab_size=tokenizer.vocab_size, dim=16, n_layers=2, n_heads=2, hidden_dim=32)).eval()
    example = dict(tokenizer(SENTENCES[0], padding=True, return_tensors="pt"))
    names = export_onnx(model, example, tmp_path / "model.onnx", 17)  # traced with eager attention, then switched back
    assert model.config._attn_implementation == "sdpa"
    assert names == (["input_ids", "attention_mask", "token_type_ids"] if kind == "bert" else ["input_ids", "attention_mask"])
    for texts in ([SENTENCES[1][0]], SENTENCES[1], SENTENCES[1] * 9):  # batches of 1, 4 and 36
        batch = dict(tokenizer(texts, padding=True, return_tensors="pt"))
        with torch.inference_mode():
            expected = model(**batch).logits.numpy()
        np.testing.assert_allclose(_session_logits(tmp_path / "model.onnx", batch), expected, atol=1e-5)


def test_qbert_model_exports_its_grid_weights(tiny_bert_dir, glue_dir, tmp_path) -> None:
    """A Q-BERT directory (latent weights + quantization.json): the graph computes with the grid values."""
    model = BertForSequenceClassification.from_pretrained(tiny_bert_dir, num_labels=2)
    model.save_pretrained(tmp_path / "qbert")
    load_tokenizer(str(tiny_bert_dir)).save_pretrained(tmp_path / "qbert")
    QuantizationPlan(layer_bits=(4, 3), groups=4).save(tmp_path / "qbert")
    overrides = ("experiment=export_model", *FAST, *NO_TIMING, f"data.glue_dir={glue_dir}", f"export.model={tmp_path / 'qbert'}",
                 f"cache.dir={tmp_path / 'cache'}")
    outputs = run_pipeline(compose_config(*overrides), tmp_path / "run")
    summary = outputs["export"].summary
    assert summary["qbert"]["layer_bits"] == [4, 3] and summary["parity"]["onnx"]["agreement"] == 1.0
    # Every quantized matrix (6 a layer) and embedding table (words, positions, token types) carried as its grid.
    assert summary["qbert"]["converted"] == {"matrices": 12, "embeddings": 3, "not_found": 0}
    graph = onnx.load(str(_export_entry(outputs) / "model.onnx"))
    onnx.checker.check_model(graph, full_check=True)
    integers = {item.name: onnx.numpy_helper.to_array(item) for item in graph.graph.initializer if item.name.endswith("_grid")}
    assert len(integers) == 15 and all(array.dtype == np.int8 for array in integers.values())
    assert [node.op_type for node in graph.graph.node].count("DequantizeLinear") == 15
    assert sorted(int(abs(array).max()) for array in integers.values()) == [3] * 6 + [7] * 6 + [127] * 3  # 3-, 4- and 8-bit grids
    assert summary["deployment"]["onnx"]["size_bytes"] < summary["deployment"]["fp32"]["size_bytes"] / 2
    grid_model, _ = load_deployable(tmp_path / "qbert")
    query = grid_model.bert.encoder.layer[1].attention.self.query.weight.detach()
    assert all(len(torch.unique(query[rows])) <= 7 for rows in (slice(0, 8), slice(8, 16)))  # 3 bits: 7 levels a group
    tokenizer = load_tokenizer(str(tmp_path / "qbert"))
    batch = dict(tokenizer(SENTENCES[1], padding=True, return_tensors="pt"))
    with torch.inference_mode():
        expected = grid_model(**batch).logits.numpy()
    np.testing.assert_allclose(_session_logits(_export_entry(outputs) / "model.onnx", batch), expected, atol=1e-5)
    assert "Q-BERT" in (_export_entry(outputs) / "README.md").read_text()
