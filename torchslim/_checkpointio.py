"""One checkpoint on disk: its name, the durable save, the verified load, and the resolver.

The public surface is :mod:`torchslim.checkpoint`, which re-exports these; this
module holds what reads and writes a single checkpoint directory (the saver's
retention and the inspection listing live there).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import torch

from torchslim import _checkpointdir, _shardedio, _statetree, _tensorfile
from torchslim._checkpointdir import STATE_FILE
from torchslim._checkpointdir import write_durably as _write_durably
from torchslim._types import NonFiniteError

log = logging.getLogger("torchslim")
_T = TypeVar("_T")

CHECKPOINT_PREFIX = "model.ckpt"
TENSOR_FILE = "tensors.safetensors"
FORMAT = "torchslim.checkpoint/2"
FORMATS = ("torchslim.checkpoint/1", FORMAT, _shardedio.FORMAT)  # those this release reads (3: sharded)
_NAME = re.compile(re.escape(CHECKPOINT_PREFIX) + r"-(\d+)$")
_FILE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*$")  # a plain file in the checkpoint directory, never ../ or /


class CorruptCheckpointError(ValueError):
    """A checkpoint exists but cannot be read back as it was written."""


# ---------------------------------------------------------------- names


def checkpoint_path(logdir: str | os.PathLike, global_step: int) -> str:
    """The path of the checkpoint for ``global_step`` in ``logdir``."""
    return os.path.join(os.fspath(logdir), f"{CHECKPOINT_PREFIX}-{int(global_step)}")


def step_of(path: str | os.PathLike) -> int:
    """The global step in a checkpoint's name (``model.ckpt-300`` -> 300)."""
    match = _NAME.match(os.path.basename(os.path.normpath(os.fspath(path))))
    if match is None:
        raise ValueError(f"{os.fspath(path)!r} is not a checkpoint name of the form {CHECKPOINT_PREFIX}-<step>")
    return int(match.group(1))


def list_checkpoints(logdir: str | os.PathLike) -> list[str]:
    """Committed checkpoints in ``logdir``, oldest step first. A missing directory has none."""
    logdir = os.fspath(logdir)
    try:
        names = os.listdir(logdir)
    except (FileNotFoundError, NotADirectoryError):
        return []
    found = []
    for name in names:
        match = _NAME.match(name)
        if match and os.path.isfile(os.path.join(logdir, name, STATE_FILE)):
            found.append((int(match.group(1)), os.path.join(logdir, name)))
    return [path for _, path in sorted(found)]


def latest_checkpoint(logdir: str | os.PathLike) -> str | None:
    """The committed checkpoint with the highest global step in ``logdir``, or ``None``."""
    checkpoints = list_checkpoints(logdir)
    return checkpoints[-1] if checkpoints else None


# ---------------------------------------------------------------- writing


def save(state: Mapping[str, Any], path: str | os.PathLike, *, global_step: int | None = None,
         require_finite: bool = True, final: bool = False, metadata: Mapping[str, Any] | None = None) -> str:
    """Write ``state`` as a checkpoint at ``path``, atomically.

    Args:
        state: a nested dict of tensors and JSON values (e.g. state_dicts).
        path: the checkpoint directory to create; its parent is created if needed.
            An existing checkpoint at ``path`` is replaced only after the new one is complete.
        global_step: recorded in the metadata (defaults to the step in ``path``'s name).
        require_finite: refuse a state with a NaN/Inf floating-point tensor.
        final: mark it as the last checkpoint of a run that ended normally
            (target reached, data exhausted, or stopped early), for evaluators waiting on it.
        metadata: JSON values recorded in ``state.json`` beside the state (``read_metadata(path)["metadata"]``),
            committed by the same rename as the tensors, so they can never disagree. Training puts
            ``{"metrics": {...}, "watch": {"metric", "mode"}}`` there when it validated these weights,
            and ``"stop_reason"`` on the checkpoint of a run that stopped early.

    Returns:
        ``path``.

    Raises:
        NonFiniteError: a tensor holds NaN or Inf (nothing is written).
        TypeError: the state holds something that is neither a tensor nor a JSON value.
        OSError: the disk is full (ENOSPC: the message names the checkpoint and the space it needs),
            or another error of the file system; nothing is committed.
    """
    if not isinstance(state, Mapping):
        raise TypeError(f"`state` must be a dict, got {type(state).__name__}")
    _check_metadata(metadata)
    path = os.path.abspath(os.fspath(path))
    if global_step is None:
        global_step = step_of(path) if _NAME.match(os.path.basename(path)) else 0
    tree, tensors = _statetree.encode(state)
    if require_finite and (bad := _tensorfile.nonfinite(tensors)):
        raise NonFiniteError(f"refusing to checkpoint a state with NaN/Inf values in: {', '.join(bad)}")
    _write(path, tree, tensors, global_step=int(global_step), final=final, metadata=metadata)
    return path


def _check_metadata(metadata: Any) -> None:
    if metadata is None:
        return
    if not isinstance(metadata, Mapping) or not all(isinstance(k, str) for k in metadata):
        raise TypeError(f"`metadata` must be a dict with str keys or None, got {metadata!r:.100}")
    try:
        json.dumps(metadata)
    except (TypeError, ValueError) as e:
        raise TypeError(f"`metadata` must hold JSON values only (None, bool, int, float, str, list, dict): {e}") from e


def _write(path: str, tree: Any, tensors: Mapping[str, torch.Tensor], *, global_step: int, final: bool,
           metadata: Mapping[str, Any] | None = None) -> None:
    """Write the tensor file and ``state.json`` into a temporary directory, then commit it as ``path``."""
    tmp = _checkpointdir.temporary(path)
    try:
        entry = _tensorfile.write(os.path.join(tmp, TENSOR_FILE), tensors)
        meta = {"format": FORMAT, "global_step": global_step, "created": time.time(), "final": bool(final),
                "files": {TENSOR_FILE: entry}, "state": tree}
        if metadata is not None:
            meta["metadata"] = dict(metadata)
        _write_durably(os.path.join(tmp, STATE_FILE), json.dumps(meta).encode())
        _checkpointdir.commit(tmp, path)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            needed = sum(t.numel() * t.element_size() for t in tensors.values()) + len(json.dumps(tree))
            raise _checkpointdir.no_space_error(e, path, needed) from e
        raise


# ---------------------------------------------------------------- reading


def _corrupt(path: str, reason: str) -> CorruptCheckpointError:
    return CorruptCheckpointError(f"checkpoint {path} is corrupt: {reason}")


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The parsed and checked ``state.json`` of a checkpoint (no tensors are read).

    Raises:
        ValueError: ``path`` is not a checkpoint.
        CorruptCheckpointError: its ``state.json`` is not JSON, or not the metadata of a known format.
    """
    path = os.fspath(path)
    state_file = os.path.join(path, STATE_FILE)
    if not os.path.isfile(state_file):
        raise ValueError(f"{path!r} is not a torchslim checkpoint (no {STATE_FILE} in it)")
    try:
        fd = os.open(state_file, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        raise _corrupt(path, f"{STATE_FILE} cannot be opened ({'a symbolic link' if os.path.islink(state_file) else e})"
                       ) from None
    try:
        with os.fdopen(fd, "rb") as f:
            meta = json.loads(f.read())
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise _corrupt(path, f"{STATE_FILE} is not valid JSON ({str(e)[:200] or type(e).__name__})") from None
    return _checked_metadata(path, meta)


def _checked_metadata(path: str, meta: Any) -> dict[str, Any]:
    if not isinstance(meta, dict) or meta.get("format") not in FORMATS:
        got = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise _corrupt(path, f"{STATE_FILE} is not in a format this release reads ({', '.join(FORMATS)}): {got!r:.80}")
    files = meta.get("files")
    if not isinstance(files, dict) or not files:
        raise _corrupt(path, f"{STATE_FILE} lists no tensor files (\"files\" is {files!r:.80})")
    for name in files:
        if not _FILE_NAME.match(name):
            raise _corrupt(path, f"{STATE_FILE} names the file {name!r:.200}, which is not a plain file of the checkpoint")
    for key, kind in (("global_step", int), ("created", (int, float)), ("final", bool)):
        if key in meta and (not isinstance(meta[key], kind) or (kind is int and isinstance(meta[key], bool))):
            raise _corrupt(path, f"{STATE_FILE}'s {key} is {meta[key]!r:.80}")
    if "state" not in meta or "global_step" not in meta:
        raise _corrupt(path, f"{STATE_FILE} lacks the {'state' if 'state' not in meta else 'global_step'}")
    return meta


def _open_files(path: str, meta: dict[str, Any]) -> dict[str, _tensorfile.TensorFile]:
    """Every tensor file of the checkpoint, checked and verified: tensor key -> its file."""
    opened: list[_tensorfile.TensorFile] = []
    index: dict[str, _tensorfile.TensorFile] = {}
    try:
        for name, expected in meta["files"].items():
            try:
                f = _tensorfile.TensorFile(os.path.join(path, name), expected)
                opened.append(f)
                f.verify()
            except _tensorfile.BadFile as e:
                raise _corrupt(path, f"{name} {e}") from None
            for key in f.entries:
                if key in index:
                    raise _corrupt(path, f"tensor {key!r} is in two files")
                index[key] = f
    except BaseException:
        for f in opened:
            f.close()
        raise
    return index


def load(path: str | os.PathLike, *, map_location: str | torch.device = "cpu", into: Any = None,
         mmap: bool = True) -> dict[str, Any]:
    """Read a checkpoint back into the nested state that was saved, after checking every file.

    Args:
        path: a checkpoint directory (see :func:`restore` for a logdir).
        map_location: where tensors not loaded ``into`` live tensors are put.
        into: a state of the same structure holding live tensors (e.g. a train
            op's ``state_dict()``): each saved tensor whose place, shape and dtype
            match one there is copied straight into it (and the returned state
            holds that live tensor), with no other copy made. Nothing is written
            into them unless the whole checkpoint checks out.

    A sharded checkpoint's tensors (one file per process that wrote it, see
    :mod:`torchslim._shardedio`) are joined from their pieces, row after row,
    into the live tensor or a new one, whatever the number of processes reading.

    The other tensors are, on the CPU and with ``mmap`` (the default),
    copy-on-write views of the file mapped in memory, as
    ``safetensors.torch.load_file`` gives: no byte is copied until it is written,
    the cheapest for state that is only read (evaluation, export). Written, each
    page is copied on a page fault; and while such a tensor lives, the file's
    disk space stays in use even if the checkpoint is deleted. ``mmap=False``
    gives them memory of their own, copied once from the verified file: what a
    resumed run wants for its optimizer's state, which its first update writes
    whole (measured at 100 M parameters with Adam: load + first update 2.1x
    faster than through copy-on-write faults, see bench/README.md), and which
    outlives the checkpoint's retention. ``train()`` restores that way.

    Raises:
        ValueError: ``path`` is not a checkpoint.
        CorruptCheckpointError: a file is missing, truncated, malformed, or fails its checksum.
    """
    if not isinstance(mmap, bool):
        raise TypeError(f"`mmap` must be True (views of the mapped file) or False (memory of their own), got {mmap!r}")
    path = os.fspath(path)
    meta = read_metadata(path)
    index = _open_files(path, meta)
    try:
        sharded = _sharded_pieces(path, meta, {k: f.entries[k] for k, f in index.items()})

        def check(key: str, where: str) -> torch.Tensor:
            if key not in index and key not in sharded:
                raise _corrupt(path, f"the state refers to tensor {key!r} (at {where or 'the top'}), which no file holds")
            return torch.empty(0)

        try:
            _statetree.decode(meta["state"], check)  # refuse a bad tree before writing into anything
        except ValueError as e:
            if isinstance(e, CorruptCheckpointError):
                raise
            raise _corrupt(path, f"{STATE_FILE}: {e}") from None
        live = _statetree.tensor_paths(into) if into is not None else {}
        done: dict[str, torch.Tensor] = {}

        def tensor(key: str, where: str) -> torch.Tensor:
            if key in sharded:
                return joined(key, where)
            view = index[key].view(key)
            target = live.get(where)
            if target is not None and target.shape == view.shape and target.dtype == view.dtype:
                with torch.no_grad():
                    target.copy_(view)
                return target
            if key not in done:  # a tensor referred to twice (tied weights) stays one tensor
                if torch.device(map_location).type != "cpu":
                    done[key] = view.to(map_location)
                else:
                    done[key] = view if mmap else view.clone()
            return done[key]

        def joined(key: str, where: str) -> torch.Tensor:  # a sharded tensor: its pieces, row after row
            dtype, shape, pieces = sharded[key]
            target = live.get(where)
            if target is None or list(target.shape) != shape or target.dtype != dtype:
                if key in done:
                    return done[key]
                target = done[key] = torch.empty(shape, dtype=dtype, device=map_location)
            with torch.no_grad():
                for name, first, rows in pieces:
                    if rows:
                        target.narrow(0, first, rows).copy_(index[name].view(name))
            return target

        return _statetree.decode(meta["state"], tensor)
    finally:
        for f in set(index.values()):
            f.close()


def _sharded_pieces(path: str, meta: dict[str, Any], entries: Mapping[str, Any]) -> dict[str, _shardedio.Pieces]:
    """:func:`torchslim._shardedio.pieces_of`, its refusals as ``CorruptCheckpointError`` naming the checkpoint."""
    try:
        return _shardedio.pieces_of(meta, entries)
    except ValueError as e:
        raise _corrupt(path, f"{STATE_FILE}: {e}") from None


# ---------------------------------------------------------------- the checkpoint to use


def restore(path: str | os.PathLike, *, map_location: str | torch.device = "cpu", into: Any = None,
            check: Callable[[str, dict[str, Any]], None] | None = None,
            mmap: bool = True) -> tuple[str, dict[str, Any]] | None:
    """The checkpoint to use for ``path``, loaded: ``(its path, its state)``.

    One policy for training, evaluation, warm starts and the CLI:

    * ``path`` is a checkpoint: load it; a corrupt one raises.
    * ``path`` is a logdir: its newest committed checkpoint that reads back; a
      corrupt one is named in a warning and the one before it is tried.
      ``None`` when it holds no checkpoint; ``CorruptCheckpointError`` when it
      holds some and none reads back.

    Args:
        map_location, into, mmap: as for :func:`load`.
        check: ``check(path, state)`` raises ``CorruptCheckpointError`` for a
            state that reads back but is not what the caller saved (e.g. its
            ``model`` is not a dict of tensors); that checkpoint is then passed over too.

    Raises:
        ValueError: ``path`` does not exist.
        CorruptCheckpointError: as above.
    """
    def read(candidate: str) -> dict[str, Any]:
        state = load(candidate, map_location=map_location, into=into, mmap=mmap)
        if check is not None:
            check(candidate, state)
        return state

    return _resolve(os.fspath(path), read, "falling back to the checkpoint before it")


def _resolve(path: str, read: Callable[[str], _T], fallback: str) -> tuple[str, _T] | None:
    """The policy of :func:`restore` for any way of reading a checkpoint (``read`` raises CorruptCheckpointError)."""
    if os.path.isfile(os.path.join(path, STATE_FILE)):
        return path, read(path)
    if not os.path.isdir(path):
        raise ValueError(f"no checkpoint or logdir at {path!r}")
    candidates = list_checkpoints(path)
    for i, candidate in enumerate(reversed(candidates)):
        try:
            return candidate, read(candidate)
        except CorruptCheckpointError as e:
            if i + 1 < len(candidates):
                log.warning("%s; %s", e, fallback)
            elif len(candidates) > 1:
                raise CorruptCheckpointError(f"{e}; it is the oldest of the {len(candidates)} checkpoints in {path}, "
                                             "and none of them reads back") from None
            else:
                raise
    return None
