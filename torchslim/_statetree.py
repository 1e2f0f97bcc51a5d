"""A nested state <-> (a JSON tree, a flat dict of tensors): how a checkpoint holds structure.

``encode`` walks a state (dicts, lists, tuples, tensors, JSON values) and
returns a JSON tree in which each tensor is replaced by ``{"__tensor__": key}``
plus the tensors by key. It copies nothing: the tensors are the caller's own
(detached), and a tensor that appears twice (tied weights: the same storage,
offset, shape, strides) is stored once and referred to twice.

``decode`` is the reverse, for a tree read from a file that may be hostile: it
refuses (``ValueError``) a tree nested deeper than ``MAX_DEPTH``, a malformed
marker, or a reference to a tensor key it is not given, instead of recursing
without bound or raising ``KeyError``/``TypeError`` from deep inside.

>>> tree, tensors = encode({"w": torch.ones(2), "pair": (1, "a")})
>>> tree
{'w': {'__tensor__': 'w'}, 'pair': {'__tuple__': [1, 'a']}}
>>> decode(tree, lambda key, where: tensors[key])
{'w': tensor([1., 1.]), 'pair': (1, 'a')}
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

__all__ = ["MAX_DEPTH", "decode", "encode", "tensor_paths"]

_RESERVED = ("__tensor__", "__tuple__", "__items__")
MAX_DEPTH = 100
"""The deepest nesting a stored state may have; a deeper tree read from a file is refused."""


def encode(state: Any) -> tuple[Any, dict[str, torch.Tensor]]:
    """``(JSON tree, tensors by key)`` for ``state``; keys are the tensors' slash paths in the state."""
    tensors: dict[str, torch.Tensor] = {}
    return _encode(state, [], tensors, {}), tensors


def _encode(obj: Any, path: list[str], tensors: dict[str, torch.Tensor], seen: dict) -> Any:
    if len(path) > MAX_DEPTH:
        raise ValueError(f"cannot checkpoint {'/'.join(path[:5])}/...: the state is nested deeper than {MAX_DEPTH}")
    if isinstance(obj, torch.Tensor):
        return {"__tensor__": _add_tensor(obj, "/".join(path) or "tensor", tensors, seen)}
    if isinstance(obj, Mapping):
        if all(isinstance(k, str) and k not in _RESERVED for k in obj):
            return {k: _encode(v, path + [k], tensors, seen) for k, v in obj.items()}
        return {"__items__": [[_encode(k, path, tensors, seen), _encode(v, path + [str(k)], tensors, seen)]
                              for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, path + [str(i)], tensors, seen) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, path + [str(i)], tensors, seen) for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(
        f"cannot checkpoint {'/'.join(path) or 'the state'}: a {type(obj).__name__}. Checkpoints hold "
        "tensors and JSON values (None, bool, int, float, str, list, tuple, dict) only"
    )


def _add_tensor(t: torch.Tensor, key: str, tensors: dict[str, torch.Tensor], seen: dict) -> str:
    if t.is_sparse or t.layout != torch.strided:
        raise TypeError(f"cannot checkpoint {key}: {t.layout} tensors are not supported; convert with .to_dense()")
    t = t.detach()
    # Tied weights appear twice in a state_dict: store them once, refer twice.
    view = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype, t.device)
    if view in seen:
        return seen[view]
    while key in tensors:
        key += "+"
    tensors[key] = t
    seen[view] = key
    return key


def decode(tree: Any, tensor: Callable[[str, str], torch.Tensor]) -> Any:
    """The state a tree stands for; ``tensor(key, where)`` gives each referenced tensor (``where``: its slash path).

    Raises:
        ValueError: the tree is nested deeper than ``MAX_DEPTH`` or holds a malformed marker.
        Whatever ``tensor`` raises for a key it does not know.
    """
    return _decode(tree, tensor, "", 0)


def _decode(obj: Any, tensor: Callable[[str, str], torch.Tensor], where: str, depth: int) -> Any:
    if depth > MAX_DEPTH:
        raise ValueError(f"the state is nested deeper than {MAX_DEPTH} levels (at {where[:200]}...)")
    if isinstance(obj, list):
        return [_decode(v, tensor, _join(where, i), depth + 1) for i, v in enumerate(obj)]
    if not isinstance(obj, dict):
        return obj
    if "__tensor__" in obj:
        key = obj["__tensor__"]
        if len(obj) != 1 or not isinstance(key, str):
            raise ValueError(f"{where or 'the state'}: a tensor reference must be {{\"__tensor__\": <key>}}, got {obj!r:.200}")
        return tensor(key, where)
    if "__tuple__" in obj:
        items = obj["__tuple__"]
        if len(obj) != 1 or not isinstance(items, list):
            raise ValueError(f"{where or 'the state'}: a tuple must be {{\"__tuple__\": [...]}}")
        return tuple(_decode(v, tensor, _join(where, i), depth + 1) for i, v in enumerate(items))
    if "__items__" in obj:
        pairs = obj["__items__"]
        if len(obj) != 1 or not isinstance(pairs, list) or not all(isinstance(p, list) and len(p) == 2 for p in pairs):
            raise ValueError(f"{where or 'the state'}: a dict with non-string keys must be {{\"__items__\": [[k, v], ...]}}")
        out = {}
        for k, v in pairs:
            key = _decode(k, tensor, where, depth + 1)
            if isinstance(key, (dict, list)):
                raise ValueError(f"{where or 'the state'}: a dict key is a {type(key).__name__}, which cannot be a key")
            out[key] = _decode(v, tensor, _join(where, key), depth + 1)
        return out
    return {k: _decode(v, tensor, _join(where, k), depth + 1) for k, v in obj.items()}


def _join(where: str, key: Any) -> str:
    return f"{where}/{key}" if where else str(key)


def tensor_paths(state: Any) -> dict[str, torch.Tensor]:
    """Every tensor of a nested state by its slash path, as :func:`decode` names places (``optimizer/state/0/exp_avg``)."""
    out: dict[str, torch.Tensor] = {}
    todo: list[tuple[str, Any, int]] = [("", state, 0)]
    while todo:
        where, obj, depth = todo.pop()
        if isinstance(obj, torch.Tensor):
            out[where] = obj
        elif depth <= MAX_DEPTH and isinstance(obj, Mapping):
            todo += [(_join(where, k), v, depth + 1) for k, v in obj.items()]
        elif depth <= MAX_DEPTH and isinstance(obj, (list, tuple)):
            todo += [(_join(where, i), v, depth + 1) for i, v in enumerate(obj)]
    return out
