"""Sharded checkpoints: every process writes the rows it holds, one process commits the directory.

Under FSDP each process holds 1/world_size of every parameter and of its
optimizer state (rows of dimension 0). A save must not gather them whole on
one process (the point of sharding is that they may not fit there), so each
process writes its own tensor file into the checkpoint's temporary directory:

* ``tensors-rank<r>-of-<W>.safetensors``: process ``r``'s rows of every
  sharded tensor (key ``<key>@rank<r>``), written from its own memory and
  checksummed per chunk as any tensor file (:mod:`torchslim._tensorfile`); the
  chief's file also holds the tensors every process has whole (step counts,
  RNG states, the data position).
* ``state.json`` (format ``torchslim.checkpoint/3``), written by the chief
  last, lists every file with its checksums and, under ``"sharded"``, each
  sharded tensor's whole shape and its pieces ``[[piece key, first row], ...]``.

The protocol (:func:`write`), in lockstep on every process:

1. The chief makes the hidden temporary directory; every process learns its
   name and whether any process holds a NaN/Inf (then all refuse to save).
2. Every process writes and fsyncs its file there, then says how it went.
3. Only if every process succeeded does the chief write ``state.json`` and
   commit the directory by one rename (:func:`torchslim._checkpointdir.commit`).

So the commit comes after the last byte of every process is durable: a process
killed at any moment (even ``kill -9``) leaves the temporary directory
uncommitted and the previous checkpoint the newest; the next run removes the
leftover. A failure on one process (a full disk) is reported on every process,
naming it, and nothing is committed.

Each process writes into its own ``logdir`` argument (the same directory as
the chief's, as mounted where it runs), so the logdir must be on a file system
every process sees: :func:`check_shared_logdir` checks it at start.

Reading: :mod:`torchslim._checkpointio` joins the pieces (:func:`pieces_of`
checks them against the files first); a sharded checkpoint loads into any
number of processes, sharded or not.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Mapping
from typing import Any, Protocol

import torch

from torchslim import _checkpointdir, _statetree, _tensorfile
from torchslim._types import NonFiniteError

__all__ = ["FORMAT", "Peers", "Shard", "check_shared_logdir", "file_name", "pieces_of", "write"]

FORMAT = "torchslim.checkpoint/3"


@dataclasses.dataclass(frozen=True)
class Shard:
    """Rows ``[offset, offset + len(local))`` of a tensor of shape ``shape``, split over processes along dimension 0."""

    local: torch.Tensor
    offset: int
    shape: tuple[int, ...]


class Peers(Protocol):
    """The processes saving together: this one's rank, how many, which commits, and an all-gather of small values."""

    rank: int
    world_size: int
    is_chief: bool

    def exchange(self, value: Any) -> list[Any]:
        """Every process's ``value``, in rank order (a collective: every process calls it)."""
        ...


def file_name(rank: int, world_size: int) -> str:
    return f"tensors-rank{rank}-of-{world_size}.safetensors"


def piece_key(key: str, rank: int) -> str:
    return f"{key}@rank{rank}"


def write(state: Mapping[str, Any], path: str, peers: Peers, *, global_step: int, final: bool,
          metadata: Mapping[str, Any] | None, require_finite: bool) -> str:
    """Write this process's part of ``state`` (its :class:`Shard` s, and the rest if chief) as checkpoint ``path``.

    Every process calls it with its own state and its own ``path`` (the chief's
    checkpoint as this process names it). Returns ``path`` once the chief has
    committed (on the chief) or once every file is durable (elsewhere).

    Raises, on every process alike: ``NonFiniteError`` (a NaN/Inf on any
    process: nothing written), ``OSError`` naming the process whose write
    failed (nothing committed).
    """
    shards: dict[tuple[Any, ...], Shard] = {}
    tree, tensors = _statetree.encode(_replace_shards(state, shards))
    mine: dict[str, torch.Tensor] = {}
    placed: dict[str, list[Any]] = {}
    for key, t in tensors.items():
        shard = shards.get(_identity(t))
        if shard is not None:
            mine[piece_key(key, peers.rank)] = t
            placed[key] = [shard.offset, list(shard.shape)]
        elif peers.is_chief:
            mine[key] = t

    # 1. The temporary directory (the chief's), and whether any process holds a NaN/Inf.
    tmp, cannot = None, None
    if peers.is_chief:
        try:
            tmp = _checkpointdir.temporary(path)
        except OSError as e:  # said to every process, so that none waits for the chief's directory
            cannot = [e.errno, f"the chief cannot create the checkpoint's directory beside {path}: {e}"]
    bad = _tensorfile.nonfinite(mine) if require_finite else []
    first = peers.exchange({"tmp": os.path.basename(tmp) if tmp else None, "bad": bad, "error": cannot})
    bad_everywhere = [f"{k} (rank {r})" for r, said in enumerate(first) for k in said["bad"]]
    no_dir = next((said["error"] for said in first if said["error"] is not None), None)
    if bad_everywhere or no_dir is not None:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        if no_dir is not None:
            raise OSError(no_dir[0] or errno.EIO, no_dir[1])
        raise NonFiniteError(f"refusing to checkpoint a state with NaN/Inf values in: {', '.join(bad_everywhere)}")
    here = os.path.join(os.path.dirname(path), next(said["tmp"] for said in first if said["tmp"]))

    # 2. Every process writes its file; then all learn how each went.
    name = file_name(peers.rank, peers.world_size)
    entry, error = None, None
    try:
        if not os.path.isdir(here):
            raise FileNotFoundError(errno.ENOENT, f"the checkpoint's temporary directory {here} is not visible "
                                    f"here (the logdir must be one directory every process sees)")
        entry = _tensorfile.write(os.path.join(here, name), mine)
    except OSError as e:
        error = [e.errno, f"rank {peers.rank} on {socket.gethostname()}: {e}"]
    second = peers.exchange({"file": name, "entry": entry, "placed": placed, "error": error})
    failed = [said["error"] for said in second if said["error"] is not None]
    if failed:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        code = failed[0][0] or errno.EIO
        if code == errno.ENOSPC:
            full = _checkpointdir.no_space_error(OSError(code, failed[0][1]), path,
                                                 sum(t.numel() * t.element_size() for t in mine.values()) * peers.world_size)
            raise OSError(code, f"{full.strerror} (failed on {'; '.join(msg for _, msg in failed)})")
        raise OSError(code, f"checkpoint {path} was not written (the previous one is still the latest): "
                      + "; ".join(msg for _, msg in failed))
    if tmp is None:
        return path

    # 3. The chief lists every file and piece, then commits.
    try:
        sharded: dict[str, dict[str, Any]] = {}
        for rank, said in enumerate(second):
            for key, (offset, shape) in said["placed"].items():
                sharded.setdefault(key, {"shape": shape, "pieces": []})["pieces"].append([piece_key(key, rank), offset])
        meta: dict[str, Any] = {"format": FORMAT, "global_step": int(global_step), "created": time.time(),
                                "final": bool(final), "world_size": peers.world_size,
                                "files": {said["file"]: said["entry"] for said in second},
                                "state": tree, "sharded": sharded}
        if metadata is not None:
            meta["metadata"] = dict(metadata)
        _checkpointdir.write_durably(os.path.join(tmp, _checkpointdir.STATE_FILE), json.dumps(meta).encode())
        _checkpointdir.commit(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def _identity(t: torch.Tensor) -> tuple[Any, ...]:
    """What makes two tensors the same to :func:`torchslim._statetree.encode` (which detaches, making new objects)."""
    return t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype, t.device


def _replace_shards(obj: Any, shards: dict[tuple[Any, ...], Shard], depth: int = 0) -> Any:
    """``obj`` with each :class:`Shard` replaced by its local tensor (remembered in ``shards``)."""
    if isinstance(obj, Shard):
        if not isinstance(obj.local, torch.Tensor):
            raise TypeError(f"a checkpoint Shard holds a tensor, got {type(obj.local).__name__}")
        shards[_identity(obj.local)] = obj
        return obj.local
    if depth > _statetree.MAX_DEPTH:
        return obj  # encode refuses it, with its message
    if isinstance(obj, Mapping):
        return {k: _replace_shards(v, shards, depth + 1) for k, v in obj.items()}
    if isinstance(obj, tuple):
        return tuple(_replace_shards(v, shards, depth + 1) for v in obj)
    if isinstance(obj, list):
        return [_replace_shards(v, shards, depth + 1) for v in obj]
    return obj


# ---------------------------------------------------------------- reading


Pieces = tuple[torch.dtype, list[int], list[tuple[str, int, int]]]  # dtype, whole shape, (piece key, first row, rows)


def pieces_of(meta: dict[str, Any], entries: Mapping[str, tuple[torch.dtype, list[int], int, int]]) -> dict[str, Pieces]:
    """Each sharded tensor's dtype, whole shape and pieces, checked against the files' headers.

    ``entries``: every tensor of the checkpoint's files (``TensorFile.entries``).
    Raises ``ValueError`` (the reason) for pieces that are missing, of another
    dtype or row shape, overlapping, or not covering the tensor: so a hostile
    ``state.json`` never makes the reader allocate more than the files hold.
    """
    sharded = meta.get("sharded", {})
    if not isinstance(sharded, dict):
        raise ValueError(f"\"sharded\" is not an object: {sharded!r:.80}")
    out: dict[str, Pieces] = {}
    for key, spec in sharded.items():
        shape = spec.get("shape") if isinstance(spec, dict) else None
        listed = spec.get("pieces") if isinstance(spec, dict) else None
        if not (isinstance(shape, list) and 1 <= len(shape) <= 64 and all(_tensorfile._is_int(d) and d >= 0 for d in shape)):
            raise ValueError(f"sharded tensor {key!r} has the shape {shape!r:.80}, not a list of non-negative ints")
        if not (isinstance(listed, list) and listed and all(
                isinstance(p, list) and len(p) == 2 and isinstance(p[0], str) and _tensorfile._is_int(p[1]) for p in listed)):
            raise ValueError(f"sharded tensor {key!r} has pieces {listed!r:.80}, not [[piece key, first row], ...]")
        found: list[tuple[str, int, int]] = []
        dtypes = set()
        for name, first in listed:
            if name not in entries:
                raise ValueError(f"sharded tensor {key!r} has a piece {name!r} that no file holds")
            dtype, piece_shape, _, _ = entries[name]
            if list(piece_shape[1:]) != shape[1:] or len(piece_shape) != len(shape):
                raise ValueError(f"sharded tensor {key!r} of shape {shape} has a piece {name!r} of shape {piece_shape}")
            dtypes.add(dtype)
            found.append((name, first, piece_shape[0]))
        if len(dtypes) != 1:
            raise ValueError(f"sharded tensor {key!r} has pieces of several dtypes")
        row = 0
        for name, first, rows in sorted(found, key=lambda p: (p[1], p[2])):
            if first != row and rows:
                raise ValueError(f"sharded tensor {key!r}: its piece {name!r} starts at row {first}, but the rows "
                                 f"before it end at {row} (pieces missing or overlapping)")
            row += rows
        if row != shape[0]:
            raise ValueError(f"sharded tensor {key!r} has {shape[0]} rows, but its pieces hold {row}")
        out[key] = (dtypes.pop(), shape, found)
    return out


# ---------------------------------------------------------------- start


def check_shared_logdir(logdir: str | None, peers: Peers) -> None:
    """Refuse to start unless every process sees the chief's logdir (it writes its shards there).

    The chief writes a hidden file in its logdir; every process looks for it in
    its own ``logdir`` (the same directory, as mounted where it runs). A
    collective: every process calls it.
    """
    probe = None
    if peers.is_chief and logdir is not None:
        os.makedirs(logdir, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".torchslim-probe-", dir=logdir)
        os.close(fd)
    names = peers.exchange(os.path.basename(probe) if probe else None)
    name = next((n for n in names if n), None)
    sees = logdir is not None and name is not None and os.path.isfile(os.path.join(logdir, name))
    seen = peers.exchange([sees, socket.gethostname(), os.path.abspath(logdir) if logdir else None])
    if probe is not None:
        os.remove(probe)
    if name is None:
        return  # no logdir on the chief: nothing is saved
    blind = [f"rank {r} on host {host} (logdir {path})" for r, (ok, host, path) in enumerate(seen) if not ok]
    if blind:
        chief = next(path for ok, _, path in seen if ok)
        raise ValueError(
            f"sharding='fsdp' has every process write its shards into the logdir, so the logdir must be one directory "
            f"that every process sees (a shared file system); {', '.join(blind)} does not see the files of the "
            f"chief's logdir {chief}. Give every process the path of one shared directory")
