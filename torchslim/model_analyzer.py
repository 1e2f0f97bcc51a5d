"""Report the ops and variables of a model, with their sizes.

A PyTorch model has no graph to walk, so ``analyze_ops`` runs one forward pass
and records every ATen op the dispatcher executes: control flow, functional
calls and in-place ops are seen as they happen. Each op is named after the
module that ran it (``layer1.0.conv1/convolution``; a repeat gets ``_1``,
``_2``, ...), sized by its outputs, and costed with the FLOP formulas of
``torch.utils.flop_counter``, so totals agree with ``FlopCounterMode``.
``analyze_vars`` lists parameters (and, on request, buffers) by their
``state_dict`` names. Both print the original line formats and return its totals;
``profile_ops`` returns the full per-op, per-module ``OpsReport`` instead.

>>> model = nn.Sequential(nn.Linear(3, 2), nn.ReLU())
>>> analyze_vars(model)
(8, 32)
>>> analyze_ops(model, torch.ones(1, 3))  # t, addmm, relu: 6 + 2 + 2
10
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import flop_registry

__all__ = [
    "ModuleStats", "OpRecord", "OpsReport", "analyze_ops", "analyze_vars", "profile_ops", "tensor_description",
]


def tensor_description(t: torch.Tensor) -> str:
    """Describe a tensor's dtype and shape as ``(dtype AxBxC)``.

    Args:
        t: any tensor (a parameter, a buffer, an op output).

    Returns:
        The dtype name and the dimensions joined by ``x``; a 0-d tensor gives
        ``(float32 )``.

    Raises:
        TypeError: ``t`` is not a tensor.

    >>> tensor_description(torch.zeros(1, 8, 8, 1024))
    '(float32 1x8x8x1024)'
    """
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"tensor_description(t) takes a torch.Tensor, got {type(t).__name__}: {t!r:.80}")
    dtype = str(t.dtype).removeprefix("torch.")
    return f"({dtype} {'x'.join(str(d) for d in t.shape)})"


def _named_tensors(variables: object, include_buffers: bool) -> Iterator[tuple[str, torch.Tensor, str]]:
    """Yield ``(name, tensor, tag)``; the tag marks what is not trainable."""
    if isinstance(variables, nn.Module):
        for name, p in variables.named_parameters():
            yield name, p, "" if p.requires_grad else " (non-trainable)"
        if include_buffers:
            for name, b in variables.named_buffers():
                yield name, b, " (buffer)"
        return
    if isinstance(variables, Mapping):
        variables = variables.items()
    if isinstance(variables, (str, bytes, torch.Tensor)) or not isinstance(variables, Iterable):
        raise TypeError(_vars_error(variables))
    for item in variables:
        name, t = item if isinstance(item, tuple) and len(item) == 2 else (None, None)  # type: ignore[assignment]
        if not isinstance(name, str) or not isinstance(t, torch.Tensor):
            raise TypeError(_vars_error(item, "an item of "))
        yield name, t, "" if t.requires_grad else " (non-trainable)"


def _vars_error(value: object, where: str = "") -> str:
    return (
        f"analyze_vars: {where}`variables` must be an nn.Module, a dict name -> tensor, or an iterable "
        f"of (name, tensor) pairs such as model.named_parameters(); got {type(value).__name__}: {value!r:.80}"
    )


def _tensor_key(t: torch.Tensor) -> object:
    """Identity of a tensor's data: tied weights and their aliases share a key."""
    if t.device.type == "meta" or t.numel() == 0:
        return id(t)
    return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)


def analyze_vars(
    variables: nn.Module | Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]],
    print_info: bool = False,
    *,
    include_buffers: bool = False,
) -> tuple[int, int]:
    """Count the elements and bytes of a model's variables.

    With ``print_info`` each variable is printed as ``name (type shape) [size,
    bytes: N]``, a parameter that does not require grad (or a detached tensor)
    marked ``(non-trainable)`` and a buffer ``(buffer)``, then the totals. A
    tensor reached under two names (tied weights) is counted once, at its
    first name.

    Args:
        variables: an ``nn.Module`` (its parameters), a dict name -> tensor
            (a ``state_dict``), or ``(name, tensor)`` pairs.
        print_info: print the listing and totals.
        include_buffers: with a module, also count its buffers (BatchNorm
            running statistics and the like).

    Returns:
        ``(total_size, total_bytes)``.

    Raises:
        TypeError: ``variables`` is none of the accepted forms.

    >>> analyze_vars(nn.Linear(3, 2), print_info=True)
    ---------
    Variables: name (type shape) [size]
    ---------
    weight (float32 2x3) [6, bytes: 24]
    bias (float32 2) [2, bytes: 8]
    Total size of variables: 8
    Total bytes of variables: 32
    Total size of trainable variables: 8
    (8, 32)
    """
    lines, seen = [], set()
    total_size = total_bytes = trainable_size = 0
    for name, t, tag in _named_tensors(variables, include_buffers):
        key = _tensor_key(t)
        if key in seen:
            continue
        seen.add(key)
        size, nbytes = t.numel(), t.numel() * t.element_size()
        total_size, total_bytes = total_size + size, total_bytes + nbytes
        trainable_size += 0 if tag else size
        lines.append(f"{name} {tensor_description(t)} [{size}, bytes: {nbytes}]{tag}")
    if print_info:
        print("---------\nVariables: name (type shape) [size]\n---------", *lines, sep="\n")
        print(f"Total size of variables: {total_size}\nTotal bytes of variables: {total_bytes}")
        print(f"Total size of trainable variables: {trainable_size}")
    return total_size, total_bytes


@dataclass(frozen=True)
class OpRecord:
    """One executed op: ``name`` is ``module/op`` (suffixed ``_k`` on repeats),
    ``module`` the path of the innermost module running it (``""`` for the root),
    ``type`` the ATen op (``aten.convolution``), ``outputs`` the descriptions
    of its output tensors, ``size`` their element count, ``flops`` its FLOPs
    (0 for ops ``torch.utils.flop_counter`` has no formula for)."""

    name: str
    module: str
    type: str
    shapes: tuple[tuple[int, ...], ...]
    outputs: tuple[str, ...]
    size: int
    flops: int


@dataclass(frozen=True)
class ModuleStats:
    """One module of the model: ``calls`` during the pass, ``params`` elements
    (its own and its children's, shared ones once), ``output_size`` elements it
    returned over all calls, ``flops`` of the ops run inside it and its children."""

    name: str
    type: str
    calls: int
    params: int
    output_size: int
    flops: int


@dataclass(frozen=True)
class OpsReport:
    """What ``profile_ops`` saw: ``ops`` in execution order, ``modules`` by
    path (``""`` is the root) in definition order, and the totals.

    >>> report = profile_ops(nn.Linear(3, 2), torch.ones(1, 3))
    >>> [op.name for op in report.ops], report.total_flops, report.modules[""].params
    (['t', 'addmm'], 12, 8)
    """

    ops: tuple[OpRecord, ...]
    modules: dict[str, ModuleStats]
    total_size: int
    total_flops: int

    def listing(self) -> str:
        """The per-op lines ``name -> (type shapes) [size]`` and the totals, as
        ``analyze_ops(print_info=True)`` prints them."""
        lines = ["---------", "Operations: name -> (type shapes) [size]", "---------"]
        for op in self.ops:  # an op with no tensor output (``.item()``) prints ``name -> [0]``
            lines.append(" ".join(filter(None, [op.name, "->", ", ".join(op.outputs), f"[{op.size}]"])))
        lines += [f"Total size of op outputs: {self.total_size}", f"Total FLOPs: {self.total_flops}"]
        return "\n".join(lines)

    def table(self, max_depth: int | None = None) -> str:
        """A per-module table (calls, params, output elements, FLOPs), children
        indented under parents; ``max_depth`` hides deeper modules (root is 0)."""
        head = ("Module", "Type", "Calls", "Params", "Output elements", "FLOPs")
        rows = [head]
        for path, m in self.modules.items():
            depth = path.count(".") + 1 if path else 0
            if max_depth is None or depth <= max_depth:
                label = "  " * depth + (path.rsplit(".", 1)[-1] if path else "(root)")
                rows.append((label, m.type, *(f"{n:,}" for n in (m.calls, m.params, m.output_size, m.flops))))  # type: ignore[arg-type]
        widths = [max(len(r[i]) for r in rows) for i in range(len(head))]

        def fmt(row: tuple[str, ...]) -> str:  # text columns to the left, numbers to the right
            return "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))

        return "\n".join([fmt(rows[0]), "-" * (sum(widths) + 2 * len(head) - 2), *map(fmt, rows[1:])])


class _ModelState:
    """What a forward pass may change in a model, kept to be put back.

    Buffers are copied up front (they are small, and ``native_batch_norm``
    updates running statistics without declaring the write in its schema).
    Parameters are large and almost never written, so they are copied only
    when an op declares a write to their storage (copy-on-write)."""

    def __init__(self, model: nn.Module) -> None:
        mods = list(model.modules())
        self.training = [(m, m.training) for m in mods]
        self.params = [
            (m, n, p, p.requires_grad, p.grad) for m in mods for n, p in m.named_parameters(recurse=False)
        ]
        self.buffers = [(m, n, b, b.clone()) for m in mods for n, b in m.named_buffers(recurse=False)]
        self.by_storage = {_storage_ptr(p): p for _, _, p, _, _ in self.params if _storage_ptr(p)}
        self.param_copies: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def before_write(self, t: torch.Tensor) -> None:
        p = self.by_storage.get(_storage_ptr(t))
        if p is not None and id(p) not in self.param_copies:
            self.param_copies[id(p)] = (p, p.detach().clone())

    @torch.no_grad()
    def restore(self) -> None:
        for m, flag in self.training:
            m.training = flag
        for m, name, p, requires_grad, grad in self.params:
            if getattr(m, name) is not p:
                setattr(m, name, p)
            p.requires_grad_(requires_grad)
            p.grad = grad
        for tensor, saved in self.param_copies.values():
            tensor.copy_(saved)
        for m, name, b, saved in self.buffers:
            if getattr(m, name) is not b:
                setattr(m, name, b)
            # meta tensors hold no values; a needless write would bump autograd's version counter
            if b.device.type != "meta" and not torch.equal(b, saved):
                b.copy_(saved)


def _storage_ptr(t: torch.Tensor) -> int:
    return 0 if t.device.type == "meta" else t.untyped_storage().data_ptr()


def _tensors(value: Any) -> list[torch.Tensor]:
    return [v for v in tree_flatten(value)[0] if isinstance(v, torch.Tensor)]


class _OpRecorder(TorchDispatchMode):
    """Records each op the dispatcher runs, under the module path that ran it."""

    def __init__(self, model: nn.Module, state: _ModelState) -> None:
        super().__init__()
        self.paths = {m: name for name, m in model.named_modules()}
        self.state, self.thread = state, threading.get_ident()
        self.stack: list[Any] = []
        self.ops: list[OpRecord] = []
        self.seen: collections.Counter[str] = collections.Counter()
        self.calls: collections.Counter[Any] = collections.Counter()
        self.out_size: collections.Counter[Any] = collections.Counter()
        self.flops: collections.Counter[Any] = collections.Counter()
        self.writes: dict[Any, list[tuple[int, str]]] = {}

    def enter_module(self, module: nn.Module, args: Any) -> None:
        if threading.get_ident() == self.thread:  # global hooks see every thread's modules
            path = self.paths.get(module)
            if path is not None:
                self.calls[path] += 1
            else:  # a module made outside the model: its ops belong to the caller
                path = self.stack[-1] if self.stack else ""
            self.stack.append(path)

    def exit_module(self, module: nn.Module, args: Any, output: Any) -> None:
        if threading.get_ident() == self.thread and self.stack:
            self.stack.pop()
            if module in self.paths:
                self.out_size[self.paths[module]] += sum(t.numel() for t in _tensors(output))

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        packet = func._overloadpacket
        if packet not in flop_registry:  # as FlopCounterMode: count a composite op by its parts
            with self:
                out = func.decompose(*args, **kwargs)
            if out is not NotImplemented:
                return out
        for t in self._written(func, args, kwargs):
            self.state.before_write(t)
        out = func(*args, **kwargs)
        flops = flop_registry[packet](*args, **kwargs, out_val=out) if packet in flop_registry else 0
        self._record(packet, out, flops)
        return out

    def _written(self, func: Any, args: tuple, kwargs: dict) -> list[torch.Tensor]:
        if func not in self.writes:
            schema = enumerate(func._schema.arguments)
            self.writes[func] = [(i, a.name) for i, a in schema if a.alias_info and a.alias_info.is_write]
        picked = [args[i] if i < len(args) else kwargs.get(name) for i, name in self.writes[func]]
        return _tensors(picked)

    def _record(self, packet: Any, out: Any, flops: int) -> None:
        module = self.stack[-1] if self.stack else ""
        base = f"{module}/{packet.__name__}" if module else packet.__name__
        name = f"{base}_{self.seen[base]}" if self.seen[base] else base
        self.seen[base] += 1
        outs = _tensors(out)
        shapes, descriptions = tuple(tuple(t.shape) for t in outs), tuple(map(tensor_description, outs))
        size = sum(t.numel() for t in outs)
        self.ops.append(OpRecord(name, module, str(packet), shapes, descriptions, size, flops))
        for path in set(self.stack):
            self.flops[path] += flops

    def report(self, model: nn.Module) -> OpsReport:
        modules = {
            path: ModuleStats(
                path, type(m).__name__, self.calls[path], sum(p.numel() for p in m.parameters()),
                self.out_size[path], self.flops[path],
            )
            for path, m in model.named_modules()
        }
        ops = tuple(self.ops)
        return OpsReport(ops, modules, sum(op.size for op in ops), sum(op.flops for op in ops))


def _check_model(model: object, caller: str) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise TypeError(f"{caller}(model) takes a torch.nn.Module, got {type(model).__name__}: {model!r:.80}")
    return model


def profile_ops(model: nn.Module, *example_args: Any, **example_kwargs: Any) -> OpsReport:
    """Run ``model(*example_args, **example_kwargs)`` once and report every op it ran.

    The pass runs under ``torch.no_grad()`` in the model's own train/eval mode.
    Afterwards the model is as before: parameters, buffers (BatchNorm running
    statistics included), ``training`` flags, ``requires_grad`` and ``.grad``
    are put back, and the global RNG state is unchanged. A model and inputs
    on the ``meta`` device give shapes and FLOPs without allocating memory.

    Args:
        model: the module to run.
        *example_args: positional inputs of its forward.
        **example_kwargs: keyword inputs of its forward.

    Returns:
        An ``OpsReport``: per op and per module sizes and FLOPs.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.

    >>> report = profile_ops(nn.Sequential(nn.Linear(4, 3), nn.ReLU()), torch.ones(2, 4))
    >>> print(report.table())
    Module  Type        Calls  Params  Output elements  FLOPs
    ---------------------------------------------------------
    (root)  Sequential      1      15                6     48
      0     Linear          1      15                6     48
      1     ReLU            1       0                6      0
    """
    _check_model(model, "profile_ops")
    state = _ModelState(model)
    recorder = _OpRecorder(model, state)
    tensors = [p for _, _, p, *_ in state.params] + [b for _, _, b, _ in state.buffers]
    cuda = sorted({t.device.index or 0 for t in tensors if t.device.type == "cuda"})
    try:  # global hooks see every module however it is reached; the handles remove them on exit
        with (
            torch.random.fork_rng(devices=cuda),
            torch.no_grad(),
            nn.modules.module.register_module_forward_pre_hook(recorder.enter_module),
            nn.modules.module.register_module_forward_hook(recorder.exit_module, always_call=True),
            recorder,
        ):
            model(*example_args, **example_kwargs)
    finally:
        state.restore()
    return recorder.report(model)


def analyze_ops(model: nn.Module, *example_args: Any, print_info: bool = False, **example_kwargs: Any) -> int:
    """Run one forward pass and count the elements of every op output.

    Like ``profile_ops`` (same guarantees), but returns only the total, and
    with ``print_info`` prints ``name -> (type shapes) [size]`` per op, then
    the total size and FLOPs. A forward keyword named ``print_info`` cannot
    be passed through; use ``profile_ops`` for such a model.

    Args:
        model: the module to run.
        *example_args: positional inputs of its forward.
        print_info: print the listing.
        **example_kwargs: keyword inputs of its forward.

    Returns:
        The total number of elements in all op outputs.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.

    >>> analyze_ops(nn.Sequential(nn.Linear(3, 2), nn.ReLU()), torch.ones(1, 3), print_info=True)
    ---------
    Operations: name -> (type shapes) [size]
    ---------
    0/t -> (float32 3x2) [6]
    0/addmm -> (float32 1x2) [2]
    1/relu -> (float32 1x2) [2]
    Total size of op outputs: 10
    Total FLOPs: 12
    10
    """
    report = profile_ops(_check_model(model, "analyze_ops"), *example_args, **example_kwargs)
    if print_info:
        print(report.listing())
    return report.total_size
