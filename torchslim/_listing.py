"""The text of ``torchslim inspect``: a checkpoint's metadata, its model tensors with their total,
and the bookkeeping (optimizer state, RNG states, data position) folded into one line per group.

Pure formatting: :func:`torchslim.checkpoint.describe` reads the checkpoint and calls :func:`render`.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Iterator, Sequence
from typing import Any

# Bytes per element of the dtype names safetensors reports.
_ITEMSIZE = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2,
             "U16": 2, "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}

# What a reader rarely wants to see entry by entry: folded unless ``show_all``.
_INTERNAL = re.compile(r"^(optimizer/state|rng|data/epoch_rng)(/|$)|^optimizer/param_groups/\d+/params$|(^|/)_")

Tensor = tuple[str, str, Sequence[int]]  # (name, safetensors dtype, shape)


def natural_key(name: str) -> list[Any]:
    """Sort key that orders embedded numbers by value: ``layer/3`` before ``layer/11``."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def render(path: str, meta: dict[str, Any], tensors: Sequence[Tensor], *, show_all: bool = False) -> str:
    """The listing of the checkpoint at ``path`` with metadata ``meta`` and ``tensors``."""
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(meta["created"]))
    lines = [f"checkpoint: {path}", f"global_step: {meta['global_step']}", f"created: {when}",
             f"format: {meta['format']}"]
    groups: dict[str, list[Tensor]] = {}
    for t in sorted(tensors, key=lambda t: (_group(t[0]) != "model", natural_key(t[0]))):
        groups.setdefault(_group(t[0]), []).append(t)
    folded = []
    for group, members in groups.items():
        shown = show_all or not _INTERNAL.search(group)
        lines.append(f"{group}: {_total(members)}" + ("" if shown else "  (folded; --all lists them)"))
        if shown:
            width = max(len(name) for name, _, _ in members)
            lines += [f"  {name:<{width}}  {dtype:<5} {list(shape)}" for name, dtype, shape in members]
        else:
            folded.append(group)
    values = sorted(_leaves(meta["state"], ""), key=lambda kv: natural_key(kv[0]))
    hidden = [k for k, _ in values if not show_all and _INTERNAL.search(k)]
    lines.append("values:" + (f"  ({len(hidden)} internal values folded; --all lists them)" if hidden else ""))
    lines += [f"  {k} = {v}" for k, v in values if show_all or not _INTERNAL.search(k)]
    return "\n".join(lines)


def _group(name: str) -> str:
    """The tensors' group: the model's state, or the bookkeeping key they belong to (``optimizer/state``)."""
    parts = name.split("/")
    if parts[0] == "model" or len(parts) < 3:
        return parts[0]
    return "/".join(parts[:2])


def _total(members: Sequence[Tensor]) -> str:
    """``"14 tensors, 93,322 values (364.5 KiB)"``."""
    numel = [math.prod(shape) for _, _, shape in members]
    size = sum(n * _ITEMSIZE.get(dtype, 4) for n, (_, dtype, _) in zip(numel, members))
    return f"{len(members)} tensor{'s' * (len(members) != 1)}, {sum(numel):,} values ({_bytes(size)})"


def _bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _leaves(tree: Any, prefix: str) -> Iterator[tuple[str, str]]:
    """The non-tensor values of a stored state tree, as (slash path, short text); long lists are summarized."""
    if isinstance(tree, dict) and "__tuple__" in tree:
        tree = tree["__tuple__"]
    if isinstance(tree, dict) and "__items__" in tree:
        tree = {str(k): v for k, v in tree["__items__"]}
    if isinstance(tree, dict) and "__tensor__" in tree:
        return
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from _leaves(v, f"{prefix}/{k}" if prefix else str(k))
    elif isinstance(tree, list) and len(tree) > 8:
        yield prefix, f"<list of {len(tree)}>"
    elif isinstance(tree, list):
        for i, v in enumerate(tree):
            yield from _leaves(v, f"{prefix}/{i}")
    else:
        yield prefix, (repr(tree) if not isinstance(tree, float) or math.isfinite(tree) else str(tree))


def checksum_kind(files: dict[str, Any]) -> str:
    """How a checkpoint's files are checksummed, from their entries in ``state.json``."""
    entries = [e for e in files.values() if isinstance(e, dict)]
    kinds = sorted({"sha256" if "sha256" in e else str(e.get("checksum")) for e in entries})
    chunked = [e["chunk_bytes"] for e in entries if isinstance(e.get("chunk_bytes"), int)]
    return ", ".join(kinds) + (f" per {chunked[0] >> 20} MiB chunk" if chunked else " per file")


def file_size(entry: Any) -> str:
    """A file's size from its entry in ``state.json``."""
    n = entry.get("bytes", 0) if isinstance(entry, dict) else 0
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n} bytes"
