"""The formulas of `cpt merge`, one tensor at a time, on float32 tensors.

Each function returns a new tensor and leaves its arguments as they were. At most one temporary the
size of an argument is made, so that a merge's memory is a few copies of its largest tensor.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

# Below this sine of the angle between two tensors, slerp's coefficients (ratios of sines) lose
# their precision; the tensors are then (anti)parallel and interpolated linearly.
_DEGENERATE_SINE = 1e-6


def weighted_sum(terms: Iterable[tuple[float, torch.Tensor]]) -> torch.Tensor:
    """``sum(w * x)`` over ``(w, x)`` pairs; ``terms`` may be a generator, so that only one ``x``
    (each input's copy of the tensor) is alive beside the sum. With weights that add up to 1 this
    is the weighted average of the inputs."""
    total = None
    for weight, tensor in terms:
        if total is None:
            total = tensor * weight
        else:
            total.add_(tensor, alpha=weight)
    if total is None:
        raise ValueError("weighted_sum needs at least one term")
    return total


def linear(a: torch.Tensor, b: torch.Tensor, alpha: float) -> torch.Tensor:
    """``(1 - alpha) * a + alpha * b``. torch.lerp is exact at both ends (``a`` at 0, ``b`` at 1)
    and returns ``a`` itself when ``a == b``, which the plain formula does not guarantee."""
    return torch.lerp(a, b, alpha)


def slerp(a: torch.Tensor, b: torch.Tensor, alpha: float) -> torch.Tensor:
    """Spherical interpolation of ``a`` and ``b`` seen as two flat vectors.

    ``sin((1 - alpha) t) / sin t * a + sin(alpha t) / sin t * b`` where ``t`` is the angle between
    them (Shoemake's formula applied to the tensors as they are: equal norms stay on their sphere,
    unequal ones move in the plane the two span). The result is ``a`` at 0 and ``b`` at 1 exactly.
    When ``a`` or ``b`` is zero, or they are parallel or anti-parallel, the angle says nothing
    (or the great circle is not unique): the result is then :func:`linear`.
    """
    angle = _angle(a, b)
    sine = math.sin(angle) if angle is not None else 0.0
    if sine < _DEGENERATE_SINE:
        return linear(a, b, alpha)
    return torch.mul(a, math.sin((1 - alpha) * angle) / sine).add_(b, alpha=math.sin(alpha * angle) / sine)


def _angle(a: torch.Tensor, b: torch.Tensor) -> float | None:
    """The angle between ``a`` and ``b`` in [0, pi], None when either is zero.

    ``2 atan2(|u - v|, |u + v|)`` of the unit vectors u, v: accurate at every angle, where the
    arccosine of a rounded cosine is not near 0 and pi (it makes ``slerp(a, a)`` drift from ``a``).
    """
    norm_a, norm_b = float(torch.linalg.vector_norm(a)), float(torch.linalg.vector_norm(b))
    if norm_a == 0 or norm_b == 0 or not math.isfinite(norm_a * norm_b):
        return None
    unit = a / norm_a
    chord = float(torch.linalg.vector_norm(unit.sub_(b, alpha=1 / norm_b)))  # |u - v|
    other = float(torch.linalg.vector_norm(unit.add_(b, alpha=2 / norm_b)))  # |u + v|
    return 2 * math.atan2(chord, other)


def residual(onto: torch.Tensor, base: torch.Tensor, instruct: torch.Tensor) -> torch.Tensor:
    """``onto + (instruct - base)``: what instruction tuning added to ``base``, added to ``onto``."""
    return torch.sub(instruct, base).add_(onto)
