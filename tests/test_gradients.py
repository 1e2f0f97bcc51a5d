"""gradients: clipping checked by the norms it leaves (and by clipping twice),
multipliers by parameter and by name with the original's errors, and chain's
order."""

from __future__ import annotations

import pytest
import torch

from torchslim.gradients import (
    chain,
    clip_by_global_norm,
    clip_gradient_norms,
    clip_gradient_norms_fn,
    multiply_gradients,
)


def param(*shape: int) -> torch.nn.Parameter:
    return torch.nn.Parameter(torch.zeros(*shape))


@pytest.fixture
def pairs():
    """A big gradient (norm 50), a None gradient, and a small one (norm 0.5)."""
    big = torch.tensor([[30.0, 40.0], [0.0, 0.0]])
    small = torch.tensor([0.3, 0.4, 0.0])
    return [(big, param(2, 2)), (None, param(1)), (small, param(3))]


def norms(grads_and_vars) -> list[float | None]:
    return [None if g is None else torch.linalg.vector_norm(g).item() for g, _ in grads_and_vars]


# --------------------------------------------------------------------- per-tensor clipping


def test_clip_gradient_norms_is_per_tensor(pairs):
    out = clip_gradient_norms(pairs, max_norm=1.0)
    assert norms(out) == pytest.approx([1.0, None, 0.5])
    # Direction kept; the small gradient is not scaled by the big one (as a global clip would).
    assert torch.allclose(out[0][0], pairs[0][0] / 50)
    assert torch.equal(out[2][0], pairs[2][0])


def test_clip_gradient_norms_keeps_params_and_none_positions(pairs):
    out = clip_gradient_norms(pairs, max_norm=1.0)
    assert len(out) == len(pairs) and all(a is b for (_, a), (_, b) in zip(out, pairs))
    assert out[1][0] is None


def test_clip_gradient_norms_is_idempotent(pairs):
    once = clip_gradient_norms(pairs, max_norm=2.0)
    twice = clip_gradient_norms(once, max_norm=2.0)
    for (a, _), (b, _) in zip(once, twice):
        assert (a is None and b is None) or torch.allclose(a, b)
    assert norms(twice) == pytest.approx([2.0, None, 0.5])


def test_clip_gradient_norms_leaves_its_input_alone(pairs):
    before = [(None if g is None else g.clone(), p) for g, p in pairs]
    snapshot = list(pairs)
    clip_gradient_norms(pairs, max_norm=1.0)
    assert pairs == snapshot
    for (g, _), (g0, _) in zip(pairs, before):
        assert (g is None and g0 is None) or torch.equal(g, g0)


def test_clip_gradient_norms_all_none_and_empty():
    p = param(2)
    assert clip_gradient_norms([(None, p)], max_norm=1.0) == [(None, p)]
    assert clip_gradient_norms([], max_norm=1.0) == []


def test_clip_gradient_norms_fn_does_the_same(pairs):
    transform = clip_gradient_norms_fn(1.0)
    for (a, pa), (b, pb) in zip(transform(pairs), clip_gradient_norms(pairs, 1.0)):
        assert pa is pb
        assert (a is None and b is None) or torch.equal(a, b)


# --------------------------------------------------------------------- global-norm clipping


def test_clip_by_global_norm_scales_jointly(pairs):
    out = clip_by_global_norm(5.0)(pairs)
    joint = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g, _ in out if g is not None]))
    assert joint.item() == pytest.approx(5.0)
    # Every gradient is scaled by the same factor: proportions kept.
    factor = 5.0 / (50.0 ** 2 + 0.5 ** 2) ** 0.5
    assert torch.allclose(out[0][0], pairs[0][0] * factor)
    assert torch.allclose(out[2][0], pairs[2][0] * factor)
    assert out[1][0] is None and out[1][1] is pairs[1][1]


def test_clip_by_global_norm_is_a_no_op_under_the_bound(pairs):
    out = clip_by_global_norm(100.0)(pairs)
    assert torch.equal(out[0][0], pairs[0][0]) and torch.equal(out[2][0], pairs[2][0])


def test_clip_by_global_norm_is_idempotent(pairs):
    clip = clip_by_global_norm(1.0)
    once, twice = clip(pairs), clip(clip(pairs))
    assert torch.allclose(once[0][0], twice[0][0]) and torch.allclose(once[2][0], twice[2][0])


# --------------------------------------------------------------------- multipliers


def test_multiply_by_parameter_key(pairs):
    (g0, p0), (_, p1), (g2, p2) = pairs
    out = multiply_gradients(pairs, {p0: 3.0})
    assert torch.equal(out[0][0], g0 * 3.0)
    assert out[1] == (None, p1)  # no multiplier: a None gradient passes through
    assert out[2][0] is g2
    assert torch.equal(pairs[0][0], g0)  # input not scaled in place


def test_multiply_by_name_key():
    model = torch.nn.Linear(2, 1)
    grads = [(torch.ones(1, 2), model.weight), (torch.ones(1), model.bias)]
    out = multiply_gradients(grads, {"bias": 0.5, model.weight: 2}, names=dict(model.named_parameters()))
    assert torch.equal(out[0][0], torch.full((1, 2), 2.0))
    assert torch.equal(out[1][0], torch.tensor([0.5]))


def test_multiply_with_a_tensor_factor():
    p = param(2)
    out = multiply_gradients([(torch.ones(2), p)], {p: torch.tensor(4.0)})
    assert torch.equal(out[0][0], torch.full((2,), 4.0))


@pytest.mark.parametrize(
    "multipliers, names, error, message",
    [
        ([("w", 1.0)], None, TypeError, "`gradient_multipliers` must be a dict of parameter or name -> factor, got list"),
        ({}, None, ValueError, "`gradient_multipliers` is empty; pass None"),
        ({"w": 2.0}, None, TypeError, "key 'w' is a name, but no `names` mapping"),
        ({"nope": 2.0}, "names", ValueError, "names 'nope', which is not a parameter; known names: none, w"),
        ({"w": "2"}, "names", TypeError, r"gradient_multipliers\['w'\] must be a number"),
        ({3: 2.0}, None, TypeError, "keys must be parameters or names, got 3"),
    ],
)
def test_multiply_gradients_errors(multipliers, names, error, message):
    w, none = param(2), param(1)
    named = {"w": w, "none": none} if names else None
    with pytest.raises(error, match=message):
        multiply_gradients([(torch.ones(2), w), (None, none)], multipliers, names=named)


def test_multiplier_for_a_none_gradient_raises():
    w, frozen = param(2), param(3)
    with pytest.raises(ValueError, match=r"parameter of shape \(3,\), but that parameter has no gradient"):
        multiply_gradients([(torch.ones(2), w), (None, frozen)], {frozen: 2.0})
    with pytest.raises(ValueError, match="has no gradient"):
        multiply_gradients([(None, frozen)], {"f": 2.0}, names={"f": frozen})


@pytest.mark.parametrize("bad", [(), None, ((torch.ones(1), param(1)),)])
def test_grads_and_vars_must_be_a_list(bad):
    message = "`grads_and_vars` must be a list of \\(gradient, parameter\\) pairs"
    with pytest.raises(TypeError, match=message):
        multiply_gradients(bad, {param(1): 1.0})
    with pytest.raises(TypeError, match=message):
        clip_gradient_norms(bad, 1.0)
    with pytest.raises(TypeError, match=message):
        clip_by_global_norm(1.0)(bad)


# --------------------------------------------------------------------- max_norm validation


@pytest.mark.parametrize(
    "max_norm, error, message",
    [
        (0, ValueError, "`max_norm` must be positive, got 0"),
        (-1.0, ValueError, "`max_norm` must be positive, got -1.0"),
        (float("nan"), ValueError, "`max_norm` must be positive"),
        ("1", TypeError, "`max_norm` must be a positive number, got '1'"),
        (None, TypeError, "`max_norm` must be a positive number, got None"),
        (True, TypeError, "`max_norm` must be a positive number, got True"),
    ],
)
def test_max_norm_must_be_a_positive_number(max_norm, error, message):
    for make in (clip_gradient_norms_fn, clip_by_global_norm, lambda m: clip_gradient_norms([], m)):
        with pytest.raises(error, match=message):
            make(max_norm)


# --------------------------------------------------------------------- chain


def test_chain_composes_left_to_right():
    p = param(1)
    add_one = lambda gv: [(g + 1, v) for g, v in gv]  # noqa: E731
    double = lambda gv: [(g * 2, v) for g, v in gv]  # noqa: E731
    assert chain(add_one, double)([(torch.tensor([1.0]), p)])[0][0].item() == 4.0
    assert chain(double, add_one)([(torch.tensor([1.0]), p)])[0][0].item() == 3.0


def test_chain_clip_then_multiply():
    p = param(2)
    transform = chain(clip_gradient_norms_fn(1.0), lambda gv: multiply_gradients(gv, {p: 10.0}))
    out = transform([(torch.tensor([3.0, 4.0]), p)])
    assert torch.allclose(out[0][0], torch.tensor([6.0, 8.0]))


def test_chain_skips_none_and_of_nothing_is_none():
    double = lambda gv: [(g * 2, v) for g, v in gv]  # noqa: E731
    assert chain() is None
    assert chain(None, None) is None
    assert chain(None, double) is double
    p = param(1)
    assert chain(double, None, double)([(torch.tensor([1.0]), p)])[0][0].item() == 4.0
