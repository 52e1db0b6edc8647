"""Size and speed of a trained model, measured the same way for every model kdrun produces."""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt")


def size_on_disk(model_dir: Path) -> int:
    """Bytes of the weight files (not tokenizer or config files) in a saved model directory."""
    return sum(p.stat().st_size for p in Path(model_dir).rglob("*") if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES))


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def median_latency_ms(model: torch.nn.Module, inputs: dict[str, torch.Tensor], warmup: int, repeats: int) -> float:
    """Median wall time of one forward pass on ``inputs`` (already on the model's device), after warm-up."""
    model.eval()
    device = next(model.parameters()).device
    for _ in range(warmup):
        model(**inputs)
    _synchronize(device)
    timings = []
    for _ in range(repeats):
        started = time.perf_counter()
        model(**inputs)
        _synchronize(device)
        timings.append((time.perf_counter() - started) * 1000.0)
    return statistics.median(timings)
