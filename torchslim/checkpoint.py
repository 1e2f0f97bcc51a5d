"""Crash-safe checkpoints: atomic save, verified restore, retention, latest.

A checkpoint is a directory ``<logdir>/model.ckpt-<global step>`` holding

* ``tensors.safetensors``: every tensor of the saved state (safetensors'
  layout, readable by ``safetensors.safe_open``), and
* ``state.json``: the format version (``"format": "torchslim.checkpoint/2"``),
  everything else of the state (numbers, strings, lists, dicts), the structure
  that puts the tensors back in place, the global step, for each file its
  size and checksums (xxh3-64 per 64 MiB chunk), and the caller's
  ``metadata`` (e.g. the validation metrics measured on these weights).

Nothing is ever unpickled on load. A checkpoint is written into a hidden
temporary directory beside its final name, every file and the directory are
fsynced, and only then is it renamed into place: the rename is the commit. A
crash at any instant therefore leaves the previous committed checkpoint
loadable, and ``latest_checkpoint`` only ever sees committed ones. A state
holding NaN or Inf is refused before anything is committed.

Saving writes each tensor from its own memory (no serialized copy of the
state); ``Saver(async_save=True)`` copies the state into reused host buffers
and writes it from a background thread while training goes on. Loading maps
the file, verifies it, and copies each tensor once, straight into the live
tensors given as ``into`` where shapes and dtypes match. A file that is not what
``state.json`` says (truncated, forged header, bad offsets, a symbolic link,
...) is refused with :class:`CorruptCheckpointError` naming the checkpoint and
the reason; :func:`restore` (used by training, evaluation, warm starts and the
CLI) then falls back to the checkpoint before it. Checkpoints of format 1
(torchslim 0.1) still load.

>>> import tempfile
>>> logdir = tempfile.mkdtemp()
>>> saver = Saver(max_to_keep=2)
>>> for step in (10, 20, 30):
...     _ = saver.save({"w": torch.ones(2), "note": "hi"}, logdir, global_step=step)
>>> [os.path.basename(p) for p in list_checkpoints(logdir)]
['model.ckpt-20', 'model.ckpt-30']
>>> load(latest_checkpoint(logdir))
{'w': tensor([1., 1.]), 'note': 'hi'}

Keeping the best checkpoints by a metric, besides the newest ones:

>>> saver = Saver(max_to_keep=1, keep_best=1, metric="accuracy")
>>> for step, acc in ((10, 0.5), (20, 0.9), (30, 0.7)):
...     _ = saver.save({"w": torch.ones(2)}, logdir, step, metadata={"metrics": {"accuracy": acc}})
>>> [os.path.basename(p) for p in list_checkpoints(logdir)], os.path.basename(best_checkpoint(logdir))
(['model.ckpt-20', 'model.ckpt-30'], 'model.ckpt-20')
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

from torchslim import _checkpointdir, _listing, _records, _statetree, _tensorfile
from torchslim._asyncsave import AsyncWriter, Staging
from torchslim._checks import check_bool, check_non_negative_int, check_positive
from torchslim._types import NonFiniteError

__all__ = [
    "CHECKPOINT_PREFIX",
    "CorruptCheckpointError",
    "Saver",
    "best_checkpoint",
    "checkpoint_path",
    "describe",
    "latest_checkpoint",
    "list_checkpoints",
    "load",
    "read_metadata",
    "read_metrics",
    "restore",
    "save",
    "step_of",
]

log = logging.getLogger("torchslim")
_T = TypeVar("_T")

CHECKPOINT_PREFIX = "model.ckpt"
TENSOR_FILE = "tensors.safetensors"
STATE_FILE = "state.json"
FORMAT = "torchslim.checkpoint/2"
FORMATS = ("torchslim.checkpoint/1", FORMAT)  # those this release reads
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


def _write_durably(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


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


def load(path: str | os.PathLike, *, map_location: str | torch.device = "cpu", into: Any = None) -> dict[str, Any]:
    """Read a checkpoint back into the nested state that was saved, after checking every file.

    Args:
        path: a checkpoint directory (see :func:`restore` for a logdir).
        map_location: where tensors not loaded ``into`` live tensors are put.
        into: a state of the same structure holding live tensors (e.g. a train
            op's ``state_dict()``): each saved tensor whose place, shape and dtype
            match one there is copied straight into it (and the returned state
            holds that live tensor), with no other copy made. Nothing is written
            into them unless the whole checkpoint checks out.

    The other tensors are, on the CPU, copy-on-write views of the file mapped in
    memory, as ``safetensors.torch.load_file`` gives: no byte is copied until it
    is written (an optimizer's first step copies the pages of its state then).
    While such a tensor lives, the file's disk space stays in use even if the
    checkpoint is deleted; ``.clone()`` one to own its memory.

    Raises:
        ValueError: ``path`` is not a checkpoint.
        CorruptCheckpointError: a file is missing, truncated, malformed, or fails its checksum.
    """
    path = os.fspath(path)
    meta = read_metadata(path)
    index = _open_files(path, meta)
    try:
        def check(key: str, where: str) -> torch.Tensor:
            if key not in index:
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
            view = index[key].view(key)
            target = live.get(where)
            if target is not None and target.shape == view.shape and target.dtype == view.dtype:
                with torch.no_grad():
                    target.copy_(view)
                return target
            if key not in done:  # a tensor referred to twice (tied weights) stays one tensor
                done[key] = view if torch.device(map_location).type == "cpu" else view.to(map_location)
            return done[key]

        return _statetree.decode(meta["state"], tensor)
    finally:
        for f in set(index.values()):
            f.close()


# ---------------------------------------------------------------- the checkpoint to use


def restore(path: str | os.PathLike, *, map_location: str | torch.device = "cpu", into: Any = None,
            check: Callable[[str, dict[str, Any]], None] | None = None) -> tuple[str, dict[str, Any]] | None:
    """The checkpoint to use for ``path``, loaded: ``(its path, its state)``.

    One policy for training, evaluation, warm starts and the CLI:

    * ``path`` is a checkpoint: load it; a corrupt one raises.
    * ``path`` is a logdir: its newest committed checkpoint that reads back; a
      corrupt one is named in a warning and the one before it is tried.
      ``None`` when it holds no checkpoint; ``CorruptCheckpointError`` when it
      holds some and none reads back.

    Args:
        map_location, into: as for :func:`load`.
        check: ``check(path, state)`` raises ``CorruptCheckpointError`` for a
            state that reads back but is not what the caller saved (e.g. its
            ``model`` is not a dict of tensors); that checkpoint is then passed over too.

    Raises:
        ValueError: ``path`` does not exist.
        CorruptCheckpointError: as above.
    """
    def read(candidate: str) -> dict[str, Any]:
        state = load(candidate, map_location=map_location, into=into)
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


# ---------------------------------------------------------------- the saver


class Saver:
    """Saves checkpoints into a logdir and keeps the newest ``max_to_keep`` of them, and the best ``keep_best``.

    Args:
        max_to_keep: how many recent checkpoints to keep (``None`` or 0: all).
        keep_checkpoint_every_n_hours: also keep, for good, one checkpoint per this
            many hours among those that fall out of the recent window.
        require_finite: refuse to commit a state holding NaN/Inf.
        keep_best: also keep the ``keep_best`` checkpoints with the best value of
            ``metric``, read from each checkpoint's metadata (``metadata={"metrics": ...}``)
            or from the records of an evaluator in another process (``evaluations.json``
            in the logdir). Checkpoints without the metric are ranked by nothing: only
            the other rules keep them. Ties go to the earlier step.
        metric: the metric ``keep_best`` ranks by, e.g. ``"accuracy"``.
        mode: ``"max"`` (higher is better) or ``"min"`` (lower is better).
        async_save: a periodic :meth:`save` copies the state into host buffers
            (allocated once, pinned for CUDA tensors) and returns; a background
            thread checks, writes, fsyncs and commits it. At most one save is in
            flight: a save due while one is, waits for it (the wait is logged and
            counted in ``waits`` / ``waited_secs``). A failure is raised by the next
            :meth:`save`, :meth:`check` or :meth:`wait`, naming the checkpoint. A
            ``final`` save is written before :meth:`save` returns. Off by default:
            the buffers hold a second copy of the state in host memory.
    """

    def __init__(self, max_to_keep: int | None = 5, keep_checkpoint_every_n_hours: float | None = None,
                 require_finite: bool = True, *, keep_best: int = 0, metric: str | None = None,
                 mode: str = "max", async_save: bool = False) -> None:
        check_non_negative_int(max_to_keep, "max_to_keep", optional=True)
        check_positive(keep_checkpoint_every_n_hours, "keep_checkpoint_every_n_hours", optional=True)
        check_bool(require_finite, "require_finite")
        check_non_negative_int(keep_best, "keep_best")
        check_bool(async_save, "async_save")
        if metric is not None and not (isinstance(metric, str) and metric):
            raise TypeError(f"`metric` must be a metric's name (a non-empty str) or None, got {metric!r}")
        if keep_best and metric is None:
            raise ValueError(f"`keep_best`={keep_best} needs `metric`, the name of the metric to rank checkpoints "
                             "by, e.g. Saver(keep_best=3, metric='accuracy')")
        self.max_to_keep = max_to_keep or None
        self.keep_checkpoint_every_n_hours = keep_checkpoint_every_n_hours
        self.require_finite = require_finite
        self.keep_best, self.metric, self.mode = keep_best, metric, _records.check_mode(mode)
        self.async_save = async_save
        self._created = time.time()
        self._preserved: dict[str, set[str]] = {}
        self._metrics: dict[str, dict[str, float]] = {}  # each checkpoint's metadata metrics, read once
        self._writer = AsyncWriter()
        self._staging = Staging()

    def keeping_best(self, keep_best: int, metric: str, mode: str = "max") -> Saver:
        """A saver with this one's settings that also keeps the best ``keep_best`` by ``metric`` (in ``mode``)."""
        saver = Saver(self.max_to_keep, self.keep_checkpoint_every_n_hours, self.require_finite,
                      keep_best=keep_best, metric=metric, mode=mode, async_save=self.async_save)
        saver._created = self._created
        return saver

    @property
    def waits(self) -> int:
        """How many saves waited for an async save still in flight."""
        return self._writer.waits

    @property
    def waited_secs(self) -> float:
        """The seconds those waits took in all."""
        return self._writer.waited_secs

    def save(self, state: Mapping[str, Any], logdir: str | os.PathLike, global_step: int, *,
             final: bool = False, metadata: Mapping[str, Any] | None = None) -> str:
        """Commit ``state`` as ``<logdir>/model.ckpt-<global_step>``, then apply retention.

        ``final`` and ``metadata``: see :func:`save`. A saver with a ``metric`` adds
        ``"watch": {"metric", "mode"}`` to the metadata, for :func:`best_checkpoint`.
        With ``async_save`` (and not ``final``), the commit happens in the background: see the class.
        """
        logdir = os.path.abspath(os.fspath(logdir))
        path = checkpoint_path(logdir, global_step)
        self._writer.wait(path)  # one save in flight at most; raises a failed one's error
        preserved = self._preserved_in(logdir)
        if not isinstance(state, Mapping):
            raise TypeError(f"`state` must be a dict, got {type(state).__name__}")
        _check_metadata(metadata)
        if self.metric is not None and not (metadata or {}).get("watch"):  # for best_checkpoint(logdir)
            metadata = {**(metadata or {}), "watch": {"metric": self.metric, "mode": self.mode}}
        tree, tensors = _statetree.encode(state)
        if not self.async_save or final:
            self._check_finite(tensors)
            _write(path, tree, tensors, global_step=int(global_step), final=final, metadata=metadata)
            self._metrics[path] = _metadata_metrics(metadata)
            self._retire_old(logdir, preserved)
            return path
        staged = self._staging.copy(tensors)
        metadata = json.loads(json.dumps(metadata))  # a copy, as the tree is: the run goes on changing its own

        def write() -> None:
            self._check_finite(staged)
            _write(path, tree, staged, global_step=int(global_step), final=False, metadata=metadata)
            self._metrics[path] = _metadata_metrics(metadata)
            self._retire_old(logdir, preserved)

        self._writer.submit(path, write)
        return path

    def mark_final(self, logdir: str | os.PathLike, global_step: int, *,
                   metadata: Mapping[str, Any] | None = None) -> str:
        """Mark the committed checkpoint of ``global_step`` final, without rewriting its tensors.

        For a run that ends right after saving that step: its ``state.json`` (with
        ``"final": true`` and ``metadata``, as :meth:`save` would record them) is
        replaced by an atomic rename; a reader sees the old file or the new one.
        """
        self._writer.wait(None)  # the save of that step may still be in flight
        path = checkpoint_path(os.path.abspath(os.fspath(logdir)), global_step)
        _check_metadata(metadata)
        if self.metric is not None and not (metadata or {}).get("watch"):
            metadata = {**(metadata or {}), "watch": {"metric": self.metric, "mode": self.mode}}
        meta = read_metadata(path)
        meta["final"] = True
        if metadata is not None:
            meta["metadata"] = dict(metadata)
            self._metrics[path] = _metadata_metrics(metadata)
        tmp = os.path.join(path, f".{STATE_FILE}.tmp-{os.getpid()}")
        try:
            _write_durably(tmp, json.dumps(meta).encode())
            os.replace(tmp, os.path.join(path, STATE_FILE))
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        _checkpointdir.fsync_dir(path)
        return path

    def _check_finite(self, tensors: Mapping[str, torch.Tensor]) -> None:
        if self.require_finite and (bad := _tensorfile.nonfinite(tensors)):
            raise NonFiniteError(f"refusing to checkpoint a state with NaN/Inf values in: {', '.join(bad)}")

    def check(self) -> None:
        """Raise the error of an async save that failed (naming its checkpoint); never waits."""
        self._writer.check()

    def wait(self) -> None:
        """Wait for an async save in flight, then raise its error if it failed."""
        self._writer.wait(None)

    def _preserved_in(self, logdir: str) -> set[str]:
        """On first use of a logdir: clear crash leftovers and adopt old checkpoints kept for good."""
        if logdir not in self._preserved:
            _checkpointdir.remove_leftovers(logdir, CHECKPOINT_PREFIX)
            existing = list_checkpoints(logdir)
            window = self.max_to_keep or len(existing)
            self._preserved[logdir] = set(existing[: max(0, len(existing) - window)])
        return self._preserved[logdir]

    def _retire_old(self, logdir: str, preserved: set[str]) -> None:
        if self.max_to_keep is None:
            return
        checkpoints = list_checkpoints(logdir)
        best = self._best(logdir, checkpoints) if self.keep_best else set()
        interval = (self.keep_checkpoint_every_n_hours or 0) * 3600
        anchor = max((self._created_time(p) for p in preserved), default=self._created)
        for path in checkpoints[: -self.max_to_keep]:
            if path in preserved or path in best:
                continue
            created = self._created_time(path)
            if interval and created >= anchor + interval:
                preserved.add(path)
                anchor = created
                continue
            _checkpointdir.remove(path)

    def _best(self, logdir: str, checkpoints: list[str]) -> set[str]:
        """The best ``keep_best`` of ``checkpoints`` (all of ``logdir``'s) by the metric."""
        assert self.metric is not None  # keep_best is only set with a metric (__init__)
        for path in set(self._metrics) - set(checkpoints):
            del self._metrics[path]  # retired ones
        return set(_ranked(_checkpoint_metrics(logdir, checkpoints, self._metrics),
                           self.metric, self.mode)[: self.keep_best])

    @staticmethod
    def _created_time(path: str) -> float:
        try:
            return float(read_metadata(path)["created"])
        except (ValueError, KeyError):
            return 0.0

    def restore_latest(self, logdir: str | os.PathLike, *, map_location: str | torch.device = "cpu", into: Any = None,
                       check: Callable[[str, dict[str, Any]], None] | None = None
                       ) -> tuple[str, dict[str, Any]] | None:
        """Load the newest readable checkpoint in ``logdir``: ``(path, state)``, or ``None`` if there is none.

        A corrupt checkpoint is reported by name in a warning and the one before it is
        tried (see :func:`restore`, which this is for a logdir).
        """
        if not os.path.isdir(logdir):
            return None
        if os.path.isfile(os.path.join(logdir, STATE_FILE)):
            raise ValueError(f"`logdir` {os.fspath(logdir)!r} is a checkpoint, not a logdir holding checkpoints")
        return restore(logdir, map_location=map_location, into=into, check=check)


# ---------------------------------------------------------------- metrics


def _metadata_metrics(metadata: Mapping[str, Any] | None) -> dict[str, float]:
    metrics = (metadata or {}).get("metrics")
    if not isinstance(metrics, Mapping):
        return {}
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _checkpoint_metrics(logdir: str | os.PathLike, checkpoints: list[str],
                        cache: dict[str, dict[str, float]] | None = None) -> dict[str, dict[str, float]]:
    """Each checkpoint's metrics: an evaluator's records, then (over them) those in its own metadata."""
    records = _records.read_records(logdir)
    cache = {} if cache is None else cache
    out = {}
    for path in checkpoints:
        if path not in cache:
            try:
                cache[path] = _metadata_metrics(read_metadata(path).get("metadata"))
            except (ValueError, OSError):  # deleted or corrupt meanwhile: ranked by its records only
                cache[path] = {}
        out[path] = {**records.get(step_of(path), {}), **cache[path]}
    return out


def _ranked(metrics: Mapping[str, Mapping[str, float]], metric: str, mode: str) -> list[str]:
    """The paths that have ``metric``, best first (NaN last, ties to the earlier step)."""
    have = [(_records.rank_key(m[metric], step_of(p), mode), p) for p, m in metrics.items() if metric in m]
    return [p for _, p in sorted(have)]


def read_metrics(logdir: str | os.PathLike) -> dict[int, dict[str, float]]:
    """The metrics known for each committed checkpoint in ``logdir``, by global step.

    They come from the checkpoint's own metadata (in-process validation during
    ``learning.train``) and from the records of an evaluator in another process
    (``evaluation_loop(..., record=True)``); a checkpoint with neither is absent.
    """
    found = _checkpoint_metrics(logdir, list_checkpoints(logdir))
    return {step_of(p): m for p, m in found.items() if m}


def _watched(checkpoints: list[str]) -> dict[str, str] | None:
    """The ``{"metric", "mode"}`` the newest checkpoint that names one was trained to watch."""
    for path in reversed(checkpoints):
        try:
            watch = (read_metadata(path).get("metadata") or {}).get("watch")
        except (ValueError, OSError):
            continue
        if isinstance(watch, dict) and isinstance(watch.get("metric"), str) and watch.get("mode") in _records.MODES:
            return watch
    return None


def best_checkpoint(logdir: str | os.PathLike, metric: str | None = None, mode: str | None = None) -> str | None:
    """The committed checkpoint in ``logdir`` with the best value of ``metric``, or ``None`` if none has it.

    Args:
        logdir: the training run's directory.
        metric: default: the metric the run watched (``learning.train(watch=...)``,
            recorded in its checkpoints' metadata).
        mode: ``"max"`` or ``"min"``; default: the watched one's.

    Ties go to the earlier step; a NaN is never best while a number is there.

    Raises:
        ValueError: ``metric`` or ``mode`` is not given and no checkpoint records a watch.
    """
    checkpoints = list_checkpoints(logdir)
    watch = _watched(checkpoints)
    if metric is None and watch is None:
        raise ValueError(f"no checkpoint in {os.fspath(logdir)!r} records a watched metric; pass `metric` "
                         "(and `mode`), e.g. best_checkpoint(logdir, 'accuracy', 'max')")
    metric = metric if metric is not None else watch["metric"]  # type: ignore[index]
    if mode is None:
        if watch is None or watch["metric"] != metric:
            raise ValueError(f"pass `mode`: 'max' if a higher {metric} is better, 'min' if a lower one is")
        mode = watch["mode"]
    ranked = _ranked(_checkpoint_metrics(logdir, checkpoints), metric, _records.check_mode(mode))
    return ranked[0] if ranked else None


# ---------------------------------------------------------------- inspection


def describe(path: str | os.PathLike, *, show_all: bool = False) -> str:
    """A human-readable listing of a checkpoint: metadata, format and checksums, model tensors with their total, values.

    ``path`` may also be a logdir, in which case its newest checkpoint whose
    files check out is described. Names sort naturally (``layer/3`` before
    ``layer/11``). Optimizer state, RNG states and the data position are folded
    into one line per group unless ``show_all``. Checksums are not verified here
    (``load`` does).
    """
    path = os.fspath(path)
    check_bool(show_all, "show_all")
    found = _resolve(path, lambda p: _describe(p, show_all), "describing the checkpoint before it")
    if found is None:
        raise ValueError(f"{path!r} is neither a torchslim checkpoint nor a logdir holding one")
    return found[1]


def _describe(path: str, show_all: bool) -> str:
    meta = read_metadata(path)
    meta.setdefault("created", 0)
    files = meta["files"]
    tensors: list[tuple[str, str, list[int]]] = []
    for name, expected in files.items():
        try:
            f = _tensorfile.TensorFile(os.path.join(path, name), expected)
        except _tensorfile.BadFile as e:
            raise _corrupt(path, f"{name} {e}") from None
        tensors += [(key, _tensorfile.DTYPES[dtype], shape) for key, (dtype, shape, _, _) in f.entries.items()]
        f.close()
    lines = _listing.render(path, meta, tensors, show_all=show_all).split("\n")
    at = next(i for i, line in enumerate(lines) if line.startswith("format: ")) + 1
    lines[at - 1] += f" (version {meta['format'].rsplit('/', 1)[-1]})"
    lines[at:at] = [f"checksum: {_checksum_kind(files)}", f"files: {', '.join(f'{n} ({_bytes(files[n])})' for n in files)}"]
    if meta.get("metadata"):
        lines.append("metadata:")
        lines += [f"  {k} = {v}" for k, v in _listing._leaves(meta["metadata"], "")]
    recorded = _records.read_records(os.path.dirname(os.path.abspath(path))).get(int(meta["global_step"]))
    if recorded:
        lines.append("metrics recorded by an evaluator:")
        lines += [f"  {k} = {v:.6g}" for k, v in recorded.items()]
    return "\n".join(lines)


def _checksum_kind(files: dict[str, Any]) -> str:
    entries = [e for e in files.values() if isinstance(e, dict)]
    kinds = sorted({"sha256" if "sha256" in e else str(e.get("checksum")) for e in entries})
    chunked = [e["chunk_bytes"] for e in entries if isinstance(e.get("chunk_bytes"), int)]
    return ", ".join(kinds) + (f" per {chunked[0] >> 20} MiB chunk" if chunked else " per file")


def _bytes(entry: Any) -> str:
    n = entry.get("bytes", 0) if isinstance(entry, dict) else 0
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n} bytes"
