"""The sensitivity stage's result file (Q-BERT's Hessian spectrum per encoder layer), which quantization reads."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

RESULT_FILE = "sensitivity.json"


def read_sensitivities(stage_dir: Path) -> list[dict[str, Any]]:
    return json.loads((stage_dir / RESULT_FILE).read_text())["layers"]


def print_sensitivity_table(layers: list[dict[str, Any]], bits: tuple[int, ...] | None = None, title: str = "") -> None:
    table = Table(title=title or "Hessian sensitivity per encoder layer")
    for column in ("layer", "top eigenvalue (mean)", "std", "mean + std") + (("bits",) if bits else ()):
        table.add_column(column, justify="right")
    for index, layer in enumerate(layers):
        row = [str(layer["layer"]), f"{layer['mean']:.4g}", f"{layer['std']:.3g}", f"{layer['sensitivity']:.4g}"]
        table.add_row(*row, *((str(bits[index]),) if bits else ()))
    Console().print(table)
