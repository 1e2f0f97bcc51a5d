"""Summaries for TensorBoard: what to record (the ``add_*`` helpers) and where it goes (writers).

The helpers keep TF-Slim's names and naming rules: a summary's tag is
``[prefix/]name[/postfix]``, ``name`` defaulting to the tensor's ``state_dict``
name when it is a variable of the model being trained. A value may be a tensor
(a parameter is read live when the summary is written), a number, or a callable
returning one.

There is no global registry. Summaries go to the collection of the current
context (per thread, like autocast's state): ``learning.train`` adopts those
added before it starts (``add_histogram_summaries(model.parameters())``) and
opens its own collection for the run, into which the loss function may add more
during a step (an activation's zero fraction). On steps where no summary is due,
adding one records nothing and reads nothing from the device. A collection can
also be held explicitly: ``with summaries.collecting(SummaryCollection()) as c:``.

>>> collection = SummaryCollection()
>>> with collecting(collection):
...     _ = add_scalar_summary(torch.tensor(3.0), "my_score", prefix="eval")
...     _ = add_zero_fraction_summary(torch.tensor([0.0, 1.0]), "relu1")
>>> write_summaries(collection, NullWriter(), step=1)
{'eval/my_score': 3.0, 'relu1/Fraction_of_Zero_Values': 0.5}
"""

from __future__ import annotations

import contextvars
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from torchslim._types import GradsAndVars
from torchslim._writers import (
    JsonlWriter,
    MultiWriter,
    NullWriter,
    SummaryWriter,
    TensorBoardWriter,
    default_writer,
)

__all__ = [
    "JsonlWriter",
    "MultiWriter",
    "NullWriter",
    "Summary",
    "SummaryCollection",
    "SummaryWriter",
    "TensorBoardWriter",
    "add_gradients_summaries",
    "add_histogram_summaries",
    "add_histogram_summary",
    "add_image_summaries",
    "add_image_summary",
    "add_scalar_summaries",
    "add_scalar_summary",
    "add_zero_fraction_summaries",
    "add_zero_fraction_summary",
    "collecting",
    "default_writer",
    "recording",
    "write_summaries",
]

log = logging.getLogger("torchslim")

# ---------------------------------------------------------------- what to record


@dataclass(frozen=True)
class Summary:
    """One thing to record: its kind, its value, and how its tag is made."""

    kind: str
    value: Any
    name: str | None = None
    prefix: str | None = None
    postfix: str | None = None
    print_summary: bool = False
    data_format: str = "NHWC"
    key: Any = None  # whose state_dict name stands in for a missing `name` (default: the value)

    def tag(self, names: Mapping[int, str]) -> str:
        base = self.name or names.get(id(self.value if self.key is None else self.key))
        if base is None:
            raise ValueError(f"a {self.kind} summary of a tensor that is not a variable of the model needs a name=")
        return "/".join(p for p in (self.prefix, base, self.postfix) if p)


class SummaryCollection:
    """The summaries of one run: those added outside steps (kept), and those of the current step.

    ``names`` maps ``id(tensor)`` to the model's variable names; the train loop sets it.
    """

    def __init__(self) -> None:
        self.summaries: list[Summary] = []
        self.step_summaries: list[Summary] = []
        self.names: dict[int, str] | None = None
        self.in_step = False
        self.recording = False

    def add(self, summary: Summary) -> None:
        if self.names is not None:
            summary.tag(self.names)  # fail at the call that has no name, not at write time
        if not self.in_step:
            self.summaries.append(summary)
        elif self.recording:
            self.step_summaries.append(summary)

    def begin_step(self, recording: bool) -> None:
        self.in_step, self.recording = True, recording

    def end_step(self) -> None:
        self.in_step, self.recording = False, False
        if self.step_summaries:
            self.step_summaries = []

    def set_names(self, names: Mapping[int, str]) -> None:
        """Give the collection the model's names and check that every kept summary has a tag."""
        self.names = dict(names)
        for s in self.summaries:
            s.tag(self.names)


_current: contextvars.ContextVar[SummaryCollection | None] = contextvars.ContextVar(
    "torchslim_summaries", default=None)


class collecting:
    """Make ``collection`` the current one for the code inside (``learning.train`` does this for its run)."""

    def __init__(self, collection: SummaryCollection) -> None:
        if not isinstance(collection, SummaryCollection):
            raise TypeError(f"`collection` must be a SummaryCollection, got {type(collection).__name__}")
        self.collection = collection

    def __enter__(self) -> SummaryCollection:
        self._token = _current.set(self.collection)
        return self.collection

    def __exit__(self, *exc: object) -> None:
        _current.reset(self._token)


def current_collection() -> SummaryCollection:
    """This context's collection; one is made (and kept for this context) on first use."""
    collection = _current.get()
    if collection is None:
        collection = SummaryCollection()
        _current.set(collection)
    return collection


def recording() -> bool:
    """Whether a train step is running whose summaries are due (summaries added now will be written).

    Code that would do work only to make a summary (a train op's gradient
    summaries) asks this first, so that steps without summaries do none.
    """
    collection = _current.get()
    return collection is not None and collection.in_step and collection.recording


def take_pending() -> SummaryCollection:
    """Take this context's collection (summaries added before a run), leaving none behind."""
    collection = _current.get() or SummaryCollection()
    _current.set(None)
    return collection


def _add(kind: str, value: Any, name: str | None, prefix: str | None, print_summary: bool, **extra: Any) -> Summary:
    if name is not None and not isinstance(name, str):
        raise TypeError(f"`name` must be a string or None, got {name!r}")
    if prefix is not None and not isinstance(prefix, str):
        raise TypeError(f"`prefix` must be a string or None, got {prefix!r}")
    if not (isinstance(value, (torch.Tensor, int, float)) or callable(value)) or isinstance(value, bool):
        raise TypeError(f"a summary value must be a tensor, a number or a callable, got {type(value).__name__}")
    if not isinstance(value, torch.Tensor) and name is None and extra.get("key") is None:
        raise ValueError(f"a {kind} summary of a number or a callable needs a name=")
    summary = Summary(kind, value, name, prefix, print_summary=print_summary, **extra)
    current_collection().add(summary)
    return summary


def add_scalar_summary(tensor: Any, name: str | None = None, prefix: str | None = None,
                       print_summary: bool = False) -> Summary:
    """Record a scalar (a one-element tensor, a number, or a callable returning one)."""
    if isinstance(tensor, torch.Tensor) and tensor.numel() != 1:
        raise ValueError(f"a scalar summary needs one element, got a tensor of shape {tuple(tensor.shape)}")
    return _add("scalar", tensor, name, prefix, print_summary)


def add_histogram_summary(tensor: Any, name: str | None = None, prefix: str | None = None) -> Summary:
    """Record the distribution of a tensor's values."""
    return _add("histogram", tensor, name, prefix, False)


def add_image_summary(tensor: Any, name: str | None = None, prefix: str | None = None,
                      print_summary: bool = False, data_format: str = "NHWC") -> Summary:
    """Record a batch of images: [N, H, W, C] (``data_format="NHWC"``, the original's) or [N, C, H, W] ("NCHW").

    C is 1, 3 or 4; values are floats in [0, 1] or uint8.
    """
    if data_format not in ("NHWC", "NCHW"):
        raise ValueError(f"`data_format` must be 'NHWC' or 'NCHW', got {data_format!r}")
    if isinstance(tensor, torch.Tensor):
        channels = tensor.shape[-1 if data_format == "NHWC" else 1] if tensor.dim() == 4 else None
        if channels not in (1, 3, 4):
            other = "NCHW" if data_format == "NHWC" else "NHWC"
            raise ValueError(f"an image summary needs a 4-d {data_format} tensor with 1, 3 or 4 channels, got shape "
                             f"{tuple(tensor.shape)}; if it is {other}, pass data_format={other!r}")
    return _add("image", tensor, name, prefix, print_summary, data_format=data_format)


def add_zero_fraction_summary(tensor: Any, name: str | None = None, prefix: str | None = None,
                              print_summary: bool = False) -> Summary:
    """Record the fraction of a tensor's values that are zero, as ``<name>/Fraction_of_Zero_Values``."""
    return _add("zero_fraction", tensor, name, prefix, print_summary, postfix="Fraction_of_Zero_Values")


def _plural(add: Callable[..., Summary], tensors: Iterable[Any], prefix: str | None, **kwargs: Any) -> list[Summary]:
    if isinstance(tensors, torch.Tensor) or not isinstance(tensors, Iterable):
        raise TypeError(f"`tensors` must be a list of tensors, got {type(tensors).__name__}")
    return [add(t, prefix=prefix, **kwargs) for t in tensors]


def add_scalar_summaries(tensors: Iterable[Any], prefix: str | None = None, print_summary: bool = False) -> list[Summary]:
    """``add_scalar_summary`` for each tensor, named by its variable name."""
    return _plural(add_scalar_summary, tensors, prefix, print_summary=print_summary)


def add_histogram_summaries(tensors: Iterable[Any], prefix: str | None = None) -> list[Summary]:
    """``add_histogram_summary`` for each tensor, e.g. ``add_histogram_summaries(model.parameters())``."""
    return _plural(add_histogram_summary, tensors, prefix)


def add_image_summaries(tensors: Iterable[Any], prefix: str | None = None, data_format: str = "NHWC") -> list[Summary]:
    """``add_image_summary`` for each tensor."""
    return _plural(add_image_summary, tensors, prefix, data_format=data_format)


def add_zero_fraction_summaries(tensors: Iterable[Any], prefix: str | None = None) -> list[Summary]:
    """``add_zero_fraction_summary`` for each tensor."""
    return _plural(add_zero_fraction_summary, tensors, prefix)


def add_gradients_summaries(grads_and_vars: GradsAndVars) -> list[Summary]:
    """Per parameter, a histogram ``<name>/gradient`` and a scalar ``<name>/gradient_norm``.

    Parameters without a gradient are logged (INFO) and skipped.
    """
    out = []
    for grad, param in grads_and_vars:
        if grad is None:
            names = current_collection().names or {}
            log.info("Variable %s has no gradient", names.get(id(param), tuple(param.shape)))
            continue
        out.append(_add("histogram", grad, None, None, False, key=param, postfix="gradient"))
        out.append(_add("scalar", lambda g=grad: torch.linalg.vector_norm(g), None, None, False,
                        key=param, postfix="gradient_norm"))
    return out


# ---------------------------------------------------------------- writing


def _read(value: Any) -> Any:
    value = value() if callable(value) and not isinstance(value, torch.Tensor) else value
    return value.detach() if isinstance(value, torch.Tensor) else value


def _write_one(summary: Summary, tag: str, writer: SummaryWriter, step: int) -> float | None:
    value = _read(summary.value)
    if summary.kind in ("scalar", "zero_fraction"):
        if summary.kind == "zero_fraction":
            value = (torch.as_tensor(value) == 0).float().mean()
        number = float(value)  # host sync: on summary steps only
        writer.add_scalar(tag, number, step)
        if summary.print_summary:
            print(f"{tag}: {number}")
        return number
    tensor = torch.as_tensor(value).cpu()
    if summary.kind == "histogram":
        writer.add_histogram(tag, tensor.float().flatten(), step)
    else:
        images = tensor.permute(0, 3, 1, 2) if summary.data_format == "NHWC" else tensor
        writer.add_images(tag, images, step)
        if summary.print_summary:
            print(f"{tag}: images of shape {tuple(tensor.shape)}")
    return None


def write_summaries(collection: SummaryCollection, writer: SummaryWriter, step: int,
                    scalars: Mapping[str, float] | None = None) -> dict[str, float]:
    """Write ``scalars`` and every summary of ``collection`` at ``step``; return the scalar values written."""
    written: dict[str, float] = {}
    for tag, value in (scalars or {}).items():
        writer.add_scalar(tag, float(value), step)
        written[tag] = float(value)
    names = collection.names or {}
    for summary in collection.summaries + collection.step_summaries:
        tag = summary.tag(names)
        number = _write_one(summary, tag, writer, step)
        if number is not None:
            written[tag] = number
    return written
