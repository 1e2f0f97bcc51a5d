"""losses: each loss against a hand computation or torch.nn.functional, the
per-step collection (get_total_loss), its isolation between contexts and
threads, and the errors raised on bad input."""

from __future__ import annotations

import math
import threading

import pytest
import torch
import torch.nn.functional as F

from torchslim import losses
from torchslim.losses import (
    collect_losses,
    get_losses,
    get_regularization_losses,
    get_total_loss,
)


def close(a: torch.Tensor, b: torch.Tensor | float, atol: float = 1e-6) -> bool:
    return torch.allclose(a, torch.as_tensor(b, dtype=a.dtype), atol=atol, rtol=1e-5)


@pytest.fixture
def logits_and_labels():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 4, generator=g)
    classes = torch.tensor([0, 3, 1, 2, 3, 0])
    return logits, classes, F.one_hot(classes, 4).float()


# --------------------------------------------------------------------- values


def test_log_loss_by_hand():
    loss = losses.log_loss(torch.tensor([0.9, 0.2, 0.6]), torch.tensor([1.0, 0.0, 0.0]))
    expected = -(math.log(0.9) + math.log(0.8) + math.log(0.4)) / 3
    assert close(loss, expected, atol=1e-5)


def test_log_loss_matches_binary_cross_entropy():
    g = torch.Generator().manual_seed(1)
    p = torch.rand(10, generator=g) * 0.98 + 0.01
    y = (torch.rand(10, generator=g) > 0.5).float()
    assert close(losses.log_loss(p, y), F.binary_cross_entropy(p, y), atol=1e-5)


def test_softmax_cross_entropy_matches_cross_entropy(logits_and_labels):
    logits, classes, onehot = logits_and_labels
    assert close(losses.softmax_cross_entropy(logits, onehot), F.cross_entropy(logits, classes))


@pytest.mark.parametrize("s", [0.1, 0.5, 1.0])
def test_softmax_cross_entropy_label_smoothing(logits_and_labels, s):
    logits, classes, onehot = logits_and_labels
    smoothed = onehot * (1 - s) + s / 4
    by_hand = -(smoothed * logits.log_softmax(-1)).sum(-1).mean()
    loss = losses.softmax_cross_entropy(logits, onehot, label_smoothing=s)
    assert close(loss, by_hand)
    assert close(loss, F.cross_entropy(logits, classes, label_smoothing=s))


def test_softmax_cross_entropy_per_example_weights(logits_and_labels):
    logits, classes, onehot = logits_and_labels
    weights = torch.tensor([1.0, 0.0, 2.0, 0.5, 0.0, 1.0])
    per_example = F.cross_entropy(logits, classes, reduction="none")
    expected = (per_example * weights).sum() / 4  # four non-zero weights
    assert close(losses.softmax_cross_entropy(logits, onehot, weights=weights), expected)


def test_sparse_softmax_cross_entropy(logits_and_labels):
    logits, classes, onehot = logits_and_labels
    assert close(losses.sparse_softmax_cross_entropy(logits, classes), F.cross_entropy(logits, classes))
    weights = torch.tensor([0.0, 1.0, 1.0, 3.0, 0.0, 0.0])
    expected = (F.cross_entropy(logits, classes, reduction="none") * weights).sum() / 3
    assert close(losses.sparse_softmax_cross_entropy(logits, classes, weights=weights), expected)
    # Same value as the one-hot version, smoothing included.
    assert close(losses.sparse_softmax_cross_entropy(logits, classes, label_smoothing=0.2),
                 losses.softmax_cross_entropy(logits, onehot, label_smoothing=0.2))


def test_sparse_softmax_cross_entropy_extra_axes():
    logits = torch.randn(2, 3, 5, generator=torch.Generator().manual_seed(2))
    labels = torch.tensor([[0, 4, 2], [1, 1, 3]])
    expected = F.cross_entropy(logits.permute(0, 2, 1), labels)
    assert close(losses.sparse_softmax_cross_entropy(logits, labels), expected)


@pytest.mark.parametrize("s", [0.0, 0.2, 1.0])
def test_sigmoid_cross_entropy_label_smoothing(s):
    x = torch.tensor([[2.0, -1.0, 0.0], [0.5, -3.0, 1.0]])
    y = torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 1.0]])
    t = y * (1 - s) + s / 2
    by_hand = -(t * torch.sigmoid(x).log() + (1 - t) * (1 - torch.sigmoid(x)).log()).mean()
    assert close(losses.sigmoid_cross_entropy(x, y, label_smoothing=s), by_hand, atol=1e-5)


def test_mean_squared_error_and_absolute_difference_by_hand():
    pred, labels = torch.tensor([1.0, 2.0, -1.0]), torch.tensor([0.0, 4.0, -1.0])
    assert close(losses.mean_squared_error(pred, labels), (1 + 4 + 0) / 3)
    assert close(losses.absolute_difference(pred, labels), (1 + 2 + 0) / 3)
    w = torch.tensor([2.0, 0.0, 1.0])
    assert close(losses.mean_squared_error(pred, labels, weights=w), (2 * 1 + 0 + 0) / 2)
    assert close(losses.absolute_difference(pred, labels, weights=3.0), 3 * (1 + 2 + 0) / 3)


def test_hinge_loss_maps_01_labels_to_signs():
    logits = torch.tensor([2.0, 0.5, -0.5, 3.0, 0.2])
    labels = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0])
    # y = [1, -1, -1, -1, 1]; max(0, 1 - y * x) = [0, 1.5, 0.5, 4, 0.8]
    assert close(losses.hinge_loss(logits, labels), (0 + 1.5 + 0.5 + 4 + 0.8) / 5)


@pytest.mark.parametrize(
    "weights, expected",
    [
        (torch.tensor([1.0, 0.0, 2.0, 0.0]), (1 + 6) / 2),  # sum / number of non-zero weights
        (torch.tensor([0.5, 0.5, 0.5, 0.5]), (1 + 2 + 3 + 4) * 0.5 / 4),
        (2.0, 2 * 2.5),
        (1, 2.5),
        (0.0, 0.0),
        (torch.zeros(4), 0.0),  # no non-zero weight: 0, not NaN
    ],
)
def test_compute_weighted_loss(weights, expected):
    loss = losses.compute_weighted_loss(torch.tensor([1.0, 2.0, 3.0, 4.0]), weights)
    assert loss.shape == ()
    assert close(loss, expected)


def test_compute_weighted_loss_broadcasts_weights_over_trailing_axes():
    per_element = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    # One weight per row counts once per element it covers: 3 non-zero weights.
    loss = losses.compute_weighted_loss(per_element, torch.tensor([[2.0], [0.0]]))
    assert close(loss, 2 * (1 + 2 + 3) / 3)


def test_zero_weights_give_finite_gradients():
    x = torch.tensor([1.0, 2.0], requires_grad=True)
    losses.compute_weighted_loss(x ** 2, torch.zeros(2)).backward()
    assert torch.equal(x.grad, torch.zeros(2))


def test_l2_regularization_loss():
    params = [torch.ones(2), torch.tensor([3.0])]
    with collect_losses():
        loss = losses.l2_regularization_loss(params, scale=0.1)
        assert close(loss, 0.1 * (1 + 1 + 9) / 2)
        assert get_regularization_losses() == [loss]
        assert get_losses() == []


# --------------------------------------------------------------------- the collection


def test_get_total_loss_sums_losses_and_regularization():
    w = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    pred, labels = torch.tensor([0.5, 1.0]), torch.tensor([0.0, 0.0])
    with collect_losses() as collection:
        a = losses.mean_squared_error(pred, labels)
        b = losses.absolute_difference(pred, labels)
        r = losses.l2_regularization_loss([w], scale=1.0)
        assert get_losses() == [a, b]
        assert collection.losses == [a, b]
        assert close(get_total_loss(), a + b + r)
        assert close(get_total_loss(add_regularization_losses=False), a + b)
        get_total_loss().backward()
    assert torch.equal(w.grad, w.detach())  # d/dw of ||w||^2 / 2


def test_get_losses_returns_a_copy():
    with collect_losses():
        losses.add_loss(torch.tensor(1.0))
        get_losses().append(torch.tensor(100.0))
        assert close(get_total_loss(), 1.0)


def test_loss_collection_none_records_nothing():
    with collect_losses():
        value = losses.log_loss(torch.tensor([0.9]), torch.tensor([1.0]), loss_collection=None)
        assert close(value, -math.log(0.9), atol=1e-5)
        assert get_losses() == []
        with pytest.raises(ValueError, match="found no losses"):
            get_total_loss()


def test_loss_can_go_to_the_regularization_collection():
    with collect_losses():
        losses.add_loss(torch.tensor(3.0), loss_collection=losses.REGULARIZATION_LOSSES)
        assert get_losses() == []
        assert close(get_total_loss(), 3.0)
        with pytest.raises(ValueError, match="found no losses"):
            get_total_loss(add_regularization_losses=False)


def test_outside_a_context_losses_return_values_and_record_nothing():
    value = losses.mean_squared_error(torch.tensor([2.0]), torch.tensor([0.0]))
    assert close(value, 4.0)
    losses.l2_regularization_loss([torch.ones(1)], scale=1.0)
    with collect_losses():
        assert get_losses() == [] and get_regularization_losses() == []


@pytest.mark.parametrize("fn", [get_total_loss, get_losses, get_regularization_losses])
def test_reading_the_collection_outside_a_context_raises(fn):
    with pytest.raises(RuntimeError, match=r"no loss collection.*collect_losses"):
        fn()


def test_no_losses_raises_value_error():
    with collect_losses(), pytest.raises(ValueError, match=r"get_total_loss\(\) found no losses"):
        get_total_loss()


def test_consecutive_contexts_do_not_share_losses():
    with collect_losses():
        losses.add_loss(torch.tensor(1.0))
    with collect_losses():
        assert get_losses() == []
        losses.add_loss(torch.tensor(2.0))
        assert close(get_total_loss(), 2.0)


def test_nested_contexts_are_separate():
    with collect_losses():
        losses.add_loss(torch.tensor(1.0))
        with collect_losses():
            assert get_losses() == []
            losses.add_loss(torch.tensor(10.0))
            assert close(get_total_loss(), 10.0)
        assert close(get_total_loss(), 1.0)


def test_context_is_closed_when_its_body_raises():
    with pytest.raises(KeyError), collect_losses():
        losses.add_loss(torch.tensor(1.0))
        raise KeyError("boom")
    with pytest.raises(RuntimeError):
        get_total_loss()


def test_threads_each_see_only_their_own_losses():
    barrier = threading.Barrier(2, timeout=10)
    seen: dict[int, tuple[list[float], float]] = {}
    errors: list[BaseException] = []

    def worker(k: int) -> None:
        try:
            with collect_losses():
                losses.add_loss(torch.tensor(float(k)))
                barrier.wait()  # both threads are now inside their own context
                losses.add_loss(torch.tensor(float(10 * k)))
                barrier.wait()  # both have added their second loss
                seen[k] = ([t.item() for t in get_losses()], get_total_loss().item())
        except BaseException as e:  # surfaced in the main thread below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(k,)) for k in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=20)
    assert not errors, errors
    assert seen == {1: ([1.0, 10.0], 11.0), 2: ([2.0, 20.0], 22.0)}


# --------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "fn, a_name, b_name",
    [
        (losses.log_loss, "predictions", "labels"),
        (losses.mean_squared_error, "predictions", "labels"),
        (losses.absolute_difference, "predictions", "labels"),
        (losses.hinge_loss, "logits", "labels"),
        (losses.sigmoid_cross_entropy, "logits", "multi_class_labels"),
        (losses.softmax_cross_entropy, "logits", "onehot_labels"),
    ],
)
def test_shape_mismatch_names_both_arguments(fn, a_name, b_name):
    with pytest.raises(ValueError, match=rf"`{a_name}` has shape \(3, 2\) but `{b_name}` has shape \(3, 1\)"):
        fn(torch.rand(3, 2), torch.rand(3, 1))


def test_sparse_labels_shape_mismatch():
    with pytest.raises(ValueError, match=r"`labels` must have shape \(3,\) \(logits without the class axis\), got \(4,\)"):
        losses.sparse_softmax_cross_entropy(torch.zeros(3, 5), torch.zeros(4, dtype=torch.long))


@pytest.mark.parametrize("s", [-0.1, 1.5, True, "0.1", float("nan")])
@pytest.mark.parametrize(
    "fn, labels",
    [
        (losses.softmax_cross_entropy, torch.tensor([[1.0, 0.0]])),
        (losses.sparse_softmax_cross_entropy, torch.tensor([0])),
        (losses.sigmoid_cross_entropy, torch.tensor([[1.0, 0.0]])),
    ],
)
def test_label_smoothing_outside_unit_interval(fn, labels, s):
    with pytest.raises(ValueError, match=r"`label_smoothing` must be a number in \[0, 1\]"):
        fn(torch.zeros(1, 2), labels, label_smoothing=s)


def test_weights_that_do_not_broadcast():
    with pytest.raises(ValueError, match=r"`weights` of shape \(2,\) does not broadcast to the losses' shape \(3,\)"):
        losses.mean_squared_error(torch.zeros(3), torch.zeros(3), weights=torch.ones(2))


def test_weights_must_not_grow_the_losses_shape():
    # A common slip: one weight per example as a column [batch, 1] against losses [batch].
    with pytest.raises(ValueError, match="does not broadcast"):
        losses.compute_weighted_loss(torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([[1.0], [0.0], [2.0], [0.0]]))


@pytest.mark.parametrize("weights", ["1", [1.0, 2.0], None, True])
def test_weights_of_the_wrong_type(weights):
    with pytest.raises(TypeError, match="`weights` must be a number or a tensor"):
        losses.compute_weighted_loss(torch.ones(2), weights)


def test_bad_loss_collection_name_inside_a_context():
    with collect_losses():
        with pytest.raises(ValueError, match=r"`loss_collection` must be 'losses', 'regularization_losses' or None, got 'loss'"):
            losses.log_loss(torch.tensor([0.5]), torch.tensor([1.0]), loss_collection="loss")
        with pytest.raises(ValueError, match="`loss_collection` must be"):
            get_losses("loss")


def test_bad_loss_collection_name_outside_a_context():
    with pytest.raises(ValueError, match="`loss_collection` must be"):
        losses.log_loss(torch.tensor([0.5]), torch.tensor([1.0]), loss_collection="loss")


def test_other_bad_arguments():
    with pytest.raises(TypeError, match="`loss` must be a tensor, got float"):
        losses.add_loss(1.0)
    with pytest.raises(TypeError, match="`losses` must be a tensor, got list"):
        losses.compute_weighted_loss([1.0, 2.0])
    with pytest.raises(ValueError, match="`scale` must be a non-negative number, got -1"):
        losses.l2_regularization_loss([torch.ones(1)], scale=-1)
    with pytest.raises(ValueError, match="`params` is empty"):
        losses.l2_regularization_loss([], scale=0.1)


def test_class_indices_given_to_the_one_hot_loss_point_to_the_sparse_one():
    with pytest.raises(ValueError, match=r"class indices .* use sparse_softmax_cross_entropy"):
        losses.softmax_cross_entropy(torch.zeros(3, 4), torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match=r"log_loss is a binary loss: .* use sparse_softmax_cross_entropy"):
        losses.log_loss(torch.rand(3, 4), torch.tensor([0, 1, 2]))


def test_a_log_loss_outside_its_domain_is_caught_by_check_numerics_by_name():
    from torchslim.learning import NonFiniteError, create_train_op

    model = torch.nn.Linear(2, 1)

    def total_loss(batch):
        losses.log_loss(model(batch).squeeze(1).abs() + 1.5, torch.zeros(4))  # "probabilities" above 1: NaN
        return losses.get_total_loss()

    op = create_train_op(total_loss, torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(NonFiniteError, match=r"the loss is nan \(losses/log_loss = nan\)"):
        op(torch.ones(4, 2))
