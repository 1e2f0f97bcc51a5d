"""Crash-safe checkpoints: atomic save, verified restore, retention, latest.

A checkpoint is a directory ``<logdir>/model.ckpt-<global step>`` holding

* ``tensors.safetensors``: every tensor of the saved state, and
* ``state.json``: everything else (numbers, strings, lists, dicts), the
  structure that puts the tensors back in place, the global step, the
  SHA-256 of the tensor file, and the caller's ``metadata`` (e.g. the
  validation metrics measured on these weights).

Nothing is ever unpickled on load. A checkpoint is written into a hidden
temporary directory beside its final name, every file and the directory are
fsynced, and only then is it renamed into place: the rename is the commit. A
crash at any instant therefore leaves the previous committed checkpoint
loadable, and ``latest_checkpoint`` only ever sees committed ones. A state
holding NaN or Inf is refused before anything is written.

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

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Mapping
from typing import Any

import safetensors.torch
import torch

from torchslim import _listing, _records
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
    "save",
    "step_of",
]

log = logging.getLogger("torchslim")

CHECKPOINT_PREFIX = "model.ckpt"
TENSOR_FILE = "tensors.safetensors"
STATE_FILE = "state.json"
FORMAT = "torchslim.checkpoint/1"
_NAME = re.compile(re.escape(CHECKPOINT_PREFIX) + r"-(\d+)$")
_RESERVED = ("__tensor__", "__tuple__", "__items__")


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


# ---------------------------------------------------------------- encoding


def _encode(obj: Any, path: list[str], tensors: dict[str, torch.Tensor], seen: dict) -> Any:
    """Turn a nested state into JSON, moving tensors into ``tensors`` by a path-derived key."""
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
    shares_storage = any(v[0] == view[0] and v[5] == view[5] for v in seen) and t.numel() > 0
    t = t.to("cpu")
    tensors[key] = t.clone(memory_format=torch.contiguous_format) if shares_storage else t.contiguous()
    seen[view] = key
    return key


def _decode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__tuple__" in obj:
            return tuple(_decode(v, tensors) for v in obj["__tuple__"])
        if "__items__" in obj:
            return {_decode(k, tensors): _decode(v, tensors) for k, v in obj["__items__"]}
        return {k: _decode(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    return obj


def _nonfinite(tensors: dict[str, torch.Tensor]) -> list[str]:
    return [k for k, t in tensors.items()
            if (t.is_floating_point() or t.is_complex()) and not bool(torch.isfinite(t).all())]


# ---------------------------------------------------------------- files


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_durably(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


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
    """
    if not isinstance(state, Mapping):
        raise TypeError(f"`state` must be a dict, got {type(state).__name__}")
    _check_metadata(metadata)
    path = os.path.abspath(os.fspath(path))
    if global_step is None:
        global_step = step_of(path) if _NAME.match(os.path.basename(path)) else 0
    tensors: dict[str, torch.Tensor] = {}
    tree = _encode(state, [], tensors, {})
    if require_finite and (bad := _nonfinite(tensors)):
        raise NonFiniteError(f"refusing to checkpoint a state with NaN/Inf values in: {', '.join(bad)}")
    data = safetensors.torch.save(tensors)
    meta = {
        "format": FORMAT,
        "global_step": int(global_step),
        "created": time.time(),
        "final": bool(final),
        "files": {TENSOR_FILE: {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}},
        "state": tree,
    }
    if metadata is not None:
        meta["metadata"] = dict(metadata)
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.tmp-", dir=parent)
    try:
        _write_durably(os.path.join(tmp, TENSOR_FILE), data)
        _write_durably(os.path.join(tmp, STATE_FILE), json.dumps(meta).encode())
        _fsync_dir(tmp)
        _commit(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
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


def _commit(tmp: str, path: str) -> None:
    """Rename ``tmp`` to ``path``; an existing ``path`` is moved aside first, then removed."""
    parent = os.path.dirname(path)
    old = None
    if os.path.exists(path):
        old = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.old-", dir=parent)
        os.rename(path, os.path.join(old, "ckpt"))
    os.rename(tmp, path)
    _fsync_dir(parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The parsed ``state.json`` of a checkpoint (no tensors are read).

    Raises:
        ValueError: ``path`` is not a checkpoint.
        CorruptCheckpointError: its ``state.json`` cannot be parsed.
    """
    path = os.fspath(path)
    state_file = os.path.join(path, STATE_FILE)
    if not os.path.isfile(state_file):
        raise ValueError(f"{path!r} is not a torchslim checkpoint (no {STATE_FILE} in it)")
    try:
        with open(state_file, "rb") as f:
            meta = json.loads(f.read())
    except (ValueError, UnicodeDecodeError) as e:
        raise CorruptCheckpointError(f"checkpoint {path} is corrupt: {STATE_FILE} is not valid JSON ({e})") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CorruptCheckpointError(f"checkpoint {path} is corrupt: {STATE_FILE} is not in format {FORMAT}")
    return meta


def load(path: str | os.PathLike, *, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint back into the nested state that was saved, after checking its checksum.

    Raises:
        ValueError: ``path`` is not a checkpoint.
        CorruptCheckpointError: a file is missing, truncated, or fails its checksum.
    """
    path = os.fspath(path)
    meta = read_metadata(path)
    expected = meta["files"][TENSOR_FILE]
    try:
        with open(os.path.join(path, TENSOR_FILE), "rb") as f:
            data = f.read()
    except FileNotFoundError as e:
        raise CorruptCheckpointError(f"checkpoint {path} is corrupt: {TENSOR_FILE} is missing") from e
    if len(data) != expected["bytes"] or hashlib.sha256(data).hexdigest() != expected["sha256"]:
        raise CorruptCheckpointError(
            f"checkpoint {path} is corrupt: {TENSOR_FILE} has {len(data)} bytes and does not match "
            f"the checksum recorded when it was written ({expected['bytes']} bytes)"
        )
    tensors = safetensors.torch.load(data)
    if str(map_location) != "cpu":
        tensors = {k: v.to(map_location) for k, v in tensors.items()}
    return _decode(meta["state"], tensors)


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
    """

    def __init__(self, max_to_keep: int | None = 5, keep_checkpoint_every_n_hours: float | None = None,
                 require_finite: bool = True, *, keep_best: int = 0, metric: str | None = None,
                 mode: str = "max") -> None:
        check_non_negative_int(max_to_keep, "max_to_keep", optional=True)
        check_positive(keep_checkpoint_every_n_hours, "keep_checkpoint_every_n_hours", optional=True)
        check_bool(require_finite, "require_finite")
        check_non_negative_int(keep_best, "keep_best")
        if metric is not None and not (isinstance(metric, str) and metric):
            raise TypeError(f"`metric` must be a metric's name (a non-empty str) or None, got {metric!r}")
        if keep_best and metric is None:
            raise ValueError(f"`keep_best`={keep_best} needs `metric`, the name of the metric to rank checkpoints "
                             "by, e.g. Saver(keep_best=3, metric='accuracy')")
        self.max_to_keep = max_to_keep or None
        self.keep_checkpoint_every_n_hours = keep_checkpoint_every_n_hours
        self.require_finite = require_finite
        self.keep_best, self.metric, self.mode = keep_best, metric, _records.check_mode(mode)
        self._created = time.time()
        self._preserved: dict[str, set[str]] = {}
        self._metrics: dict[str, dict[str, float]] = {}  # each checkpoint's metadata metrics, read once

    def keeping_best(self, keep_best: int, metric: str, mode: str = "max") -> Saver:
        """A saver with this one's settings that also keeps the best ``keep_best`` by ``metric`` (in ``mode``)."""
        saver = Saver(self.max_to_keep, self.keep_checkpoint_every_n_hours, self.require_finite,
                      keep_best=keep_best, metric=metric, mode=mode)
        saver._created = self._created
        return saver

    def save(self, state: Mapping[str, Any], logdir: str | os.PathLike, global_step: int, *,
             final: bool = False, metadata: Mapping[str, Any] | None = None) -> str:
        """Commit ``state`` as ``<logdir>/model.ckpt-<global_step>``, then apply retention.

        ``final`` and ``metadata``: see :func:`save`. A saver with a ``metric`` adds
        ``"watch": {"metric", "mode"}`` to the metadata, for :func:`best_checkpoint`.
        """
        logdir = os.path.abspath(os.fspath(logdir))
        preserved = self._preserved_in(logdir)
        if self.metric is not None and not (metadata or {}).get("watch"):  # for best_checkpoint(logdir)
            metadata = {**(metadata or {}), "watch": {"metric": self.metric, "mode": self.mode}}
        path = save(state, checkpoint_path(logdir, global_step), global_step=global_step,
                    require_finite=self.require_finite, final=final, metadata=metadata)
        self._metrics[path] = _metadata_metrics(metadata)
        self._retire_old(logdir, preserved)
        return path

    def _preserved_in(self, logdir: str) -> set[str]:
        """On first use of a logdir: clear crash leftovers and adopt old checkpoints kept for good."""
        if logdir not in self._preserved:
            for name in os.listdir(logdir) if os.path.isdir(logdir) else []:
                if name.startswith(f".{CHECKPOINT_PREFIX}-"):
                    shutil.rmtree(os.path.join(logdir, name), ignore_errors=True)
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
            _remove(path)

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

    def restore_latest(self, logdir: str | os.PathLike, *, map_location: str | torch.device = "cpu"
                       ) -> tuple[str, dict[str, Any]] | None:
        """Load the newest readable checkpoint in ``logdir``: ``(path, state)``, or ``None`` if there is none.

        A corrupt checkpoint is reported by name in a warning and the one before it is tried.
        """
        for path in reversed(list_checkpoints(logdir)):
            try:
                return path, load(path, map_location=map_location)
            except CorruptCheckpointError as e:
                log.warning("%s; falling back to the checkpoint before it", e)
        return None


def _remove(path: str) -> None:
    """Delete a checkpoint so that it is never seen half-deleted: rename it out of view first."""
    parent, name = os.path.split(path)
    trash = tempfile.mkdtemp(prefix=f".{name}.del-", dir=parent)
    try:
        os.rename(path, os.path.join(trash, name))
    except FileNotFoundError:
        pass
    shutil.rmtree(trash, ignore_errors=True)


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
    """A human-readable listing of a checkpoint: metadata, the model's tensors with their total, then values.

    ``path`` may also be a logdir, in which case its latest checkpoint is described.
    Names sort naturally (``layer/3`` before ``layer/11``). Optimizer state, RNG
    states and the data position are folded into one line per group unless
    ``show_all``.
    """
    path = os.fspath(path)
    check_bool(show_all, "show_all")
    if not os.path.exists(path):
        raise ValueError(f"no checkpoint or logdir at {path!r}")
    if not os.path.isfile(os.path.join(path, STATE_FILE)):
        latest = latest_checkpoint(path)
        if latest is None:
            raise ValueError(f"{path!r} is neither a torchslim checkpoint nor a logdir holding one")
        path = latest
    meta = read_metadata(path)
    with safetensors.safe_open(os.path.join(path, TENSOR_FILE), framework="pt") as f:
        tensors = [(name, f.get_slice(name).get_dtype(), f.get_slice(name).get_shape()) for name in f.keys()]
    lines = [_listing.render(path, meta, tensors, show_all=show_all)]
    if meta.get("metadata"):
        lines.append("metadata:")
        lines += [f"  {k} = {v}" for k, v in _listing._leaves(meta["metadata"], "")]
    recorded = _records.read_records(os.path.dirname(os.path.abspath(path))).get(int(meta["global_step"]))
    if recorded:
        lines.append("metrics recorded by an evaluator:")
        lines += [f"  {k} = {v:.6g}" for k, v in recorded.items()]
    return "\n".join(lines)
