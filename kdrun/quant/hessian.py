"""Top Hessian eigenvalue of the loss restricted to each encoder layer (Q-BERT's sensitivity).

For layer l with parameters W_l, the block H_ll = d2L/dW_l2 is never formed: power
iteration needs only Hessian-vector products, which double backward gives at the
cost of about two backward passes: H_ll v = d(g_l . v)/dW_l with g_l = dL/dW_l kept
differentiable. One forward and one create-graph backward per batch serve the
power iterations of every layer. Q-BERT's sensitivity of a layer is
|mean| + std of its top eigenvalue over several batches: power iteration returns
the eigenvalue of largest magnitude, which can be negative (-22 was seen on a
small model), and a strongly curved layer must not rank as the least sensitive.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class PowerIterationSettings:
    max_iterations: int = 20
    # Stop when the eigenvalue estimate changes by less than this fraction.
    tolerance: float = 1e-3
    seed: int = 0


def _normalized(vectors: Sequence[Tensor]) -> list[Tensor]:
    norm = torch.sqrt(sum((v * v).sum() for v in vectors))
    return [v / norm for v in vectors]


def top_eigenvalue(gradients: Sequence[Tensor], parameters: Sequence[Tensor], settings: PowerIterationSettings) -> float:
    """The largest-magnitude eigenvalue of d(gradients)/d(parameters), by power iteration.

    ``gradients`` must come from ``torch.autograd.grad(..., create_graph=True)``.
    """
    generator = torch.Generator().manual_seed(settings.seed)
    vector = _normalized([torch.randn(p.shape, generator=generator).to(p) for p in parameters])
    estimate: float | None = None
    for _ in range(settings.max_iterations):
        product = torch.autograd.grad(gradients, parameters, grad_outputs=vector, retain_graph=True)
        new_estimate = float(sum((h * v).sum() for h, v in zip(product, vector)))  # Rayleigh quotient
        vector = _normalized([h.detach() for h in product])
        converged = estimate is not None and abs(new_estimate - estimate) <= settings.tolerance * (abs(estimate) + 1e-12)
        estimate = new_estimate
        if converged:
            break
    return float(estimate)


@dataclass(frozen=True)
class LayerSensitivity:
    layer: int  # 1-based
    eigenvalues: tuple[float, ...]  # one per batch

    @property
    def mean(self) -> float:
        return float(np.mean(self.eigenvalues))

    @property
    def std(self) -> float:
        return float(np.std(self.eigenvalues))

    @property
    def sensitivity(self) -> float:
        """Q-BERT's rule, Omega = |mean(lambda)| + std(lambda) over batches (the magnitude: a negative top
        eigenvalue is as much curvature as a positive one)."""
        return abs(self.mean) + self.std

    def as_dict(self) -> dict[str, object]:
        return {"layer": self.layer, "eigenvalues": list(self.eigenvalues), "mean": self.mean, "std": self.std, "sensitivity": self.sensitivity}


def layer_sensitivities(
    model: nn.Module,
    layers: Sequence[nn.Module],
    batches: Iterable[dict[str, Tensor]],
    loss_of: Callable[[nn.Module, dict[str, Tensor]], Tensor],
    settings: PowerIterationSettings,
) -> list[LayerSensitivity]:
    """Per-layer top eigenvalues over ``batches`` (run the model in eval mode: dropout would make H random)."""
    layer_parameters = [[p for p in layer.parameters() if p.requires_grad] for layer in layers]
    flat = [p for group in layer_parameters for p in group]
    per_layer: list[list[float]] = [[] for _ in layers]
    for batch in batches:
        loss = loss_of(model, batch)
        gradients = torch.autograd.grad(loss, flat, create_graph=True)
        start = 0
        for index, group in enumerate(layer_parameters):
            block = gradients[start : start + len(group)]
            start += len(group)
            per_layer[index].append(top_eigenvalue(block, group, settings))
        del gradients, loss
    return [LayerSensitivity(index + 1, tuple(values)) for index, values in enumerate(per_layer)]
