"""Stage sensitivity: Q-BERT's Hessian spectrum of each encoder layer of the model before it.

Takes the model of the last model-producing stage (a fine-tuned teacher or a
distilled student), draws ``quantize.hessian.batches`` seeded batches of training
examples, and computes each layer's top Hessian eigenvalue of the task loss per
batch by power iteration (:mod:`kdrun.quant.hessian`). Writes ``sensitivity.json``
and a plot. Cached, so every mixed-precision row of a sweep shares one computation.
"""

from __future__ import annotations

import json
from typing import Any

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from kdrun.data.glue import sample_examples
from kdrun.models.capture import attention_implementation
from kdrun.report.plots import plot_sensitivities
from kdrun.predict import model_inputs
from kdrun.quant.hessian import PowerIterationSettings, layer_sensitivities
from kdrun.quant.modules import encoder_layers
from kdrun.quant.sensitivity import RESULT_FILE, print_sensitivity_table
from kdrun.stages.context import StageContext

def run(ctx: StageContext) -> dict[str, Any]:
    cfg, out_dir = ctx.cfg, ctx.out_dir
    settings = cfg.quantize.hessian
    task = ctx.task
    model_dir = ctx.model_dir()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    examples = sample_examples(ctx.train_examples(), settings.batches * settings.batch_size, settings.seed)
    text = ctx.text(tokenizer)
    features, collate = text.features(examples), text.collate
    batches = [
        collate([features[i] for i in range(start, min(start + settings.batch_size, len(features)))])
        for start in range(0, len(features), settings.batch_size)
    ]

    def task_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return model(**model_inputs(batch, model=model), labels=batch["labels"]).loss

    power = PowerIterationSettings(settings.max_iterations, settings.tolerance, settings.seed)
    # Double backward through attention needs the eager implementation (SDPA's CPU kernel has no second derivative).
    with attention_implementation(model, "eager"):
        layers = layer_sensitivities(model, encoder_layers(model), batches, task_loss, power)
    rows = [layer.as_dict() for layer in layers]
    (out_dir / RESULT_FILE).write_text(json.dumps({"task": task.name, "batches": len(batches), "layers": rows}, indent=2))
    plot_sensitivities([s.mean for s in layers], [s.std for s in layers], out_dir / "sensitivity", title=f"{task.name}: Hessian sensitivity")
    print_sensitivity_table(rows)
    return {"batches": len(batches), "sensitivity": [round(s.sensitivity, 6) for s in layers]}
