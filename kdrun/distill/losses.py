"""The TinyBERT distillation loss terms (Jiao et al., 2020), each a small pure function.

The padding and reduction rules follow the authors' official code rather than
the idealised formulas, so results stay comparable with published TinyBERT
numbers: attention scores on padded keys (and anything <= -1e2) are zeroed in
both models before a plain mean-squared error, hidden states are compared
without a padding mask, and layer losses are summed over the mapped layers.

Teacher tensors may come from ``torch.inference_mode()``; autograd refuses to
save such tensors for backward, so the functions here turn them into normal
tensors first (a copy, only when needed).

Every term is computed in fp32 whatever precision the models ran in: under bf16
autocast, attention scores of magnitude ~1e2 carry 8 significant bits, and a
difference, square and mean taken in bf16 would lose what little of the gap
between student and teacher is left. Inputs are cast before subtracting.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdrun.distill.mapping import LayerMapping

if TYPE_CHECKING:
    from kdrun.models.capture import CapturedOutputs

ATTENTION_TARGETS = ("scores", "probs")
# The official TinyBERT code zeroes every attention score at or below this value: with its additive
# mask of -10000 on padded keys that removes exactly the padded entries.
MASKED_SCORE_THRESHOLD = -1e2


def _usable(tensor: Tensor) -> Tensor:
    """A tensor autograd may save for backward (inference-mode tensors may not be saved), in fp32."""
    if tensor.dtype != torch.float32:
        return tensor.float()  # a new tensor, so also fine for autograd
    return tensor.clone() if tensor.is_inference() else tensor


def attention_mse(
    student: Tensor,
    teacher: Tensor,
    key_padding_mask: Tensor | None,
    target: str = "scores",
) -> Tensor:
    """MSE between attention maps [batch, heads, query, key], ignoring padded keys.

    ``target="scores"`` compares the unnormalised scores QK^T/sqrt(d_k), ``"probs"`` the softmax
    probabilities. Entries whose key is padding (``key_padding_mask == 0``, shape [batch, key]) are
    set to 0 in both tensors, and for scores so is every entry <= -1e2, as the official code does;
    scores captured with the additive mask already added therefore give the same loss. The mean
    runs over all elements, i.e. (1/h) * sum over heads of the per-head MSE.
    """
    if target not in ATTENTION_TARGETS:
        raise ValueError(f"attention target must be one of {ATTENTION_TARGETS}, got {target!r}")
    if student.dim() != 4 or teacher.dim() != 4:
        raise ValueError(
            "attention maps must be [batch, heads, query, key]; got shapes "
            f"{tuple(student.shape)} (student) and {tuple(teacher.shape)} (teacher)"
        )
    if student.shape[1] != teacher.shape[1]:
        raise ValueError(
            f"attention distillation needs the same number of heads in student ({student.shape[1]}) and "
            f"teacher ({teacher.shape[1]}): TinyBERT matches attention maps head by head. Choose a student "
            "with as many heads as the teacher, or set the attention weight to 0."
        )
    if student.shape != teacher.shape:
        raise ValueError(
            f"attention maps differ in shape: student {tuple(student.shape)}, teacher {tuple(teacher.shape)}"
        )
    student, teacher = student.float(), _usable(teacher)
    drop: Tensor | None = None
    if key_padding_mask is not None:
        if key_padding_mask.shape != (student.shape[0], student.shape[-1]):
            raise ValueError(
                f"key_padding_mask must be [batch, key] = {(student.shape[0], student.shape[-1])}, "
                f"got {tuple(key_padding_mask.shape)}"
            )
        drop = (key_padding_mask == 0)[:, None, None, :].to(student.device)
    zero = torch.zeros((), dtype=student.dtype, device=student.device)
    student_drop, teacher_drop = drop, drop
    if target == "scores":
        below_s = student <= MASKED_SCORE_THRESHOLD
        below_t = teacher <= MASKED_SCORE_THRESHOLD
        student_drop = below_s if drop is None else below_s | drop
        teacher_drop = below_t if drop is None else below_t | drop
    if student_drop is not None:
        student = torch.where(student_drop, zero, student)
    if teacher_drop is not None:
        teacher = torch.where(teacher_drop, zero.to(teacher.dtype), teacher)
    return F.mse_loss(student, teacher.to(student.dtype))


def hidden_mse(student_hidden: Tensor, teacher_hidden: Tensor, projection: nn.Module | None) -> Tensor:
    """MSE(H^S W_h, H^T) over all elements, padding included (as in the official code).

    ``projection`` maps the student width to the teacher's; pass None when the widths match.
    """
    projected = projection(student_hidden) if projection is not None else student_hidden
    if projected.shape != teacher_hidden.shape:
        hint = (
            " The hidden widths differ: pass a projection (WidthProjections) mapping the student width"
            " to the teacher's."
            if projected.shape[:-1] == teacher_hidden.shape[:-1]
            else ""
        )
        raise ValueError(
            f"student hidden states {tuple(projected.shape)} (after projection) do not match the teacher's "
            f"{tuple(teacher_hidden.shape)}.{hint}"
        )
    return F.mse_loss(projected.float(), _usable(teacher_hidden))


def embedding_mse(student_embeddings: Tensor, teacher_embeddings: Tensor, projection: nn.Module | None) -> Tensor:
    """The embedding-layer loss: the same MSE as for hidden states, applied to the embedding outputs."""
    return hidden_mse(student_embeddings, teacher_embeddings, projection)


def soft_cross_entropy(
    student_logits: Tensor,
    teacher_logits: Tensor,
    temperature: float = 1.0,
    scale_by_t2: bool = False,
) -> Tensor:
    """Batch mean of -softmax(z^T/t) . log_softmax(z^S/t), times t^2 if ``scale_by_t2``.

    The t^2 factor (Hinton et al.) keeps gradient magnitudes comparable across temperatures;
    TinyBERT's official code leaves it out, hence the switch.
    """
    if temperature <= 0:
        raise ValueError(f"the distillation temperature must be positive, got {temperature}")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits {tuple(teacher_logits.shape)} "
            "differ; both models need the same number of labels"
        )
    teacher_probs = F.softmax(_usable(teacher_logits) / temperature, dim=-1)
    student_log_probs = F.log_softmax(student_logits.float() / temperature, dim=-1)
    loss = -(teacher_probs * student_log_probs).sum(dim=-1).mean()
    return loss * temperature**2 if scale_by_t2 else loss


def logit_mse(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """MSE between predictions, the prediction loss for regression tasks such as STS-B."""
    if student_logits.numel() != teacher_logits.numel():
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits {tuple(teacher_logits.shape)} differ"
        )
    teacher = _usable(teacher_logits).reshape(student_logits.shape)
    return F.mse_loss(student_logits.float(), teacher)


class WidthProjections(nn.Module):
    """Learnable maps W_h from the student width to the teacher width, for hidden and embedding losses.

    TinyBERT's official code uses one shared ``fit_dense`` for all hidden states including the
    embeddings, hence ``shared=True`` by default; ``shared=False`` gives one map per student index
    (0 = embeddings, 1..M = transformer layers). With equal widths no parameters are created and
    ``for_layer`` returns None (the identity), unless ``always``: the official TinyBERT student always
    trains its ``fit_dense``, a student as wide as its teacher (TinyBERT-6) included. Train these with the student and save their
    ``state_dict`` next to it if training continues later.
    """

    def __init__(
        self, student_width: int, teacher_width: int, student_layers: int = 0, shared: bool = True, always: bool = False
    ) -> None:
        super().__init__()
        self.student_width = student_width
        self.teacher_width = teacher_width
        self.shared = shared
        self.student_layers = student_layers
        self.fit_dense: nn.Linear | None = None
        self.per_layer: nn.ModuleList | None = None
        if student_width == teacher_width and not always:
            return
        if shared:
            self.fit_dense = nn.Linear(student_width, teacher_width)
        else:
            if student_layers < 1:
                raise ValueError("per-layer projections (shared=False) need student_layers >= 1")
            self.per_layer = nn.ModuleList(nn.Linear(student_width, teacher_width) for _ in range(student_layers + 1))

    @property
    def is_identity(self) -> bool:
        """True when the widths match and nothing is learned."""
        return self.fit_dense is None and self.per_layer is None

    def for_layer(self, student_index: int) -> nn.Module | None:
        """The map for student index m (0 = embeddings), or None when the widths match."""
        if self.fit_dense is not None:
            return self.fit_dense
        if self.per_layer is not None:
            if not 0 <= student_index < len(self.per_layer):
                raise IndexError(f"no projection for student index {student_index} (have 0..{len(self.per_layer) - 1})")
            return self.per_layer[student_index]
        return None

    def forward(self, hidden: Tensor, student_index: int = 0) -> Tensor:
        """Project ``hidden`` from student index m into the teacher's width."""
        projection = self.for_layer(student_index)
        return hidden if projection is None else projection(hidden)


@dataclass
class LossWeights:
    """Weight of each TinyBERT term; 0 switches a term off and the objective stops asking for its inputs."""

    embedding: float = 1.0
    attention: float = 1.0
    hidden: float = 1.0
    prediction: float = 1.0


@dataclass
class ObjectiveConfig:
    """Everything TinyBertObjective needs apart from the models' depths; buildable from a plain dict."""

    weights: LossWeights = field(default_factory=LossWeights)
    temperature: float = 1.0
    scale_by_t2: bool = False
    attention_target: str = "scores"
    mapping: LayerMapping = field(default_factory=LayerMapping)

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> ObjectiveConfig:
        """Build from a plain (or Hydra) mapping, rejecting unknown keys so typos do not pass silently."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown distillation objective settings {unknown}; known: {sorted(known)}")
        kwargs = dict(values)
        if "weights" in kwargs and not isinstance(kwargs["weights"], LossWeights):
            weight_values = dict(kwargs["weights"])
            allowed = {f.name for f in fields(LossWeights)}
            bad = sorted(set(weight_values) - allowed)
            if bad:
                raise ValueError(f"unknown loss weights {bad}; the TinyBERT terms are {sorted(allowed)}")
            kwargs["weights"] = LossWeights(**{k: float(v) for k, v in weight_values.items()})
        if "mapping" in kwargs and not isinstance(kwargs["mapping"], LayerMapping):
            kwargs["mapping"] = LayerMapping(**dict(kwargs["mapping"]))
        return cls(**kwargs)


class TinyBertObjective:
    """The weighted TinyBERT loss: embedding + attention + hidden-state + prediction terms.

    Layer terms are summed over the mapped layer pairs (as the official code does), then weighted.
    The ``needs_*`` methods say what to capture from each model, so nothing that only a disabled
    term uses is computed or stored.
    """

    def __init__(
        self,
        config: ObjectiveConfig | Mapping[str, Any],
        student_layers: int,
        teacher_layers: int,
        projections: WidthProjections | None = None,
    ) -> None:
        self.config = config if isinstance(config, ObjectiveConfig) else ObjectiveConfig.from_mapping(config)
        weights = self.config.weights
        for name in ("embedding", "attention", "hidden", "prediction"):
            if getattr(weights, name) < 0:
                raise ValueError(f"loss weight {name}={getattr(weights, name)} must be >= 0")
        if not any(getattr(weights, name) > 0 for name in ("embedding", "attention", "hidden", "prediction")):
            raise ValueError("all loss weights are 0: set at least one of embedding/attention/hidden/prediction > 0")
        if self.config.attention_target not in ATTENTION_TARGETS:
            raise ValueError(
                f"attention_target must be one of {ATTENTION_TARGETS}, got {self.config.attention_target!r}"
            )
        if self.config.temperature <= 0:
            raise ValueError(f"the distillation temperature must be positive, got {self.config.temperature}")
        self.student_layers = student_layers
        self.teacher_layers = teacher_layers
        self.layer_pairs = self.config.mapping.layer_pairs(student_layers, teacher_layers)
        self.projections = projections

    @property
    def weights(self) -> LossWeights:
        return self.config.weights

    def needs_attention_layers(self, student: bool) -> set[int]:
        """1-based layers whose attention maps the student (or teacher) must provide."""
        if self.weights.attention == 0:
            return set()
        return {pair[0] if student else pair[1] for pair in self.layer_pairs}

    def needs_hidden_layers(self, student: bool) -> set[int]:
        """1-based layers whose output hidden states the student (or teacher) must provide."""
        if self.weights.hidden == 0:
            return set()
        return {pair[0] if student else pair[1] for pair in self.layer_pairs}

    def needs_embeddings(self) -> bool:
        return self.weights.embedding > 0

    def needs_logits(self) -> bool:
        return self.weights.prediction > 0

    def capture_request(self, student: bool) -> dict[str, Any]:
        """Keyword arguments for ``kdrun.models.capture.forward_with_capture`` for one side."""
        return {
            "attention_layers": self.needs_attention_layers(student),
            "hidden_layers": self.needs_hidden_layers(student),
            "want_embeddings": self.needs_embeddings(),
            "want_logits": self.needs_logits(),
            "attention_target": self.config.attention_target,
        }

    def _projection(self, student_index: int) -> nn.Module | None:
        return None if self.projections is None else self.projections.for_layer(student_index)

    def __call__(
        self,
        student_out: CapturedOutputs,
        teacher_out: CapturedOutputs,
        key_padding_mask: Tensor | None,
        is_regression: bool,
    ) -> tuple[Tensor, dict[str, float]]:
        """Weighted total loss and each active term's unweighted value (plus ``total``) for logging."""
        terms: dict[str, Tensor] = {}
        weights = self.weights
        if weights.embedding > 0:
            terms["embedding"] = embedding_mse(
                _need(student_out.embeddings, "student embeddings"),
                _need(teacher_out.embeddings, "teacher embeddings"),
                self._projection(0),
            )
        if weights.attention > 0:
            terms["attention"] = sum(
                attention_mse(
                    _need(student_out.attention_scores.get(m), f"student attention of layer {m}"),
                    _need(teacher_out.attention_scores.get(n), f"teacher attention of layer {n}"),
                    key_padding_mask,
                    self.config.attention_target,
                )
                for m, n in self.layer_pairs
            )
        if weights.hidden > 0:
            terms["hidden"] = sum(
                hidden_mse(
                    _need(student_out.hidden_states.get(m), f"student hidden states of layer {m}"),
                    _need(teacher_out.hidden_states.get(n), f"teacher hidden states of layer {n}"),
                    self._projection(m),
                )
                for m, n in self.layer_pairs
            )
        if weights.prediction > 0:
            student_logits = _need(student_out.logits, "student logits")
            teacher_logits = _need(teacher_out.logits, "teacher logits")
            if is_regression:
                terms["prediction"] = logit_mse(student_logits, teacher_logits)
            else:
                terms["prediction"] = soft_cross_entropy(
                    student_logits, teacher_logits, self.config.temperature, self.config.scale_by_t2
                )
        total = sum(getattr(weights, name) * value for name, value in terms.items())
        assert isinstance(total, Tensor)  # at least one weight is positive (checked in __init__)
        report = {name: float(value.detach()) for name, value in terms.items()}
        report["total"] = float(total.detach())
        return total, report


def _need(value: Tensor | None, what: str) -> Tensor:
    if value is None:
        raise KeyError(
            f"{what} was not captured but the distillation objective needs it; capture with "
            "TinyBertObjective.capture_request(...) for each model"
        )
    return value
