"""Gradient averaging across processes, overlapping the backward pass: PyTorch's DDP, and a fallback.

:class:`DDPGradients` is the one a run uses: ``torch.nn.parallel.DistributedDataParallel``
over the user's modules, its reducer driven by hooks on those modules, so that the
user's loss function keeps calling the user's model and checkpoint names stay its
``state_dict`` names. :class:`GradientAverager` serves only where DDP cannot: a
train op that trains loose tensors (``create_train_op(model={"w": tensor})``),
which belong to no module and so cannot be handed to DDP.

GradientAverager: the model is not wrapped (the user's loss function keeps calling the user's
module, and checkpoint names stay its ``state_dict`` names): instead a hook on
each trained parameter (``register_post_accumulate_grad_hook``) copies its
gradient into a flat bucket as soon as autograd has finished it, and a bucket
whose gradients are all in is all-reduced asynchronously while the backward
pass goes on with the layers below. Buckets are launched in one fixed order
(the reverse of the parameters' order, roughly the order gradients become
ready), whatever order their gradients arrive in, so every process issues the
same collectives in the same order. ``synchronize()`` launches what is left
(parameters that got no gradient count as zeros), waits, and averages.
Re-exported by :mod:`torchslim.distributed`.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

log = logging.getLogger("torchslim")

DEFAULT_BUCKET_MB = 25  # DDP's default bucket_cap_mb
FIRST_BUCKET_MB = 1  # as DDP: a small first bucket starts the communication early in the backward pass


class _Bucket:
    """Parameters of one device and dtype whose gradients are reduced together in one flat buffer."""

    def __init__(self, params: list[torch.Tensor]) -> None:
        self.params = params
        self.flat = torch.empty(sum(p.numel() for p in params), dtype=params[0].dtype, device=params[0].device)
        self.views: list[torch.Tensor] = []
        offset = 0
        for p in params:
            self.views.append(self.flat[offset:offset + p.numel()].view_as(p))
            offset += p.numel()
        self.filled: set[int] = set()  # indices into params whose gradient is in the buffer
        self.work: Any = None  # the all-reduce in flight


class GradientAverager:
    """Averages the gradients of ``params`` across the processes of the group, once per optimizer update.

    A :class:`~torchslim._types.GradientSync`: ``no_sync()`` around the backward
    pass of an inner micro-batch (its gradients only accumulate locally),
    ``synchronize()`` after the last one. Afterwards every ``param.grad`` is the
    average over processes, a view into the bucket's buffer.

    Args:
        params: the parameters trained, in their registration order.
        world_size: the number of processes averaged over.
        bucket_mb: the most megabytes of gradients one all-reduce carries.
    """

    def __init__(self, params: Sequence[torch.Tensor], world_size: int, bucket_mb: float = DEFAULT_BUCKET_MB) -> None:
        self.world_size = world_size
        self.buckets = _buckets(list(params), int(bucket_mb * 2**20))
        self._where = {id(p): (b, i) for b in self.buckets for i, p in enumerate(b.params)}
        self._launched = 0  # buckets [0, launched) are in flight this update
        self._syncing = True
        self._handles = [p.register_post_accumulate_grad_hook(self._on_gradient) for b in self.buckets
                         for p in b.params]

    def _on_gradient(self, param: torch.Tensor) -> None:
        # Runs inside the backward pass, once autograd has finished param.grad.
        if not self._syncing or param.grad is None:
            return
        bucket, index = self._where[id(param)]
        with torch.no_grad():
            bucket.views[index].copy_(param.grad)
        bucket.filled.add(index)
        self._launch_ready()

    def _launch_ready(self) -> None:
        """Start the all-reduce of every full bucket whose predecessors have all started (one order everywhere)."""
        while self._launched < len(self.buckets):
            bucket = self.buckets[self._launched]
            if len(bucket.filled) < len(bucket.params):
                return
            bucket.work = dist.all_reduce(bucket.flat, async_op=True)
            self._launched += 1

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """The backward pass of a micro-batch that does not end the update: communicate nothing."""
        self._syncing = False
        try:
            yield
        finally:
            self._syncing = True

    def synchronize(self) -> None:
        """After the update's last backward pass: reduce what is left, wait, average; set each ``param.grad``."""
        with torch.no_grad():
            for bucket in self.buckets[self._launched:]:
                for index, (p, view) in enumerate(zip(bucket.params, bucket.views)):
                    if index in bucket.filled:
                        continue
                    if p.grad is None:  # no gradient this update: it counts as zeros, as in DDP
                        view.zero_()
                    else:  # a gradient made without the hook (hooks off): taken as it is
                        view.copy_(p.grad)
                    bucket.filled.add(index)
            self._launch_ready()
            for bucket in self.buckets:
                bucket.work.wait()
                bucket.work = None
                bucket.flat.div_(self.world_size)
                bucket.filled.clear()
                for p, view in zip(bucket.params, bucket.views):
                    p.grad = view
        self._launched = 0

    __call__ = synchronize

    def close(self) -> None:
        """Remove the hooks from the parameters (the run is over)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []


def _buckets(params: list[torch.Tensor], cap_bytes: int) -> list[_Bucket]:
    """The parameters, last first, cut into buckets of one device and dtype of about ``cap_bytes`` each.

    A bucket closes at the parameter that takes it to its cap; the first one's cap
    is ``FIRST_BUCKET_MB`` (or ``cap_bytes`` if smaller).
    """
    buckets: list[_Bucket] = []
    pending: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
    sizes: dict[tuple[torch.device, torch.dtype], int] = {}
    for p in reversed(params):
        key = (p.device, p.dtype)
        pending.setdefault(key, []).append(p)
        sizes[key] = sizes.get(key, 0) + p.numel() * p.element_size()
        if sizes[key] >= (min(cap_bytes, FIRST_BUCKET_MB * 2**20) if not buckets else cap_bytes):
            buckets.append(_Bucket(pending.pop(key)))
            sizes[key] = 0
    buckets += [_Bucket(group) for group in pending.values() if group]
    return buckets


class DDPGradients:
    """``DistributedDataParallel`` over the user's modules, called through the modules themselves.

    DDP's reducer (buckets of ``bucket_mb``, all-reduced while the backward pass
    runs, the average written into each ``param.grad`` when it ends) needs to
    see every forward pass: DDP's own ``forward`` tells the reducer a backward
    pass is coming. Here a forward pre-hook and a forward hook on each of the
    user's top-level modules run the same two halves of ``DistributedDataParallel.forward``
    (``_pre_forward``, ``_post_forward``) around the user's own call, so
    ``model(x)`` in the loss function is DDP's forward without a wrapper in
    sight: the user's model object, its ``state_dict`` names and every reference
    to it stay as they were. :meth:`close` removes the hooks and drops the DDP
    object (its reducer takes its autograd hooks with it).

    A :class:`~torchslim._types.GradientSync`: ``no_sync()`` must enclose the
    forward pass as well as the backward pass of an inner micro-batch (as with
    DDP itself); ``synchronize()`` has nothing left to do, the reducer finished
    when the backward pass did (except on the first update: see there).

    Args:
        modules: the train op's modules by name (one: the model itself).
        trained: the parameters the train op updates; other parameters that
            require a gradient are left out of the reduction.
        device: the modules' device (a CUDA device gives DDP its ``device_ids``).
        bucket_mb: DDP's ``bucket_cap_mb``.
    """

    def __init__(self, modules: dict[str, torch.nn.Module], trained: Sequence[torch.Tensor],
                 device: torch.device | None = None, bucket_mb: float = DEFAULT_BUCKET_MB) -> None:
        self.root = next(iter(modules.values())) if len(modules) == 1 else torch.nn.ModuleDict(modules)
        trained_ids = {id(p) for p in trained}
        ignored = [n for n, p in self.root.named_parameters() if p.requires_grad and id(p) not in trained_ids]
        if ignored:
            DDP._set_params_and_buffers_to_ignore_for_model(self.root, ignored)
        device_ids = [device.index if device.index is not None else torch.cuda.current_device()] \
            if device is not None and device.type == "cuda" else None
        # init_sync=False: the engine has already made every process start equal (restore or broadcast).
        self._ddp_kwargs: dict[str, Any] = {"device_ids": device_ids, "bucket_cap_mb": bucket_mb, "init_sync": False}
        self.ddp: DDP | None = None  # made after the first update, which finds out what DDP must be told
        self.trained = list(trained)
        self.world_size = dist.get_world_size()
        self._first = True
        self._depth = 0  # nesting of calls into the hooked modules: only the outermost is DDP's forward
        self._called = False  # a hooked module's forward ran, with gradients to sync, in this update
        self._inner = False  # inside no_sync()
        self._warned = False
        self._handles = []
        for module in modules.values():
            self._handles.append(module.register_forward_pre_hook(self._pre_forward, with_kwargs=True))
            self._handles.append(module.register_forward_hook(self._post_forward, always_call=True))

    def _pre_forward(self, module: torch.nn.Module, args: Any, kwargs: Any) -> Any:
        self._depth += 1
        if self._depth == 1 and self.ddp is not None:
            return self.ddp._pre_forward(*args, **kwargs)  # may move the inputs to the device, as DDP does
        return None

    def _post_forward(self, module: torch.nn.Module, args: Any, output: Any) -> Any:
        self._depth -= 1
        if self._depth == 0:
            self._called = self._called or (torch.is_grad_enabled() and not self._inner)
            if self.ddp is not None:
                return self.ddp._post_forward(output)
        return None

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Forward and backward passes of a micro-batch that does not end the update: communicate nothing."""
        self._inner = True
        try:
            if self.ddp is None:
                yield
            else:
                with self.ddp.no_sync():
                    yield
        finally:
            self._inner = False

    def synchronize(self) -> None:
        """Nothing, when DDP's reducer averaged every gradient in the backward pass; else average them now.

        The first update is averaged here, after its backward pass, and tells
        how to make DDP: with ``find_unused_parameters`` only if some trained
        parameter got no gradient on some process (a head used only sometimes:
        it counts as zeros, as DDP counts it then, instead of DDP's error at the
        next step), and not at all if the loss function called none of the
        hooked modules itself, only their submodules (``model.encoder(x)``):
        DDP would never see a forward pass, so the gradients stay averaged here,
        after the backward pass, without overlap (a warning says so).
        """
        called, self._called = self._called, False
        if self.ddp is not None and called:
            return
        if self._first:
            self._first = False
            flags = torch.tensor([float(any(p.grad is None for p in self.trained)), float(not called)])
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
            average_now(self.trained, self.world_size)
            if flags[1] == 0:
                self.ddp = DDP(self.root, find_unused_parameters=bool(flags[0]), **self._ddp_kwargs)
            else:
                self._warn()
            return
        self._warn()
        average_now(self.trained, self.world_size)

    def _warn(self) -> None:
        if not self._warned:
            log.warning("The loss function did not call %s itself, so DDP could not overlap the gradient all-reduce "
                        "with the backward pass; gradients are averaged after it instead. Call the model, or pass "
                        "create_train_op(model=...) the modules the loss function calls",
                        "the model" if not isinstance(self.root, torch.nn.ModuleDict) else "its modules")
            self._warned = True

    __call__ = synchronize

    def close(self) -> None:
        """Take the hooks off the user's modules and drop DDP (its reducer's autograd hooks go with it)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.ddp = None
        if hasattr(self.root, "_ddp_params_and_buffers_to_ignore"):
            del self.root._ddp_params_and_buffers_to_ignore
        for p in self.root.parameters():
            if hasattr(p, "_ddp_ignored"):
                del p._ddp_ignored


def average_now(params: Sequence[torch.Tensor], world_size: int) -> None:
    """Average the gradients of ``params`` across the group (a missing gradient counts as zeros)."""
    with torch.no_grad():
        groups: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            groups.setdefault((p.device, p.dtype), []).append(p)
        for group in groups.values():
            grads = [p.grad for p in group if p.grad is not None]
            flat = torch._utils._flatten_dense_tensors(grads)
            dist.all_reduce(flat)
            flat.div_(world_size)
            for grad, value in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads)):
                grad.copy_(value)
