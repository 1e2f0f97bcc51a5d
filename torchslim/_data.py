"""The training data as a resumable stream: epochs, position, RNG states, sharding.

``DataStream`` iterates any iterable epoch after epoch and knows where it
stands: the epoch, the batches taken in it, and the RNG states at the epoch's
start. Restored from that position, it replays the same shuffle order and skips
what was consumed: a ``DataLoader`` with ``num_workers=0`` over a map-style
dataset skips by index, without loading; other iterables skip by drawing
batches. Data with its own ``state_dict``/``load_state_dict`` (torchdata's
``StatefulDataLoader``) is restored through those instead. In a run over several
processes, each takes every ``world_size``-th batch of one shared order, and an
epoch is cut to a multiple of ``world_size`` batches so that all take the same
number of steps.

:func:`iterate` reads a ``DataLoader`` batch by batch as the loader would, but
with one indexed read per batch where it can (see :class:`BatchedReads`).
"""

from __future__ import annotations

import contextlib
import random
import sys
from collections.abc import Iterator
from typing import Any

import torch
import torch.utils.data

# ---------------------------------------------------------------- RNG states


def capture_rng() -> dict[str, Any]:
    """The global RNG states: torch (CPU and initialized CUDA devices), Python's ``random``, NumPy's."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    numpy = sys.modules.get("numpy")
    if numpy is not None:
        kind, keys, pos, has_gauss, gauss = numpy.random.get_state()
        state["numpy"] = [kind, keys.tolist(), pos, has_gauss, gauss]
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Set the global RNG states that :func:`capture_rng` returned."""
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    numpy = sys.modules.get("numpy")
    if numpy is not None and "numpy" in state:
        kind, keys, pos, has_gauss, gauss = state["numpy"]
        numpy.random.set_state((kind, numpy.asarray(keys, dtype=numpy.uint32), pos, has_gauss, gauss))


def _loader_generators(data: Any) -> list[torch.Generator]:
    """Generators a DataLoader draws its shuffle order and worker seeds from, besides the global one."""
    if not isinstance(data, torch.utils.data.DataLoader):
        return []
    found = [getattr(data, "generator", None), getattr(data.sampler, "generator", None)]
    batch_sampler = getattr(data, "batch_sampler", None)
    if batch_sampler is not None:
        found.append(getattr(getattr(batch_sampler, "sampler", None), "generator", None))
    unique: list[torch.Generator] = []
    for g in found:
        if isinstance(g, torch.Generator) and all(g is not u for u in unique):
            unique.append(g)
    return unique


# ---------------------------------------------------------------- batched reads


def iterate(data: Any) -> Iterator[Any]:
    """``iter(data)``, with each batch of a ``DataLoader`` read in one indexed read where that is the same batch."""
    reader = _batch_reader(data)
    if reader is None:
        return iter(data)
    return BatchedReads(iter(data), reader)


class BatchedReads:
    """A single-process ``DataLoader``'s batches, each read with one indexed read instead of per-sample reads + collate.

    The loader's own iterator is made (it draws its base seed, as ``iter(loader)``
    always does) and its batch sampler gives the indices, so the same RNG is
    consumed in the same order and the batches are bitwise the loader's: a
    ``TensorDataset`` is indexed with the whole index tensor (what
    ``default_collate`` would stack, as a list, as it returns); a dataset with
    ``__getitems__`` gets the list of indices, and the result goes through the
    loader's ``collate_fn``, as the loader does (it saves the loader's per-batch
    machinery only).
    """

    def __init__(self, loader_iter: Any, reader: Any) -> None:
        self.loader_iter = loader_iter
        self.read = reader

    def __iter__(self) -> BatchedReads:
        return self

    def __next__(self) -> Any:
        indices = self.loader_iter._next_index()  # raises StopIteration at the epoch's end
        self.loader_iter._num_yielded += 1
        return self.read(indices)

    def skip(self, n: int) -> None:
        """Advance ``n`` batches without reading them (the sampler still draws its indices)."""
        for _ in range(n):
            self.loader_iter._next_index()
        self.loader_iter._num_yielded += n


def _batch_reader(data: Any) -> Any:
    """``indices -> batch`` equal to what ``data`` (a DataLoader) would yield, or None where that cannot be done."""
    if not (isinstance(data, torch.utils.data.DataLoader) and data.num_workers == 0 and data.batch_sampler is not None
            and not data.pin_memory and type(data).__iter__ is torch.utils.data.DataLoader.__iter__
            and not callable(getattr(data, "state_dict", None))):  # a stateful loader counts what its iterator yields
        return None
    dataset = data.dataset
    if isinstance(dataset, torch.utils.data.IterableDataset):
        return None
    tensors = _plain_tensor_dataset(dataset)
    if tensors is not None:
        if data.collate_fn is not torch.utils.data.default_collate:
            return None

        def read_tensors(indices: list[int]) -> list[torch.Tensor]:
            index = torch.tensor(indices, dtype=torch.long)
            return [t[index] for t in tensors]  # default_collate turns a batch of tuples into a list

        return read_tensors
    getitems = getattr(dataset, "__getitems__", None)
    if callable(getitems):
        collate = data.collate_fn

        def read_items(indices: list[int]) -> Any:
            return collate(getitems(indices))

        return read_items
    return None


def _plain_tensor_dataset(dataset: Any) -> tuple[torch.Tensor, ...] | None:
    """The tensors of a ``TensorDataset`` whose items are their rows (not a subclass that changes ``__getitem__``)."""
    if not isinstance(dataset, torch.utils.data.TensorDataset):
        return None
    kind = type(dataset)
    if kind.__getitem__ is not torch.utils.data.TensorDataset.__getitem__ or hasattr(kind, "__getitems__"):
        return None
    if not all(isinstance(t, torch.Tensor) and t.dim() >= 1 for t in dataset.tensors):
        return None
    return dataset.tensors


# ---------------------------------------------------------------- data


class DataStream:
    """Iterates ``data`` epoch after epoch and knows its position, for exact resume."""

    def __init__(self, data: Any, shard: tuple[int, int] = (0, 1)) -> None:
        self.data = data
        self.shard = shard  # (rank, world_size): take the batches whose index is rank modulo world_size
        self.epoch = 0
        self.batch = 0  # batches handed out in the current epoch
        self._epoch_rng: dict[str, Any] | None = None
        self._resume: tuple[dict[str, Any], dict[str, Any] | None] | None = None
        self._stateful = callable(getattr(data, "state_dict", None)) and callable(getattr(data, "load_state_dict", None))

    def state_dict(self) -> dict[str, Any]:
        if self._resume is not None:  # restored but not yet iterated: still at the restored position
            return dict(self._resume[0])
        state: dict[str, Any] = {"epoch": self.epoch, "batch": self.batch}
        if self._stateful:
            state["loader"] = self.data.state_dict()
        elif self._epoch_rng is not None:
            state["epoch_rng"] = self._epoch_rng
        return state

    def load_state_dict(self, state: dict[str, Any], rng_after: dict[str, Any] | None = None) -> None:
        """Resume at ``state``; ``rng_after`` (the checkpoint's RNG states) is set once the skip is done."""
        self._resume = (state, rng_after)

    def __iter__(self) -> Iterator[Any]:
        if self.data is None:
            while True:
                yield None
        while True:
            it = self._start_epoch()
            yielded = self.batch > 0
            for batch in (it if self.shard[1] == 1 else self._sharded(it)):
                if self.shard[1] == 1:
                    self.batch += 1
                yielded = True
                yield batch
            if not yielded or isinstance(self.data, Iterator):
                return  # an empty epoch or a one-shot iterator: the data has run out
            self.epoch += 1
            self.batch = 0

    def _sharded(self, it: Iterator[Any]) -> Iterator[Any]:
        """This process's batches of the epoch; the epoch is cut to a multiple of world_size batches.

        Batches go in rounds of ``world_size``, one to each process; the position
        moves a whole round at a time, so it reads the same on every process.
        """
        rank, world = self.shard
        usable = len(self.data) // world * world
        while self.batch + world <= usable:
            try:
                self._skip(it, rank)
                batch = next(it)
                self._skip(it, world - rank - 1)
            except StopIteration:
                return
            self.batch += world
            yield batch
        # Run the epoch's iterator out, as one process does: a sampler draws again when
        # exhausted (RandomSampler with its own generator does), and the next epoch's
        # order must come from the same generator state as in a run of one process.
        with contextlib.suppress(StopIteration):
            while True:
                self._skip(it, 1)

    def _start_epoch(self) -> Iterator[Any]:
        if self._resume is None:
            self._epoch_rng = self._capture()
            return iterate(self.data)
        (state, rng_after), self._resume = self._resume, None
        self.epoch, self.batch = int(state["epoch"]), int(state["batch"])
        if "loader" in state:
            self.data.load_state_dict(state["loader"])
            it = iter(self.data)
        else:
            self._epoch_rng = state.get("epoch_rng")
            if self._epoch_rng is not None:
                self._restore(self._epoch_rng)
            it = iterate(self.data)
            self._skip(it, self.batch)
        if rng_after is not None:
            restore_rng(rng_after)
        return it

    def _capture(self) -> dict[str, Any]:
        return {"global": capture_rng(), "loader": [g.get_state() for g in _loader_generators(self.data)]}

    def _restore(self, state: dict[str, Any]) -> None:
        restore_rng(state["global"])
        for g, s in zip(_loader_generators(self.data), state["loader"]):
            g.set_state(s)

    def _skip(self, it: Iterator[Any], n: int) -> None:
        if isinstance(it, BatchedReads):
            it.skip(n)
            return
        sampler_iter = getattr(it, "_sampler_iter", None)
        dataset = getattr(self.data, "dataset", None)
        if (type(it).__name__ == "_SingleProcessDataLoaderIter" and sampler_iter is not None
                and not isinstance(dataset, torch.utils.data.IterableDataset)):
            for _ in range(n):  # advance the index sampler only: no sample is loaded
                next(sampler_iter)
            it._num_yielded += n  # type: ignore[attr-defined]
            return
        for _ in range(n):
            next(it)
