"""Loss functions that also record themselves, and the per-step loss collection.

TF-Slim added every loss to a graph collection and summed it with
``get_total_loss()``. Here the collection lives in a context that the train op
opens around each call of the loss function, so losses never leak between
steps, train ops or threads (it is a ``contextvars`` variable, like autocast's
state). Outside such a context a loss function simply returns its value.

The seed's workflow, inside the function given to ``create_train_op``:

>>> model = torch.nn.Sequential(torch.nn.Linear(4, 1), torch.nn.Sigmoid())
>>> def total_loss(batch):
...     images, labels = batch
...     log_loss(model(images).squeeze(1), labels)
...     return get_total_loss()
>>> with collect_losses():
...     loss = total_loss((torch.randn(8, 4), torch.ones(8)))
>>> loss.shape
torch.Size([])
"""

from __future__ import annotations

import contextvars
from collections.abc import Iterable

import torch
import torch.nn.functional as F

__all__ = [
    "LOSSES",
    "REGULARIZATION_LOSSES",
    "LossCollection",
    "absolute_difference",
    "add_loss",
    "collect_losses",
    "compute_weighted_loss",
    "get_losses",
    "get_regularization_loss",
    "get_regularization_losses",
    "get_total_loss",
    "hinge_loss",
    "l2_regularization_loss",
    "log_loss",
    "mean_squared_error",
    "sigmoid_cross_entropy",
    "softmax_cross_entropy",
    "sparse_softmax_cross_entropy",
]

LOSSES = "losses"
REGULARIZATION_LOSSES = "regularization_losses"


class LossCollection:
    """The losses added during one step, by collection name."""

    __slots__ = ("losses", "regularization_losses", "names")

    def __init__(self) -> None:
        self.losses: list[torch.Tensor] = []
        self.regularization_losses: list[torch.Tensor] = []
        self.names: dict[int, str] = {}  # id(loss) -> name, for summaries

    def add(self, loss: torch.Tensor, loss_collection: str = LOSSES, name: str = "loss") -> None:
        if loss_collection == LOSSES:
            self.losses.append(loss)
        elif loss_collection == REGULARIZATION_LOSSES:
            self.regularization_losses.append(loss)
        else:
            raise ValueError(
                f"`loss_collection` must be {LOSSES!r}, {REGULARIZATION_LOSSES!r} or None, got {loss_collection!r}"
            )
        self.names[id(loss)] = name

    def named(self) -> list[tuple[str, torch.Tensor]]:
        """``(collection/name, loss)`` for every loss, names made unique with ``_1``, ``_2``..."""
        out: list[tuple[str, torch.Tensor]] = []
        seen: dict[str, int] = {}
        for collection, items in ((LOSSES, self.losses), (REGULARIZATION_LOSSES, self.regularization_losses)):
            for loss in items:
                tag = f"{collection}/{self.names.get(id(loss), 'loss')}"
                count = seen.get(tag, 0)
                seen[tag] = count + 1
                out.append((tag if count == 0 else f"{tag}_{count}", loss))
        return out


_current: contextvars.ContextVar[LossCollection | None] = contextvars.ContextVar(
    "torchslim_losses", default=None
)


class collect_losses:
    """Open a fresh loss collection for the code inside (train ops do this each step).

    A class rather than a generator so that entering it costs well under a microsecond.
    """

    __slots__ = ("_token", "collection")

    def __enter__(self) -> LossCollection:
        self.collection = LossCollection()
        self._token = _current.set(self.collection)
        return self.collection

    def __exit__(self, *exc: object) -> None:
        _current.reset(self._token)


def _collection(caller: str) -> LossCollection:
    collection = _current.get()
    if collection is None:
        raise RuntimeError(
            f"{caller}() found no loss collection: call it inside the loss function given to "
            "create_train_op, or inside `with torchslim.losses.collect_losses():`"
        )
    return collection


def add_loss(loss: torch.Tensor, loss_collection: str | None = LOSSES, name: str = "loss") -> None:
    """Add ``loss`` to the current step's collection (``None``: add it nowhere) under ``name``.

    Outside a collection context this does nothing, so loss functions stay usable
    on their own.
    """
    if not isinstance(loss, torch.Tensor):
        raise TypeError(f"`loss` must be a tensor, got {type(loss).__name__}")
    if loss_collection not in (LOSSES, REGULARIZATION_LOSSES, None):
        raise ValueError(
            f"`loss_collection` must be {LOSSES!r}, {REGULARIZATION_LOSSES!r} or None, got {loss_collection!r}"
        )
    collection = _current.get()
    if collection is not None and loss_collection is not None:
        collection.add(loss, loss_collection, name)


def get_losses(loss_collection: str = LOSSES) -> list[torch.Tensor]:
    """The losses added so far in this step (a copy of the list)."""
    collection = _collection("get_losses")
    if loss_collection == REGULARIZATION_LOSSES:
        return list(collection.regularization_losses)
    if loss_collection != LOSSES:
        raise ValueError(f"`loss_collection` must be {LOSSES!r} or {REGULARIZATION_LOSSES!r}, got {loss_collection!r}")
    return list(collection.losses)


def get_regularization_losses() -> list[torch.Tensor]:
    """The regularization losses added so far in this step."""
    return get_losses(REGULARIZATION_LOSSES)


def get_regularization_loss() -> torch.Tensor | None:
    """The sum of this step's regularization losses, or ``None`` when there are none."""
    regs = get_regularization_losses()
    return _sum(regs) if regs else None


def get_total_loss(add_regularization_losses: bool = True) -> torch.Tensor:
    """Sum of this step's losses, plus its regularization losses unless told not to.

    Raises:
        ValueError: no loss has been added in this step.
    """
    collection = _collection("get_total_loss")
    losses = list(collection.losses)
    if add_regularization_losses:
        losses += collection.regularization_losses
    if not losses:
        raise ValueError(
            "get_total_loss() found no losses in this step: add one with a torchslim.losses "
            "function (e.g. log_loss) or add_loss() before calling it"
        )
    return _sum(losses)


def _sum(tensors: list[torch.Tensor]) -> torch.Tensor:
    total = tensors[0]
    for t in tensors[1:]:
        total = total + t
    return total


def compute_weighted_loss(
    losses: torch.Tensor, weights: float | torch.Tensor = 1.0, loss_collection: str | None = LOSSES,
    scope: str | None = None,
) -> torch.Tensor:
    """Weighted mean of ``losses``: ``sum(losses * weights) / (number of non-zero weights)``.

    ``weights`` is a number or a tensor that broadcasts to ``losses`` (e.g. one
    weight per example). The result is added to ``loss_collection`` under the
    name ``scope`` (every loss function takes ``scope``; it defaults to the
    function's name and becomes the summary tag ``losses/<scope>``).

    >>> compute_weighted_loss(torch.tensor([1.0, 3.0]), torch.tensor([1.0, 0.0]))
    tensor(1.)
    """
    if not isinstance(losses, torch.Tensor):
        raise TypeError(f"`losses` must be a tensor, got {type(losses).__name__}")
    if isinstance(weights, torch.Tensor):
        weights = weights.to(losses.dtype)
        try:
            fits = torch.broadcast_shapes(weights.shape, losses.shape) == losses.shape
        except RuntimeError:
            fits = False
        if not fits:  # weights may broadcast to the losses, never make them bigger
            raise ValueError(
                f"`weights` of shape {tuple(weights.shape)} does not broadcast to the losses' shape "
                f"{tuple(losses.shape)}"
            )
        weighted = losses * weights
        present = torch.broadcast_to(weights != 0, weighted.shape).sum()
        loss = weighted.sum() / present.clamp(min=1)
    elif isinstance(weights, (int, float)) and not isinstance(weights, bool):
        if _is_one(weights):  # the default: no multiply, forward or backward (mean() * 1.0 is the same bits)
            loss = losses.mean()
        else:
            loss = losses.mean() * weights if weights != 0 else losses.sum() * 0.0
    else:
        raise TypeError(f"`weights` must be a number or a tensor, got {type(weights).__name__}")
    add_loss(loss, loss_collection, scope or "weighted_loss")
    return loss


def _check_same_shape(a: torch.Tensor, b: torch.Tensor, a_name: str, b_name: str) -> None:
    if a.shape != b.shape:
        raise ValueError(f"`{a_name}` has shape {tuple(a.shape)} but `{b_name}` has shape {tuple(b.shape)}")


def log_loss(
    predictions: torch.Tensor,
    labels: torch.Tensor,
    weights: float | torch.Tensor = 1.0,
    epsilon: float = 1e-7,
    loss_collection: str | None = LOSSES,
    scope: str | None = None,
) -> torch.Tensor:
    """Binary log loss of probabilities ``predictions`` against 0/1 ``labels``.

    ``predictions`` are probabilities in [0, 1] (a sigmoid's output), shaped like
    ``labels``. A value outside [0, 1] makes the loss NaN, which ``check_numerics``
    reports at that step, naming this loss; for logits use
    :func:`sigmoid_cross_entropy`, and for the scores of several classes
    :func:`sparse_softmax_cross_entropy`.

    >>> log_loss(torch.tensor([0.9, 0.1]), torch.tensor([1.0, 0.0]))
    tensor(0.1054)
    """
    if predictions.dim() == labels.dim() + 1 and predictions.shape[:-1] == labels.shape:
        raise ValueError(f"log_loss is a binary loss: `predictions` of shape {tuple(predictions.shape)} look like the "
                         f"scores of {predictions.shape[-1]} classes for `labels` of shape {tuple(labels.shape)}; "
                         "use sparse_softmax_cross_entropy(logits, labels) for class indices")
    _check_same_shape(predictions, labels, "predictions", "labels")
    labels = labels.to(predictions.dtype)
    losses = -labels * torch.log(predictions + epsilon) - (1 - labels) * torch.log(1 - predictions + epsilon)
    return compute_weighted_loss(losses, weights, loss_collection, scope or "log_loss")


def softmax_cross_entropy(
    logits: torch.Tensor,
    onehot_labels: torch.Tensor,
    weights: float | torch.Tensor = 1.0,
    label_smoothing: float = 0.0,
    loss_collection: str | None = LOSSES,
    scope: str | None = None,
) -> torch.Tensor:
    """Softmax cross-entropy of ``logits`` [batch, classes] against one-hot (or soft) labels.

    With ``label_smoothing`` s, labels become ``labels * (1 - s) + s / classes``.
    ``weights`` is a number or one weight per example.

    >>> softmax_cross_entropy(torch.tensor([[0.0, 0.0]]), torch.tensor([[1.0, 0.0]]))
    tensor(0.6931)
    """
    if not onehot_labels.is_floating_point() and onehot_labels.shape == logits.shape[:-1]:
        raise ValueError(f"`onehot_labels` holds class indices of shape {tuple(onehot_labels.shape)}; "
                         f"softmax_cross_entropy takes one-hot labels shaped like the logits {tuple(logits.shape)}: "
                         "use sparse_softmax_cross_entropy(logits, labels) for class indices")
    _check_same_shape(logits, onehot_labels, "logits", "onehot_labels")
    _check_smoothing(label_smoothing)
    labels = onehot_labels.to(logits.dtype)
    if label_smoothing:
        labels = labels * (1 - label_smoothing) + label_smoothing / logits.shape[-1]
    losses = -(labels * F.log_softmax(logits, dim=-1)).sum(dim=-1)
    return compute_weighted_loss(losses, weights, loss_collection, scope or "softmax_cross_entropy")


def sparse_softmax_cross_entropy(
    logits: torch.Tensor,
    labels: torch.Tensor,
    weights: float | torch.Tensor = 1.0,
    label_smoothing: float = 0.0,
    loss_collection: str | None = LOSSES,
    scope: str | None = None,
) -> torch.Tensor:
    """Softmax cross-entropy against integer class ``labels`` [batch], as PyTorch users hold them.

    >>> sparse_softmax_cross_entropy(torch.tensor([[0.0, 0.0]]), torch.tensor([0]))
    tensor(0.6931)
    """
    if labels.shape != logits.shape[:-1]:
        raise ValueError(
            f"`labels` must have shape {tuple(logits.shape[:-1])} (logits without the class axis), "
            f"got {tuple(labels.shape)}"
        )
    _check_smoothing(label_smoothing)
    flat_logits, flat_labels = logits.reshape(-1, logits.shape[-1]), labels.reshape(-1)
    if _is_one(weights):  # the default: PyTorch's fused mean, one kernel forward and backward instead of two
        loss = F.cross_entropy(flat_logits, flat_labels, label_smoothing=label_smoothing)
        add_loss(loss, loss_collection, scope or "sparse_softmax_cross_entropy")
        return loss
    losses = F.cross_entropy(flat_logits, flat_labels, reduction="none", label_smoothing=label_smoothing)
    return compute_weighted_loss(losses.reshape(labels.shape), weights, loss_collection,
                                 scope or "sparse_softmax_cross_entropy")


def _is_one(weights: object) -> bool:
    """``weights`` is the plain number 1 (the default): a weighted mean is then the plain mean."""
    return isinstance(weights, (int, float)) and not isinstance(weights, bool) and weights == 1


def sigmoid_cross_entropy(
    logits: torch.Tensor,
    multi_class_labels: torch.Tensor,
    weights: float | torch.Tensor = 1.0,
    label_smoothing: float = 0.0,
    loss_collection: str | None = LOSSES,
    scope: str | None = None,
) -> torch.Tensor:
    """Sigmoid cross-entropy of ``logits`` against 0/1 labels of the same shape.

    With ``label_smoothing`` s, labels become ``labels * (1 - s) + s / 2``.

    >>> sigmoid_cross_entropy(torch.tensor([0.0]), torch.tensor([1.0]))
    tensor(0.6931)
    """
    _check_same_shape(logits, multi_class_labels, "logits", "multi_class_labels")
    _check_smoothing(label_smoothing)
    labels = multi_class_labels.to(logits.dtype)
    if label_smoothing:
        labels = labels * (1 - label_smoothing) + 0.5 * label_smoothing
    losses = F.binary_cross_entropy_with_logits(logits, labels, reduction="none")
    return compute_weighted_loss(losses, weights, loss_collection, scope or "sigmoid_cross_entropy")


def mean_squared_error(
    predictions: torch.Tensor,
    labels: torch.Tensor,
    weights: float | torch.Tensor = 1.0,
    loss_collection: str | None = LOSSES,
    scope: str | None = None,
) -> torch.Tensor:
    """Weighted mean of ``(predictions - labels) ** 2``.

    >>> mean_squared_error(torch.tensor([1.0, 2.0]), torch.tensor([0.0, 0.0]))
    tensor(2.5000)
    """
    _check_same_shape(predictions, labels, "predictions", "labels")
    squared = (predictions - labels.to(predictions.dtype)) ** 2
    return compute_weighted_loss(squared, weights, loss_collection, scope or "mean_squared_error")


def absolute_difference(
    predictions: torch.Tensor,
    labels: torch.Tensor,
    weights: float | torch.Tensor = 1.0,
    loss_collection: str | None = LOSSES,
    scope: str | None = None,
) -> torch.Tensor:
    """Weighted mean of ``|predictions - labels|``.

    >>> absolute_difference(torch.tensor([1.0, -2.0]), torch.tensor([0.0, 0.0]))
    tensor(1.5000)
    """
    _check_same_shape(predictions, labels, "predictions", "labels")
    absolute = (predictions - labels.to(predictions.dtype)).abs()
    return compute_weighted_loss(absolute, weights, loss_collection, scope or "absolute_difference")


def hinge_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    weights: float | torch.Tensor = 1.0,
    loss_collection: str | None = LOSSES,
    scope: str | None = None,
) -> torch.Tensor:
    """Hinge loss ``max(0, 1 - y * logits)`` with 0/1 ``labels`` mapped to y = -1/+1.

    >>> hinge_loss(torch.tensor([2.0, 0.5]), torch.tensor([1.0, 0.0]))
    tensor(0.7500)
    """
    _check_same_shape(logits, labels, "logits", "labels")
    signs = 2 * labels.to(logits.dtype) - 1
    return compute_weighted_loss(F.relu(1 - signs * logits), weights, loss_collection, scope or "hinge_loss")


def l2_regularization_loss(params: Iterable[torch.Tensor], scale: float) -> torch.Tensor:
    """``scale * sum(||p||^2) / 2`` over ``params``, added as a regularization loss (TF's ``l2_regularizer``).

    >>> with collect_losses():
    ...     _ = l2_regularization_loss([torch.ones(2)], scale=0.1)
    ...     get_regularization_losses()
    [tensor(0.1000)]
    """
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or scale < 0:
        raise ValueError(f"`scale` must be a non-negative number, got {scale!r}")
    params = list(params)
    if not params:
        raise ValueError("`params` is empty")
    loss = scale * 0.5 * _sum([p.pow(2).sum() for p in params])
    add_loss(loss, REGULARIZATION_LOSSES, "l2_regularization")
    return loss


def _check_smoothing(label_smoothing: float) -> None:
    if isinstance(label_smoothing, bool) or not isinstance(label_smoothing, (int, float)) or not 0 <= label_smoothing <= 1:
        raise ValueError(f"`label_smoothing` must be a number in [0, 1], got {label_smoothing!r}")
