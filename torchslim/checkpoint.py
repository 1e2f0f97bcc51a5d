"""Crash-safe checkpoints: atomic save, verified restore, retention, latest.

A checkpoint is a directory ``<logdir>/model.ckpt-<global step>`` holding

* ``tensors.safetensors``: every tensor of the saved state (safetensors'
  layout, readable by ``safetensors.safe_open``), and
* ``state.json``: the format version (``"format": "torchslim.checkpoint/2"``),
  everything else of the state (numbers, strings, lists, dicts), the structure
  that puts the tensors back in place, the global step, for each file its
  size and checksums (xxh3-64 per 64 MiB chunk), and the caller's
  ``metadata`` (e.g. the validation metrics measured on these weights).

A sharded checkpoint (format 3, written by ``train(sharding="fsdp")`` through
:meth:`Saver.save_sharded`) holds one ``tensors-rank<r>-of-<N>.safetensors``
per process instead, each with that process's rows of every sharded tensor;
``state.json`` also says which rows each file holds, and :func:`load` joins
them, on any number of processes.

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

import json
import logging
import os
import time
from collections.abc import Callable, Mapping
from typing import Any

import torch

from torchslim import _checkpointdir, _listing, _records, _shardedio, _statetree, _tensorfile
from torchslim._asyncsave import AsyncWriter, Staging
from torchslim._checkpointio import (
    CHECKPOINT_PREFIX,
    CorruptCheckpointError,
    _check_metadata,
    _corrupt,
    _resolve,
    _sharded_pieces,
    _write,
    _write_durably,
    checkpoint_path,
    latest_checkpoint,
    list_checkpoints,
    load,
    read_metadata,
    restore,
    save,
    step_of,
)
from torchslim._checkpointio import (
    FORMAT as FORMAT,
)
from torchslim._checkpointio import (
    FORMATS as FORMATS,
)
from torchslim._checkpointio import (
    STATE_FILE as STATE_FILE,
)
from torchslim._checkpointio import (
    TENSOR_FILE as TENSOR_FILE,
)
from torchslim._checks import check_bool, check_non_negative_int, check_positive
from torchslim._shardedio import Peers, Shard
from torchslim._types import NonFiniteError

__all__ = [
    "CHECKPOINT_PREFIX",
    "CorruptCheckpointError",
    "Peers",
    "Saver",
    "Shard",
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
        metadata = self._with_watch(metadata)
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

    def save_sharded(self, state: Mapping[str, Any], logdir: str | os.PathLike, global_step: int, peers: Peers, *,
                     final: bool = False, metadata: Mapping[str, Any] | None = None) -> str:
        """Commit a checkpoint that several processes write together, each its own :class:`Shard` s (a collective).

        Every process of ``peers`` calls it at the same step with its own state
        and its own ``logdir`` (one directory every process sees); each writes
        its rows into a file of its own, and the chief commits the directory once
        all of them are durable, then applies retention. Always blocking (the
        commit waits for every process). See :mod:`torchslim._shardedio`.
        """
        logdir = os.path.abspath(os.fspath(logdir))
        path = checkpoint_path(logdir, global_step)
        self._writer.wait(path)
        if not isinstance(state, Mapping):
            raise TypeError(f"`state` must be a dict, got {type(state).__name__}")
        _check_metadata(metadata)
        # The chief alone clears leftovers (before the shared temporary directory exists), records and retires.
        preserved = self._preserved_in(logdir) if peers.is_chief else set()
        metadata = self._with_watch(metadata) if peers.is_chief else None
        _shardedio.write(state, path, peers, global_step=int(global_step), final=final, metadata=metadata,
                         require_finite=self.require_finite)
        if peers.is_chief:
            self._metrics[path] = _metadata_metrics(metadata)
            self._retire_old(logdir, preserved)
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
        metadata = self._with_watch(metadata)
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

    def _with_watch(self, metadata: Mapping[str, Any] | None) -> Mapping[str, Any] | None:
        """``metadata`` plus ``"watch": {"metric", "mode"}`` when this saver ranks by a metric (for best_checkpoint)."""
        if self.metric is None or (metadata or {}).get("watch"):
            return metadata
        return {**(metadata or {}), "watch": {"metric": self.metric, "mode": self.mode}}

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
                       check: Callable[[str, dict[str, Any]], None] | None = None, mmap: bool = True
                       ) -> tuple[str, dict[str, Any]] | None:
        """Load the newest readable checkpoint in ``logdir``: ``(path, state)``, or ``None`` if there is none.

        A corrupt checkpoint is reported by name in a warning and the one before it is
        tried (see :func:`restore`, which this is for a logdir).
        """
        if not os.path.isdir(logdir):
            return None
        if os.path.isfile(os.path.join(logdir, STATE_FILE)):
            raise ValueError(f"`logdir` {os.fspath(logdir)!r} is a checkpoint, not a logdir holding checkpoints")
        return restore(logdir, map_location=map_location, into=into, check=check, mmap=mmap)


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
    entries: dict[str, tuple[torch.dtype, list[int], int, int]] = {}
    for name, expected in files.items():
        try:
            f = _tensorfile.TensorFile(os.path.join(path, name), expected)
        except _tensorfile.BadFile as e:
            raise _corrupt(path, f"{name} {e}") from None
        entries.update(f.entries)
        f.close()
    sharded = _sharded_pieces(path, meta, entries)
    pieces = {name for _, _, listed in sharded.values() for name, _, _ in listed}
    tensors = [(key, _tensorfile.DTYPES[dtype], shape) for key, (dtype, shape, _, _) in entries.items()
               if key not in pieces]
    tensors += [(key, _tensorfile.DTYPES[dtype], shape) for key, (dtype, shape, _) in sharded.items()]
    lines = _listing.render(path, meta, tensors, show_all=show_all).split("\n")
    at = next(i for i, line in enumerate(lines) if line.startswith("format: ")) + 1
    lines[at - 1] += f" (version {meta['format'].rsplit('/', 1)[-1]}" + (
        f", sharded over {meta.get('world_size', len(files))} processes)" if sharded else ")")
    sizes = ", ".join(f"{n} ({_listing.file_size(files[n])})" for n in files)
    lines[at:at] = [f"checksum: {_listing.checksum_kind(files)}", f"files: {sizes}"]
    if meta.get("metadata"):
        lines.append("metadata:")
        lines += [f"  {k} = {v}" for k, v in _listing._leaves(meta["metadata"], "")]
    recorded = _records.read_records(os.path.dirname(os.path.abspath(path))).get(int(meta["global_step"]))
    if recorded:
        lines.append("metrics recorded by an evaluator:")
        lines += [f"  {k} = {v:.6g}" for k, v in recorded.items()]
    return "\n".join(lines)
