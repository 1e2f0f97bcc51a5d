"""Gradient transforms: pure functions over ``(gradient, parameter)`` pairs.

``create_train_op`` turns its flags into a chain of these (multiply, then clip,
then the user's ``transform_grads_fn``). Each helper returns new pairs and leaves
its input alone; ``None`` gradients pass through untouched.

>>> w = torch.nn.Parameter(torch.zeros(2))
>>> clipped = clip_gradient_norms([(torch.tensor([3.0, 4.0]), w)], max_norm=1.0)
>>> clipped[0][0]
tensor([0.6000, 0.8000])
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from torchslim._checks import check_positive
from torchslim._types import GradientTransform, GradsAndVars

__all__ = [
    "chain",
    "clip_by_global_norm",
    "clip_gradient_norms",
    "clip_gradient_norms_fn",
    "multiply_gradients",
]


def _check_pairs(grads_and_vars: object) -> None:
    if not isinstance(grads_and_vars, list):
        raise TypeError(
            f"`grads_and_vars` must be a list of (gradient, parameter) pairs, got {type(grads_and_vars).__name__}"
        )


def multiply_gradients(
    grads_and_vars: GradsAndVars,
    gradient_multipliers: Mapping[torch.Tensor | str, float],
    names: Mapping[str, torch.Tensor] | None = None,
) -> GradsAndVars:
    """Scale the gradients of chosen parameters.

    Args:
        grads_and_vars: ``(gradient, parameter)`` pairs.
        gradient_multipliers: maps a parameter, or its name in ``names``, to a factor.
        names: name -> parameter (e.g. ``dict(model.named_parameters())``), needed
            only for string keys.

    Returns:
        New pairs; gradients without a multiplier are passed through as they are.

    Raises:
        TypeError: ``gradient_multipliers`` is not a dict, or has a string key and no ``names``.
        ValueError: ``gradient_multipliers`` is empty, names an unknown parameter, or
            asks to scale a ``None`` gradient.

    >>> w = torch.nn.Parameter(torch.zeros(2))
    >>> multiply_gradients([(torch.ones(2), w)], {w: 3.0})[0][0]
    tensor([3., 3.])
    """
    _check_pairs(grads_and_vars)
    factors = _resolve_multipliers(gradient_multipliers, names)
    out: GradsAndVars = []
    for grad, param in grads_and_vars:
        factor = factors.get(param)
        if factor is not None:
            if grad is None:
                raise ValueError(
                    f"gradient_multipliers asks to scale the gradient of a parameter of shape "
                    f"{tuple(param.shape)}, but that parameter has no gradient (None)"
                )
            grad = grad * factor
        out.append((grad, param))
    return out


def _resolve_multipliers(
    gradient_multipliers: object, names: Mapping[str, torch.Tensor] | None
) -> dict[torch.Tensor, float]:
    if not isinstance(gradient_multipliers, Mapping):
        raise TypeError(
            f"`gradient_multipliers` must be a dict of parameter or name -> factor, "
            f"got {type(gradient_multipliers).__name__}"
        )
    if not gradient_multipliers:
        raise ValueError("`gradient_multipliers` is empty; pass None for no multipliers")
    factors: dict[torch.Tensor, float] = {}
    for key, factor in gradient_multipliers.items():
        if isinstance(factor, bool) or not isinstance(factor, (int, float, torch.Tensor)):
            raise TypeError(f"gradient_multipliers[{key!r}] must be a number, got {factor!r}")
        if isinstance(key, str):
            if names is None:
                raise TypeError(
                    f"gradient_multipliers key {key!r} is a name, but no `names` mapping was given to resolve it"
                )
            if key not in names:
                raise ValueError(
                    f"gradient_multipliers names {key!r}, which is not a parameter; "
                    f"known names: {', '.join(sorted(names)) or '(none)'}"
                )
            key = names[key]
        elif not isinstance(key, torch.Tensor):
            raise TypeError(f"gradient_multipliers keys must be parameters or names, got {key!r}")
        factors[key] = float(factor)
    return factors


def clip_gradient_norms(grads_and_vars: GradsAndVars, max_norm: float) -> GradsAndVars:
    """Clip each gradient tensor to L2 norm ``max_norm`` (per tensor, as TF's ``clip_by_norm``).

    A gradient ``g`` becomes ``g * max_norm / max(||g||, max_norm)``; one fused
    pass computes all the norms.

    >>> w = torch.nn.Parameter(torch.zeros(2))
    >>> g = clip_gradient_norms([(torch.tensor([0.3, 0.4]), w)], max_norm=1.0)[0][0]
    >>> g  # already within the bound: unchanged
    tensor([0.3000, 0.4000])
    """
    _check_pairs(grads_and_vars)
    check_positive(max_norm, "max_norm")
    grads = [g for g, _ in grads_and_vars if g is not None]
    if not grads:
        return list(grads_and_vars)
    norms = torch._foreach_norm(grads)
    # scale = max_norm / max(norm, max_norm), computed without a host sync.
    scales = torch._foreach_clamp_min(norms, max_norm)
    torch._foreach_reciprocal_(scales)
    torch._foreach_mul_(scales, max_norm)
    clipped = iter(torch._foreach_mul(grads, scales))
    return [(next(clipped) if g is not None else None, p) for g, p in grads_and_vars]


def clip_gradient_norms_fn(max_norm: float) -> GradientTransform:
    """Return a ``transform_grads_fn`` that clips each gradient to ``max_norm``."""
    check_positive(max_norm, "max_norm")

    def clip(grads_and_vars: GradsAndVars) -> GradsAndVars:
        return clip_gradient_norms(grads_and_vars, max_norm)

    return clip


def clip_by_global_norm(max_norm: float) -> GradientTransform:
    """Return a transform that scales all gradients together so their joint L2 norm is at most ``max_norm``.

    >>> w, v = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    >>> out = clip_by_global_norm(1.0)([(torch.tensor([3.0]), w), (torch.tensor([4.0]), v)])
    >>> [g.item() for g, _ in out]
    [0.6000000238418579, 0.800000011920929]
    """
    check_positive(max_norm, "max_norm")

    def clip(grads_and_vars: GradsAndVars) -> GradsAndVars:
        _check_pairs(grads_and_vars)
        grads = [g for g, _ in grads_and_vars if g is not None]
        if not grads:
            return list(grads_and_vars)
        total = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
        scale = max_norm / torch.clamp(total, min=max_norm)
        return [(g * scale if g is not None else None, p) for g, p in grads_and_vars]

    return clip


def chain(*transforms: GradientTransform | None) -> GradientTransform | None:
    """Compose transforms left to right; ``None`` entries are skipped, and none at all gives ``None``."""
    kept = [t for t in transforms if t is not None]
    if not kept:
        return None
    if len(kept) == 1:
        return kept[0]

    def chained(grads_and_vars: GradsAndVars) -> GradsAndVars:
        for transform in kept:
            grads_and_vars = transform(grads_and_vars)
        return grads_and_vars

    return chained
