"""Q-BERT: grids, groups, straight-through gradients, Hessian eigenvalues, bit allocation, size, int8, end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification, DistilBertConfig, DistilBertForSequenceClassification

from kdrun.quant.allocation import mixed_precision_bits, uniform_bits
from kdrun.quant.grid import fake_quantize, group_scales, group_slices, max_level, quantize_dequantize
from kdrun.quant.hessian import PowerIterationSettings, layer_sensitivities, top_eigenvalue
from kdrun.quant.int8 import export_int8
from kdrun.quant.modules import (
    QuantizationPlan,
    QuantizedEmbedding,
    QuantizedLinear,
    enable_fake_quantization,
    encoder_layers,
    layer_linears,
    materialize,
)
from kdrun.quant.size import packed_size


def tiny_classifier(
    hidden: int = 4, layers: int = 1, heads: int = 2, intermediate: int = 8, seed: int = 0, initializer_range: float = 0.02
) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    config = BertConfig(
        initializer_range=initializer_range,
        vocab_size=10, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        intermediate_size=intermediate, max_position_embeddings=6, type_vocab_size=2, num_labels=2,
        attn_implementation="eager",
    )
    return BertForSequenceClassification(config).eval()


# --- the grid -------------------------------------------------------------------------


def test_grid_levels_and_exact_values() -> None:
    assert [max_level(b) for b in (2, 3, 4, 8)] == [1, 3, 7, 127]
    x = torch.tensor([0.3, -0.6, 0.05, 0.9, -0.9, 0.44])
    # 3 bits: scale 0.9 / 3 = 0.3; x / s = 1, -2, 0.17, 3, -3, 1.47 -> 1, -2, 0, 3, -3, 1
    expected = torch.tensor([1.0, -2.0, 0.0, 3.0, -3.0, 1.0]) * 0.3
    torch.testing.assert_close(fake_quantize(x, 3), expected, rtol=0, atol=1e-7)
    # 2 bits is ternary: {-0.9, 0, 0.9}
    torch.testing.assert_close(fake_quantize(x, 2), torch.tensor([0.0, -0.9, 0.0, 0.9, -0.9, 0.0]), rtol=0, atol=1e-7)
    with pytest.raises(ValueError, match="at least 2 bits"):
        fake_quantize(x, 1)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_quantization_error_is_at_most_half_a_step_per_group(bits: int) -> None:
    torch.manual_seed(bits)
    weight = torch.randn(24, 10) * torch.linspace(0.1, 3.0, 24)[:, None]  # very different row ranges
    quantized = fake_quantize(weight, bits, groups=6)
    scales = group_scales(weight, bits, groups=6)
    for group, rows in enumerate(group_slices(24, 6)):
        error = (weight[rows] - quantized[rows]).abs().max()
        assert error <= scales[group] / 2 + 1e-6
        on_grid = quantized[rows] / scales[group]
        torch.testing.assert_close(on_grid, on_grid.round(), rtol=0, atol=1e-4)
        assert on_grid.abs().max() <= max_level(bits) + 1e-4
    # idempotent: grid values are their own quantization
    torch.testing.assert_close(fake_quantize(quantized, bits, groups=6), quantized)


def test_groups_are_the_attention_heads_when_g_equals_the_head_count() -> None:
    model = tiny_classifier(hidden=32, heads=4, intermediate=64)
    attention = model.bert.encoder.layer[0].attention
    head_dim = 32 // 4
    assert group_slices(32, 4) == [slice(h * head_dim, (h + 1) * head_dim) for h in range(4)]
    query = attention.self.query.weight.detach()
    per_head = torch.cat([fake_quantize(query[h * head_dim : (h + 1) * head_dim], 4) for h in range(4)])
    torch.testing.assert_close(fake_quantize(query, 4, groups=4), per_head, rtol=0, atol=0)
    # The output projection's head blocks are its input columns.
    output = attention.output.dense.weight.detach()
    per_head_columns = torch.cat([fake_quantize(output[:, h * head_dim : (h + 1) * head_dim], 4) for h in range(4)], dim=1)
    torch.testing.assert_close(fake_quantize(output, 4, groups=4, axis=1), per_head_columns, rtol=0, atol=0)
    axes = {name: (axis, heads) for name, _module, axis, heads in layer_linears(model.bert.encoder.layer[0], heads=4)}
    assert axes == {"attention.self.query": (0, 4), "attention.self.key": (0, 4), "attention.self.value": (0, 4),
                    "attention.output.dense": (1, 4), "intermediate.dense": (0, 1), "output.dense": (0, 1)}
    # One group per row, and groups that do not divide the rows (sizes differ by one).
    per_row = torch.cat([fake_quantize(query[r : r + 1], 4) for r in range(32)])
    torch.testing.assert_close(fake_quantize(query, 4, groups=-1), per_row, rtol=0, atol=0)
    assert [s.stop - s.start for s in group_slices(10, 3)] == [4, 3, 3]
    assert group_slices(10, 11) == group_slices(10, -1) == [slice(r, r + 1) for r in range(10)]
    with pytest.raises(ValueError, match="positive group count or -1"):
        group_slices(10, 0)


def _head_of_each_group(rows: int, groups: int, heads: int) -> list[set[int]]:
    head_rows = rows // heads
    return [{r // head_rows for r in range(s.start, s.stop)} for s in group_slices(rows, groups, heads)]


def test_groups_of_attention_matrices_never_span_two_heads() -> None:
    # MiniLM's 384 rows in 12 heads of 32 with Q-BERT's 128 groups: contiguous blocks of 3 rows would put 8
    # groups across a head boundary; nested, each head holds 11 (the first 8 heads) or 10 groups of its own rows.
    contiguous = group_slices(384, 128)
    assert sum(len({r // 32 for r in range(s.start, s.stop)}) > 1 for s in contiguous) == 8
    nested = group_slices(384, 128, heads=12)
    assert len(nested) == 128 and nested[0].start == 0 and nested[-1].stop == 384
    assert all(a.stop == b.start for a, b in zip(nested, nested[1:]))
    owners = _head_of_each_group(384, 128, heads=12)
    assert all(len(heads) == 1 for heads in owners)
    assert [sum(1 for heads in owners if heads == {h}) for h in range(12)] == [11] * 8 + [10] * 4
    assert sorted({s.stop - s.start for s in nested}) == [2, 3, 4]
    # BERT-base (768 rows, 12 heads of 64): the same; a multiple of the head count splits each head evenly.
    assert all(len(heads) == 1 for heads in _head_of_each_group(768, 128, heads=12))
    assert [s.stop - s.start for s in group_slices(384, 36, heads=12)] == [11, 11, 10] * 12
    # Where contiguous blocks already nest in heads, nothing changes (Table 1's 12 groups, one per head).
    for groups in (12, 24, 96, 384, -1):
        assert group_slices(384, groups, heads=12) == group_slices(384, groups)
    # Fewer groups than heads: whole heads per group.
    assert [(s.start, s.stop) for s in group_slices(384, 5, heads=12)] == [(0, 96), (96, 160), (160, 256), (256, 320), (320, 384)]
    # The grid follows: each nested group's rows share one scale, its largest magnitude at the top level.
    torch.manual_seed(0)
    weight = torch.randn(384, 16)
    quantized = fake_quantize(weight, 4, groups=128, heads=12)
    for rows in nested:
        scale = weight[rows].abs().max() / max_level(4)
        torch.testing.assert_close(quantized[rows], torch.clamp(torch.round(weight[rows] / scale), -7, 7) * scale, rtol=0, atol=1e-6)


def test_straight_through_gradient_is_the_identity() -> None:
    x = torch.tensor([0.3, -0.6, 0.05, 0.9], requires_grad=True)
    upstream = torch.tensor([1.0, 2.0, -3.0, 4.0])
    (quantize_dequantize(x, 2) * upstream).sum().backward()
    torch.testing.assert_close(x.grad, upstream, rtol=0, atol=0)


# --- Hessian --------------------------------------------------------------------------


def test_power_iteration_recovers_the_top_eigenvalue_of_a_quadratic() -> None:
    torch.manual_seed(0)
    basis, _ = torch.linalg.qr(torch.randn(5, 5, dtype=torch.float64))
    matrix = basis @ torch.diag(torch.tensor([4.0, 2.5, -1.0, 0.5, 0.1], dtype=torch.float64)) @ basis.T
    x = torch.randn(5, dtype=torch.float64, requires_grad=True)
    loss = 0.5 * x @ matrix @ x
    (gradient,) = torch.autograd.grad(loss, [x], create_graph=True)
    value = top_eigenvalue([gradient], [x], PowerIterationSettings(max_iterations=500, tolerance=1e-12))
    assert value == pytest.approx(float(torch.linalg.eigvalsh(matrix).max()), rel=1e-8)
    assert value == pytest.approx(4.0, rel=1e-8)


def test_layer_eigenvalue_agrees_with_eigvalsh_of_the_full_layer_hessian() -> None:
    # Large initial weights give a curved loss whose top eigenvalue is well separated (|l2 / l1| = 0.19),
    # so power iteration converges to it (at the default 0.02 the spectrum is flat: |l2 / l1| = 0.998).
    model = tiny_classifier(hidden=8, layers=2, heads=2, intermediate=8, seed=0, initializer_range=1.0).double()
    batch = {"input_ids": torch.tensor([[1, 4, 5, 2], [1, 7, 3, 2]]), "attention_mask": torch.ones(2, 4, dtype=torch.long)}
    labels = torch.tensor([0, 1])

    def loss_of(m, b):
        return m(**b, labels=labels).loss

    layer = model.bert.encoder.layer[1]
    params = list(layer.parameters())
    gradients = torch.autograd.grad(loss_of(model, batch), params, create_graph=True)
    sizes = [p.numel() for p in params]
    columns = []
    for index in range(sum(sizes)):
        unit = torch.zeros(sum(sizes), dtype=torch.float64)
        unit[index] = 1.0
        pieces = [piece.view_as(p) for piece, p in zip(unit.split(sizes), params)]
        columns.append(torch.cat([h.reshape(-1) for h in torch.autograd.grad(gradients, params, pieces, retain_graph=True)]))
    hessian = torch.stack(columns, dim=1)
    eigenvalues = torch.linalg.eigvalsh((hessian + hessian.T) / 2)
    expected = float(eigenvalues[eigenvalues.abs().argmax()])

    [first, second] = layer_sensitivities(model, encoder_layers(model), [batch], loss_of, PowerIterationSettings(max_iterations=1000, tolerance=1e-10))
    assert expected == pytest.approx(275.714, rel=1e-4)
    assert second.layer == 2 and second.eigenvalues[0] == pytest.approx(expected, rel=1e-6)
    assert second.std == 0.0 and second.sensitivity == pytest.approx(expected, rel=1e-6)


def test_sensitivity_is_mean_plus_std_over_batches() -> None:
    from kdrun.quant.hessian import LayerSensitivity

    layer = LayerSensitivity(3, (1.0, 3.0))
    assert (layer.mean, layer.std, layer.sensitivity) == (2.0, 1.0, 3.0)
    # A negative top eigenvalue is curvature too: its magnitude counts (Q-BERT's |mean| + std).
    negative = LayerSensitivity(1, (-23.0, -21.0))
    assert (negative.mean, negative.std, negative.sensitivity) == (-22.0, 1.0, 23.0)
    assert negative.sensitivity > layer.sensitivity


# --- bits, size, modules --------------------------------------------------------------


def test_mixed_precision_gives_the_high_width_to_the_most_sensitive_layers() -> None:
    assert mixed_precision_bits([1.0, 5.0, 3.0, 2.0], 2, 4) == (2, 4, 4, 2)
    assert mixed_precision_bits([1.0, 5.0, 3.0, 2.0], 2, 4, target_average_bits=2.5) == (2, 4, 2, 2)
    assert mixed_precision_bits([1.0, 5.0, 3.0, 2.0, 5.0, 0.0], 2, 3) == (2, 3, 3, 2, 3, 2)  # tie: lower layer first
    assert mixed_precision_bits([1.0, 2.0], 2, 4, target_average_bits=4) == (4, 4)
    assert uniform_bits(3, 8) == (8, 8, 8)
    with pytest.raises(ValueError, match="between 2 and 4"):
        mixed_precision_bits([1.0], 2, 4, target_average_bits=5)


def test_packed_size_arithmetic() -> None:
    model = tiny_classifier(hidden=4, layers=1, heads=2, intermediate=8)
    plan = QuantizationPlan(layer_bits=(3,), groups=2, embedding_bits=8, activation_bits=8)
    q_k_v_o = 4 * (16 * 3 + 2 * 32)  # 4x4 weights at 3 bits + 2 fp32 scales each
    ffn = 2 * (32 * 3 + 2 * 32)  # 8x4 and 4x8 weights
    embeddings = (10 * 4 + 6 * 4 + 2 * 4) * 8 + 3 * 32  # word, position, token type + one scale each
    full_precision = (8 + 4 * 4 + 8 + 4 + 16 + 20 + 10) * 32  # LayerNorms, biases, pooler, classifier
    total_bits = q_k_v_o + ffn + embeddings + full_precision
    assert total_bits == 4064
    size = packed_size(model, plan)
    parameters = sum(p.numel() for p in model.parameters())
    assert parameters == 282
    assert size == {"packed_bytes": 508, "fp32_bytes": 1128, "compression": round(1128 / 508, 3), "average_weight_bits": 3.0}


def test_fake_quantized_model_saves_loads_and_materializes(tmp_path: Path) -> None:
    model = tiny_classifier(hidden=8, layers=2, heads=2, intermediate=16)
    inputs = {"input_ids": torch.tensor([[1, 4, 5, 2]]), "attention_mask": torch.ones(1, 4, dtype=torch.long)}
    names = set(model.state_dict())
    plan = QuantizationPlan(layer_bits=(2, 4), groups=2, embedding_bits=8, activation_bits=8)
    enable_fake_quantization(model, plan)
    assert set(model.state_dict()) == names
    assert isinstance(model.bert.encoder.layer[1].output.dense, QuantizedLinear)
    assert isinstance(model.bert.embeddings.word_embeddings, QuantizedEmbedding)
    assert type(model.classifier) is torch.nn.Linear and type(model.bert.pooler.dense) is torch.nn.Linear
    assert model.bert.encoder.layer[0].attention.self.query.weight_bits == 2
    expected = model(**inputs).logits
    model.save_pretrained(tmp_path)
    plan.save(tmp_path)

    loaded = BertForSequenceClassification.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert QuantizationPlan.load(tmp_path) == plan
    enable_fake_quantization(loaded, plan)
    torch.testing.assert_close(loaded(**inputs).logits, expected)

    materialize(loaded)
    query = loaded.bert.encoder.layer[0].attention.self.query.weight.detach()
    assert type(loaded.bert.encoder.layer[0].attention.self.query) is torch.nn.Linear
    for rows in group_slices(8, 2):
        assert len(torch.unique(query[rows])) <= 3  # 2-bit: {-s, 0, s}


def test_int8_export_uses_int8_kernels_and_stays_close() -> None:
    model = tiny_classifier(hidden=32, layers=2, heads=4, intermediate=64)
    enable_fake_quantization(model, QuantizationPlan(layer_bits=(8, 8), groups=4))
    full_precision = materialize(model)
    int8_model = export_int8(full_precision)
    from torch.ao.nn.quantized.dynamic import Linear as DynamicInt8Linear

    linears = [m for m in int8_model.modules() if isinstance(m, (torch.nn.Linear, DynamicInt8Linear))]
    assert len(linears) == 2 * 6 + 2 and all(type(m) is DynamicInt8Linear for m in linears)
    inputs = {"input_ids": torch.tensor([[1, 4, 5, 2, 7, 3]]), "attention_mask": torch.ones(1, 6, dtype=torch.long)}
    with torch.inference_mode():
        reference, quantized = full_precision(**inputs).logits, int8_model(**inputs).logits
    assert (reference - quantized).abs().max() < 0.05 * reference.abs().max() + 1e-3


def test_distilbert_students_are_quantizable() -> None:
    torch.manual_seed(0)
    model = DistilBertForSequenceClassification(
        DistilBertConfig(vocab_size=10, dim=8, n_layers=3, n_heads=2, hidden_dim=16, max_position_embeddings=6)
    )
    assert len(encoder_layers(model)) == 3
    axes = {name: (axis, heads) for name, _m, axis, heads in layer_linears(encoder_layers(model)[0], heads=2)}
    assert axes == {"attention.q_lin": (0, 2), "attention.k_lin": (0, 2), "attention.v_lin": (0, 2), "attention.out_lin": (1, 2),
                    "ffn.lin1": (0, 1), "ffn.lin2": (0, 1)}
    batch = {"input_ids": torch.tensor([[1, 2, 3], [4, 5, 6]])}
    labels = torch.tensor([0, 1])
    from kdrun.models.capture import attention_implementation

    with attention_implementation(model, "eager"):  # the Hessian of a distilled student, as the sensitivity stage does it
        spectra = layer_sensitivities(model.eval(), encoder_layers(model), [batch], lambda m, b: m(**b, labels=labels).loss,
                                      PowerIterationSettings(max_iterations=5))
    assert [s.layer for s in spectra] == [1, 2, 3] and all(s.eigenvalues[0] != 0 for s in spectra)
    enable_fake_quantization(model, QuantizationPlan(layer_bits=(2, 3, 4), groups=2))
    assert model(**batch).logits.shape == (2, 2)


# --- end to end -----------------------------------------------------------------------


def _results(tmp_path: Path, cwd: str) -> dict:
    [results_file] = list((tmp_path / cwd / "outputs" / "runs").rglob("results.json"))
    return json.loads(results_file.read_text())


def test_qbert_mixed_precision_end_to_end(run_kdrun, tiny_bert_dir, glue_dir, tmp_path) -> None:
    overrides = ("experiment=qbert_sst2", "scale=smoke", f"teacher.path={tiny_bert_dir}", f"data.glue_dir={glue_dir}",
                 "evaluate.latency_repeats=1")
    for directory in ("mp", "direct"):
        (tmp_path / directory).mkdir()
    run_kdrun(*overrides, "ablation=qbert_mp_2_4", "quantize.groups=2", cwd=tmp_path / "mp")
    results = _results(tmp_path, "mp")
    stages = results["stages"]
    assert list(stages) == ["finetune_teacher", "sensitivity", "quantize", "evaluate"]
    sensitivity = stages["sensitivity"]["summary"]["sensitivity"]
    quantized = stages["quantize"]["summary"]
    high = max(range(2), key=lambda layer: sensitivity[layer])
    assert quantized["plan"]["layer_bits"] == [4 if layer == high else 2 for layer in range(2)]
    assert quantized["steps"] == 3
    quantize_dir = Path(stages["quantize"]["path"])
    bits = json.loads((quantize_dir / "bits.json").read_text())
    assert bits["layer_bits"] == quantized["plan"]["layer_bits"] and len(bits["sensitivity"]) == 2
    assert (quantize_dir / "bits.png").is_file() and (quantize_dir / "bits.svg").is_file()
    evaluation = stages["evaluate"]["summary"]
    assert evaluation["efficiency"]["quantization"]["layer_bits"] == quantized["plan"]["layer_bits"]
    assert evaluation["efficiency"]["quantization"]["compression"] > 1
    assert evaluation["dev"]["accuracy"] == pytest.approx(quantized["best_dev"]["accuracy"])  # same fake-quantized model
    # A quantized model is scored in fp32 (bf16 would move its weights off their grids); its deployment
    # formats start from the weights written onto the grids.
    assert evaluation["efficiency"]["precision"] == "fp32"
    assert set(evaluation["deployment"]["int8"]) >= {"dev", "agreement_with_fp32", "latency_ms_bs1", "speedup_vs_fp32_bs1", "speedup_vs_fp32_bs32"}

    # DirectQ reuses the teacher and skips the sensitivity stage (nothing wants it).
    run_kdrun(*overrides, "ablation=directq_w2", cwd=tmp_path / "direct")
    stages = _results(tmp_path, "direct")["stages"]
    assert list(stages) == ["finetune_teacher", "quantize", "evaluate"]
    assert stages["finetune_teacher"]["cache"] == "hit"
    assert stages["quantize"]["summary"]["plan"] == {"layer_bits": [2, 2], "groups": 1, "embedding_bits": 8, "activation_bits": 8}


QBERT_ROWS = ("none", "qbert_fp32", "qbert_w8", "qbert_w4", "qbert_w3", "qbert_w2", "directq_w4", "directq_w3", "directq_w2",
              "qbert_mp_2_4", "qbert_mp_2_3", "qbert_g1", "qbert_g12", "qbert_g128", "qbert_grow")


def test_every_qbert_ablation_row_runs_end_to_end(tiny_bert_dir, glue_dir, tmp_path) -> None:
    """Table 1 and the group ablation row by row at scale=smoke, in one process and one cache (as the sweeps run them)."""
    from kdrun.pipeline import run_pipeline

    from composing import compose_config

    common = ("experiment=qbert_sst2", "scale=smoke", "device=cpu", f"teacher.path={tiny_bert_dir}", f"data.glue_dir={glue_dir}",
              "evaluate.measure_latency=false", "evaluate.formats=[fp32]", f"cache.dir={tmp_path / 'cache'}")
    outputs = {}
    for row in QBERT_ROWS:
        (tmp_path / row).mkdir()
        outputs[row] = run_pipeline(compose_config(*common, f"ablation={row}"), tmp_path / row)
        assert set(outputs[row]["evaluate"].summary["dev"]) == {"accuracy"}, row
    assert len({out["finetune_teacher"].key for out in outputs.values()}) == 1
    plans = {row: out["quantize"].summary.get("plan") for row, out in outputs.items()}
    assert outputs["qbert_fp32"]["quantize"].summary["quantized"] is False and plans["qbert_fp32"] is None
    assert [plans[f"qbert_w{b}"]["layer_bits"] for b in (8, 4, 3, 2)] == [[8, 8], [4, 4], [3, 3], [2, 2]]
    assert [plans[f"directq_w{b}"]["groups"] for b in (4, 3, 2)] == [1, 1, 1]
    assert sorted(plans["qbert_mp_2_4"]["layer_bits"]) == [2, 4] and sorted(plans["qbert_mp_2_3"]["layer_bits"]) == [2, 3]
    assert [plans[row]["groups"] for row in ("qbert_g1", "qbert_g12", "qbert_g128", "qbert_grow")] == [1, 12, 128, -1]
    assert "sensitivity" in outputs["qbert_mp_2_4"] and "sensitivity" not in outputs["qbert_w4"]
