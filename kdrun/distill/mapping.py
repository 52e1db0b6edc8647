"""Which teacher layer each student layer learns from: the mapping n = g(m) of TinyBERT.

Indices follow the paper (Jiao et al., 2020, section 3.1): student layer m in
0..M+1 maps to teacher layer g(m) in 0..N+1, where index 0 is the embedding
layer and M+1 / N+1 the prediction layer, so g(0) = 0 and g(M+1) = N+1 always.
Transformer layers are 1-based, as in ``CapturedOutputs``.

Errors name the config key ``distill.mapping`` because that is where users set it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

MAPPING_KINDS = ("uniform", "top", "bottom", "list")
CONFIG_KEY = "distill.mapping"


class LayerMappingError(ValueError):
    """The configured layer mapping cannot work for these models; the message says how to fix it."""


@dataclass
class LayerMapping:
    """Strategy for g(m): ``uniform`` (every N/M-th layer), ``top``, ``bottom`` or an explicit ``list``."""

    kind: str = "uniform"  # uniform | top | bottom | list
    layers: list[int] | None = None  # only for kind="list": teacher layer (1-based) per student layer 1..M

    def __post_init__(self) -> None:
        # Validate the kind early so a typo fails at config time, before any model is loaded.
        if self.kind not in MAPPING_KINDS:
            raise LayerMappingError(
                f"{CONFIG_KEY}.kind={self.kind!r} is not a known layer mapping. "
                f"Use one of {', '.join(MAPPING_KINDS)}."
            )
        if self.layers is not None:
            # Hydra hands over a ListConfig; keep a plain list of ints so the dataclass stays simple.
            self.layers = _as_int_list(self.layers)
        if self.kind == "list" and self.layers is None:
            raise LayerMappingError(
                f"{CONFIG_KEY}.kind=list needs {CONFIG_KEY}.layers: the 1-based teacher layer for each student "
                f"layer, e.g. {CONFIG_KEY}.layers=[3,6,9,12] for a 4-layer student of a 12-layer teacher."
            )
        if self.kind != "list" and self.layers is not None:
            raise LayerMappingError(
                f"{CONFIG_KEY}.layers is only used with {CONFIG_KEY}.kind=list, but kind={self.kind!r}. "
                f"Set {CONFIG_KEY}.kind=list to use the explicit layers, or remove {CONFIG_KEY}.layers."
            )

    def resolve(self, student_layers: int, teacher_layers: int) -> list[int]:
        """Return [g(0), g(1), ..., g(M), g(M+1)] for an M-layer student and an N-layer teacher."""
        m_count, n_count = student_layers, teacher_layers
        if m_count < 1 or n_count < 1:
            raise LayerMappingError(
                f"{CONFIG_KEY}: both models need at least one transformer layer "
                f"(student has {m_count}, teacher has {n_count})."
            )
        if m_count > n_count:
            raise LayerMappingError(
                f"{CONFIG_KEY}: the student has more layers ({m_count}) than the teacher ({n_count}), so its "
                "layers cannot each learn from a distinct teacher layer. Use a student with at most "
                f"{n_count} layers, or a deeper teacher."
            )
        if self.kind == "uniform":
            # Round half up of m*N/M in integer arithmetic, so g(M) = N and no float error creeps in.
            middle = [(2 * m * n_count + m_count) // (2 * m_count) for m in range(1, m_count + 1)]
        elif self.kind == "top":
            middle = [n_count - m_count + m for m in range(1, m_count + 1)]
        elif self.kind == "bottom":
            middle = list(range(1, m_count + 1))
        else:
            middle = self._checked_list(m_count, n_count)
        return [0, *middle, n_count + 1]

    def layer_pairs(self, student_layers: int, teacher_layers: int) -> list[tuple[int, int]]:
        """(student layer, teacher layer) for the transformer layers m = 1..M: what the layer losses compare."""
        resolved = self.resolve(student_layers, teacher_layers)
        return [(m, resolved[m]) for m in range(1, student_layers + 1)]

    def _checked_list(self, m_count: int, n_count: int) -> list[int]:
        layers = list(self.layers or [])
        if len(layers) != m_count:
            raise LayerMappingError(
                f"{CONFIG_KEY}.layers has {len(layers)} entries but the student has {m_count} layers; give "
                f"exactly one 1-based teacher layer per student layer (e.g. {m_count} increasing numbers "
                f"between 1 and {n_count})."
            )
        outside = [layer for layer in layers if not 1 <= layer <= n_count]
        if outside:
            raise LayerMappingError(
                f"{CONFIG_KEY}.layers={layers} contains {outside}, outside the teacher's layers 1..{n_count} "
                "(layers are 1-based; 0 is the embedding layer, which is always mapped to 0 automatically)."
            )
        if any(later <= earlier for earlier, later in zip(layers, layers[1:])):
            raise LayerMappingError(
                f"{CONFIG_KEY}.layers={layers} must be strictly increasing, so that deeper student layers "
                "learn from deeper teacher layers and no teacher layer is used twice; sort them and remove duplicates."
            )
        return layers


def _as_int_list(values: Iterable[int]) -> list[int]:
    if isinstance(values, (str, bytes)) or not hasattr(values, "__iter__"):
        raise LayerMappingError(f"{CONFIG_KEY}.layers must be a list of integers, got {values!r}.")
    result = []
    for value in values:
        if isinstance(value, bool) or not isinstance(value, int):
            raise LayerMappingError(
                f"{CONFIG_KEY}.layers must contain integers only, got {value!r} in {list(values)!r}."
            )
        result.append(int(value))
    return result
