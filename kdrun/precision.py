"""Numeric precision of a run: which one ``device.precision`` means here, and its autocast context.

Training keeps master weights and optimizer state in fp32 and runs forwards (and
the backward they record) under ``torch.autocast`` in the chosen low precision.
Loss terms cast their inputs to fp32 themselves (see ``kdrun/distill/losses.py``).
Inference (dev evaluation, frozen teachers and their logits, the augmentation's
masked LM, the bf16 deployment format) runs a copy of the model whose weights are
stored in the low precision, under autocast: autocast alone would cast every weight again at every
forward, which on SST-2 dev with the MiniLM teacher cost 1.13 s against 0.89 s
(fp32: 2.72 s), and a masked LM's many short batches 1.5x.

``auto`` means bf16 where the device runs it natively and fp32 everywhere else:
- a CUDA device that supports bf16;
- a CPU with AVX512-BF16 or AMX tiles: there bf16 matrix products run at about
  twice fp32's speed (``scripts/bench_*.py --precision both`` measures it). On a
  CPU without them bf16 is emulated and slower than fp32, so ``auto`` stays fp32.

fp16 is a CUDA format (it needs a gradient scaler, which the training loop
creates); on a CPU it is refused. Autocast is owned here rather than by
accelerate because accelerate fixes one mixed-precision mode per process, and a
sweep run in one process (Hydra's basic or joblib launcher) may mix precisions.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
# Flags in /proc/cpuinfo that mean the CPU multiplies bf16 matrices natively.
NATIVE_BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


class PrecisionError(ValueError):
    """A precision this device cannot run; the message says what to choose instead."""


@dataclass(frozen=True)
class Precision:
    """A resolved precision: ``name`` is fp32, bf16 or fp16; ``device_type`` cpu or cuda; ``reason`` why."""

    name: str
    device_type: str
    reason: str = ""

    @property
    def dtype(self) -> Any:
        import torch

        return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[self.name]

    @property
    def is_mixed(self) -> bool:
        return self.name != "fp32"

    @property
    def needs_grad_scaler(self) -> bool:
        return self.name == "fp16"

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        """Autocast to this precision on its device; nothing for fp32. For inference and evaluation."""
        if not self.is_mixed:
            return contextlib.nullcontext()
        import torch

        return torch.autocast(device_type=self.device_type, dtype=self.dtype)

    def inference_model(self, model: Any, copy: bool = True) -> Any:
        """The model to run inference with in this precision: for fp32 ``model`` itself, else ``model`` with
        its weights stored in this dtype: a copy (the original untouched), or, for a frozen model nothing
        else uses (``copy=False``), ``model`` itself converted."""
        if not self.is_mixed or all(p.dtype == self.dtype for p in model.parameters() if p.is_floating_point()):
            return model
        if not copy:
            return model.to(self.dtype)
        import copy as copying

        return copying.deepcopy(model).to(self.dtype)

    def training_forward(self) -> contextlib.AbstractContextManager[Any]:
        """:meth:`autocast` for a forward whose backward follows.

        On a CPU in bf16 it also has scaled-dot-product attention use its math kernel:
        the fused (flash) kernel's backward in bf16 is slow there. Measured on MiniLM-L6,
        batch 32 (forward, backward, AdamW): 300 ms instead of 420 ms at length 64 and
        630 instead of 820 at 128. In inference the fused kernel stays the faster one
        (147 ms against 355 at length 128), so evaluation and frozen teachers keep it
        (:func:`default_attention_kernels`).
        """
        if not (self.name == "bf16" and self.device_type == "cpu"):
            return self.autocast()
        from torch.nn.attention import SDPBackend, sdpa_kernel

        stack = contextlib.ExitStack()
        stack.enter_context(self.autocast())
        stack.enter_context(sdpa_kernel(SDPBackend.MATH))
        return stack


def default_attention_kernels() -> contextlib.AbstractContextManager[Any]:
    """Every scaled-dot-product attention kernel allowed again (torch picks the fastest): for a frozen
    model's forward inside a :meth:`Precision.training_forward`, e.g. a distillation teacher's."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    names = ("CUDNN_ATTENTION", "FLASH_ATTENTION", "EFFICIENT_ATTENTION", "MATH", "OVERRIDEABLE")
    return sdpa_kernel([getattr(SDPBackend, name) for name in names if hasattr(SDPBackend, name)])


@functools.lru_cache(maxsize=1)
def cpu_native_bf16() -> tuple[bool, str]:
    """(whether this CPU multiplies bf16 natively, which feature says so). Asks torch, then /proc/cpuinfo."""
    try:
        import torch

        probes = (("AMX", "_is_amx_tile_supported"), ("AVX512-BF16", "_is_avx512_bf16_supported"))
        for feature, probe in probes:
            check = getattr(torch.cpu, probe, None)
            if check is not None and check():
                return True, feature
        if all(getattr(torch.cpu, probe, None) is not None for _, probe in probes):
            return False, "neither AVX512-BF16 nor AMX"
    except Exception:  # noqa: BLE001  (an older torch without the probes: read the flags)
        pass
    cpuinfo = Path("/proc/cpuinfo")
    flags = set(cpuinfo.read_text().split()) if cpuinfo.is_file() else set()
    found = [flag for flag in NATIVE_BF16_CPU_FLAGS if flag in flags]
    return (True, found[0]) if found else (False, "neither AVX512-BF16 nor AMX")


def device_type_of(device: Any) -> str:
    """cpu or cuda, as ``device.type`` resolves on this machine (auto: CUDA when one is visible). Only
    ``auto`` asks torch, so that planning an explicit device loads no torch."""
    if device.type == "cpu":
        return "cpu"
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_precision(device: Any) -> Precision:
    """What ``device.precision`` means on this machine. Raises :class:`PrecisionError` for fp16 on a CPU
    or an unknown name."""
    requested = str(device.precision)
    if requested not in PRECISIONS:
        raise PrecisionError(f"device.precision must be one of {', '.join(PRECISIONS)}; got '{requested}'.")
    device_type = device_type_of(device)
    if requested == "fp16" and device_type == "cpu":
        raise PrecisionError(
            "device.precision=fp16 runs only on CUDA (it needs a gradient scaler and CPUs have no fast fp16 "
            "matrix products); use device.precision=bf16 (or auto) on a CPU."
        )
    if requested != "auto":
        return Precision(requested, device_type, f"device.precision={requested}")
    if device_type == "cuda":
        import torch

        if torch.cuda.is_bf16_supported():
            return Precision("bf16", "cuda", f"auto: {torch.cuda.get_device_name()} supports bf16")
        return Precision("fp32", "cuda", f"auto: {torch.cuda.get_device_name()} has no bf16")
    native, feature = cpu_native_bf16()
    if native:
        return Precision("bf16", "cpu", f"auto: the CPU multiplies bf16 natively ({feature})")
    return Precision("fp32", "cpu", f"auto: the CPU has {feature}, so bf16 would be emulated and slower")


def log_choice(precision: Precision) -> None:
    logger.info("precision: %s on %s (%s).", precision.name, precision.device_type, precision.reason)
