"""Shipping a model: ONNX graphs for ONNX Runtime, checked against PyTorch, with a model card.

- :mod:`kdrun.export.graphs`: PyTorch model -> ONNX graph (dynamic batch and sequence axes, checked),
  ONNX Runtime's transformer optimizer, int8 dynamic quantization.
- :mod:`kdrun.export.runtime`: an ONNX Runtime session behind a model's interface, so that kdrun's own
  scoring and latency code measure it exactly as they measure PyTorch models.
- :mod:`kdrun.export.card`: the exported directory's README.md (Hugging Face model-card convention).

The stage itself is ``kdrun/stages/export.py``; docs/export.md explains the choices. ``onnx`` and
``onnxruntime`` are the optional extra ``kdrun[export]``: nothing here imports them at module level.
"""

from __future__ import annotations

import importlib

# The exported formats, in the order they are computed (onnx_int8 quantizes the onnx graph).
FORMATS = ("onnx", "onnx_int8")
REQUIRED_PACKAGES = ("onnx", "onnxruntime")
INSTALL_HINT = "pip install 'kdrun[export]'"


def missing_packages() -> list[str]:
    """The packages of the ``export`` extra that do not import here."""
    missing = []
    for name in REQUIRED_PACKAGES:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    return missing


def missing_packages_problem() -> str | None:
    """One line naming the extra to install, or None when everything imports."""
    missing = missing_packages()
    if not missing:
        return None
    verb = "does" if len(missing) == 1 else "do"
    return f"the export stage needs {' and '.join(missing)}, which {verb} not import here: {INSTALL_HINT}"
