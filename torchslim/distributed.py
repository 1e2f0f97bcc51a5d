"""Several processes: the process group, the chief, gradient averaging, and asynchronous workers.

Synchronous data parallelism runs on PyTorch's own engine. Launch the same
script once per process with ``torchrun`` (or pass ``master=``, ``rank=`` and
``world_size=`` to ``learning.train``); ``train`` then

* sets up the process group (gloo on CPU, nccl for a model on CUDA) and tears
  it down at the end, unless the caller had set one up already;
* restores, on every process, the checkpoint the chief picked, or broadcasts the
  chief's freshly initialized weights, so that all start equal;
* averages the gradients of every step across processes (one all-reduce over a
  flat buffer per dtype, after the backward pass), so that all stay equal;
* gives each process every ``world_size``-th batch of one shared order;
* lets only the chief (rank 0 unless ``is_chief`` says otherwise) write
  checkpoints, summaries and traces;
* stops every process at the same step on a signal: the stop request travels in
  the gradient all-reduce, so agreeing on it costs no extra message.

Asynchronous updates, the original's behaviour without a sync optimizer, are
:func:`hogwild`: worker processes forked on one machine update the model's
shared-memory parameters without waiting for each other, while the chief also
checkpoints and summarizes.
"""

from __future__ import annotations

import datetime
import logging
import multiprocessing
import os
import signal
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from torchslim._types import GlobalStep

__all__ = ["Cluster", "GradientAverager", "SharedGlobalStep", "hogwild", "resolve_cluster"]

log = logging.getLogger("torchslim")


@dataclass(frozen=True)
class Cluster:
    """Who this process is in the run: ``rank`` of ``world_size``, and whether it is the chief."""

    rank: int = 0
    world_size: int = 1
    is_chief: bool = True
    init_method: str | None = None  # None: the environment set by torchrun (or a group that already exists)
    timeout_secs: float = 300.0

    @property
    def active(self) -> bool:
        return self.world_size > 1


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    return int(value) if value not in (None, "") else None


def resolve_cluster(master: str | None = None, rank: int | None = None, world_size: int | None = None,
                    is_chief: bool | None = None, timeout_secs: float = 300.0) -> Cluster:
    """Work out this process's place from the arguments, an existing process group, or torchrun's environment.

    Checks only; nothing is started.
    """
    if master is not None and not isinstance(master, str):
        raise TypeError(f"`master` must be an address like 'tcp://10.0.0.1:29500' or None, got {master!r}")
    for name, value in (("rank", rank), ("world_size", world_size)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise ValueError(f"`{name}` must be a non-negative int or None, got {value!r}")
    if dist.is_available() and dist.is_initialized():
        rank, world_size, init = dist.get_rank(), dist.get_world_size(), None
    else:
        rank = rank if rank is not None else _env_int("RANK")
        world_size = world_size if world_size is not None else _env_int("WORLD_SIZE")
        init = None if master is None else (master if "://" in master else f"tcp://{master}")
        if master is not None and (rank is None or world_size is None):
            raise ValueError(f"`master`={master!r} needs `rank` and `world_size` (or RANK and WORLD_SIZE in the environment)")
    rank, world_size = rank or 0, world_size or 1
    if world_size < 1 or rank >= world_size:
        raise ValueError(f"`rank` must be in [0, world_size): got rank={rank}, world_size={world_size}")
    if is_chief is not None and not isinstance(is_chief, bool):
        raise TypeError(f"`is_chief` must be True, False or None (rank 0), got {is_chief!r}")
    return Cluster(rank, world_size, rank == 0 if is_chief is None else is_chief, init, timeout_secs)


def start(cluster: Cluster, device: torch.device | None) -> bool:
    """Join the process group; return whether this call created it (and so must destroy it)."""
    if not cluster.active or dist.is_initialized():
        return False
    backend = "nccl" if device is not None and device.type == "cuda" else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(device)
    timeout = datetime.timedelta(seconds=cluster.timeout_secs)
    store = _attempt_store(cluster, timeout)
    if store is not None:
        dist.init_process_group(backend, store=store, rank=cluster.rank, world_size=cluster.world_size,
                                timeout=timeout)
    else:
        dist.init_process_group(backend, init_method=cluster.init_method or "env://", rank=cluster.rank,
                                world_size=cluster.world_size, timeout=timeout)
    log.info("Joined a process group of %d (rank %d, %s)", cluster.world_size, cluster.rank, backend)
    return True


def _attempt_store(cluster: Cluster, timeout: datetime.timedelta) -> dist.Store | None:
    """Under torchrun with restarts, a store whose keys belong to this attempt only.

    torchrun can hand a restarted group the store of the attempt before, and a
    process that reads a peer's address written by the previous attempt connects
    to a dead port (seen here with --max-restarts on loopback). Prefixing every key
    with the restart count, the same in every process of a restarted group, rules that out.
    """
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if cluster.init_method is not None or attempt is None or "MASTER_ADDR" not in os.environ:
        return None
    agent_hosts_it = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), cluster.world_size,
                          is_master=cluster.rank == 0 and not agent_hosts_it, timeout=timeout)
    return dist.PrefixStore(f"torchslim/attempt_{attempt}", store)


def stop(created: bool) -> None:
    if created and dist.is_initialized():
        dist.destroy_process_group()


class naming_the_rank:
    """Add the rank to an error raised in a group, and say when a collective failed because a peer died."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type | None, error: BaseException | None, tb: Any) -> None:
        if error is None or not self.cluster.active or not isinstance(error, Exception):
            return
        where = f"rank {self.cluster.rank} of {self.cluster.world_size}"
        if isinstance(error, (dist.DistBackendError, RuntimeError)) and _looks_like_a_lost_peer(error):
            note = f"torchslim: on {where}, a collective failed: another process has probably died (see its error)"
        else:
            note = f"torchslim: raised on {where}"
        log.error("%s: %s: %s", note, type(error).__name__, error)
        if hasattr(error, "add_note"):
            error.add_note(note)


def _looks_like_a_lost_peer(error: BaseException) -> bool:
    text = str(error).lower()
    return any(k in text for k in ("connection", "closed", "peer", "timed out", "timeout", "gloo", "nccl"))


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` as the process of rank ``src`` has it."""
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def broadcast_tensors(tensors: Sequence[torch.Tensor], src: int = 0) -> None:
    """Overwrite ``tensors`` in place with rank ``src``'s values (one message per tensor group)."""
    with torch.no_grad():
        for group in _groups(tensors):
            flat = torch._utils._flatten_dense_tensors(group)
            dist.broadcast(flat, src=src)
            for t, value in zip(group, torch._utils._unflatten_dense_tensors(flat, group)):
                t.copy_(value)


def give_shuffle_a_shared_generator(data: Any) -> None:
    """Make every process shuffle alike: a DataLoader shuffling from the global RNG gets a generator of its own.

    The processes split one order of the batches between them, so the order must
    be the same everywhere, while each process's global RNG (dropout) differs. The
    seed is the chief's; the generator's state is checkpointed with the data position.
    """
    sampler = getattr(data, "sampler", None)
    if isinstance(sampler, torch.utils.data.RandomSampler) and sampler.generator is None:
        seed = broadcast_object(int(torch.randint(0, 2**62, ()).item()))
        sampler.generator = torch.Generator().manual_seed(seed)


def _groups(tensors: Sequence[torch.Tensor]) -> list[list[torch.Tensor]]:
    """Tensors grouped by (device, dtype), in order, so each group flattens into one buffer."""
    groups: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
    for t in tensors:
        groups.setdefault((t.device, t.dtype), []).append(t)
    return list(groups.values())


class GradientAverager:
    """Averages gradients across processes after each backward pass; carries the stop vote along.

    One all-reduce per (device, dtype) group of parameters, over a flat buffer
    made once: each step copies the gradients in, reduces, scales, and leaves
    every ``param.grad`` a view into the buffer (no copy back). The first group's
    buffer has one extra element: each process's wish to stop (a signal), summed,
    so that every process learns of any stop request in the same step.
    """

    def __init__(self, params: Sequence[torch.Tensor], world_size: int) -> None:
        self.world_size = world_size
        self.wants_stop = False
        self.groups = _groups(list(params))
        self.buffers = [torch.empty(sum(p.numel() for p in g) + (i == 0), dtype=g[0].dtype, device=g[0].device)
                        for i, g in enumerate(self.groups)]
        self.peers_stop = self.buffers[0][-1:]  # the summed votes of the last step

    def __call__(self) -> None:
        with torch.no_grad():
            for i, (group, flat) in enumerate(zip(self.groups, self.buffers)):
                offset, views = 0, []
                for p in group:
                    view = flat[offset:offset + p.numel()].view_as(p)
                    if p.grad is None:
                        view.zero_()
                    else:
                        view.copy_(p.grad)
                    views.append(view)
                    offset += p.numel()
                if i == 0:  # the stop vote rides along with the first group
                    flat[-1] = float(self.wants_stop)
                dist.all_reduce(flat)
                flat[:offset].div_(self.world_size)
                for p, view in zip(group, views):
                    p.grad = view

    def stop_agreed(self) -> bool:
        """Whether any process asked to stop in the last step (a host read of one number)."""
        return bool(self.peers_stop > 0)


# ---------------------------------------------------------------- asynchronous


class SharedGlobalStep(GlobalStep):
    """A global step in shared memory, counted by every worker process (one lock per increment)."""

    __slots__ = ("_shared",)

    def __init__(self, value: int = 0, context: Any = None) -> None:
        self._shared = (context or multiprocessing.get_context("fork")).Value("q", value)

    @property  # type: ignore[override]
    def value(self) -> int:
        return int(self._shared.value)

    @value.setter
    def value(self, new: int) -> None:
        self._shared.value = new

    def increment(self) -> None:
        with self._shared.get_lock():
            self._shared.value += 1


def fork_context() -> Any:
    return multiprocessing.get_context("fork")


def share_for_workers(train_op: Any) -> SharedGlobalStep:
    """Move the train op's model state into shared memory; return a shared copy of its global step."""
    for tensor in train_op.model_variables().values():
        tensor.share_memory_()
    return SharedGlobalStep(train_op.step)


def async_worker_loop(train_op: Any, data: Any, index: int, num_workers: int, train_step_fn: Callable[..., Any],
                      kwargs: dict[str, Any], startup_delay_steps: int, stop: Any) -> None:
    """A non-chief asynchronous worker: wait for the start-up delay, then step on its shard until told to stop."""
    from torchslim._data import DataStream  # the stream lives with the data code

    while train_op.step < startup_delay_steps and not stop.is_set():
        stop.wait(0.01)
    stream = DataStream(data, (index, num_workers)) if data is not None else DataStream(None)
    for batch in stream:
        if stop.is_set():
            return
        _, should_stop = train_step_fn(train_op, batch, kwargs)
        if should_stop:
            return


def hogwild(run: Callable[[int], Any], num_workers: int, *, stop_grace_period_secs: float = 120) -> Any:
    """Run ``run(worker_index)`` in ``num_workers - 1`` forked processes and in this one (index 0, the chief).

    Before forking, tensors the caller made shared (``model.share_memory()``) are
    seen and updated by all; everything else is copied. The chief's return value
    is returned once every worker has ended; a worker that failed, or that has not
    ended ``stop_grace_period_secs`` after the chief (it is then killed), raises
    ``RuntimeError`` naming it and its exit code. Forking requires the CPU; each
    forked worker computes with one thread.
    """
    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 1:
        raise ValueError(f"`num_workers` must be a positive int, got {num_workers!r}")
    context = multiprocessing.get_context("fork")
    workers = [context.Process(target=_worker_main, args=(run, i), name=f"torchslim-worker-{i}", daemon=True)
               for i in range(1, num_workers)]
    for w in workers:
        w.start()
    try:
        result = run(0)
    finally:
        hung = []
        for w in workers:
            w.join(stop_grace_period_secs)
            if w.is_alive():
                w.kill()
                w.join()
                hung.append(w)
    failed = [f"{w.name} ({'did not stop; killed' if w in hung else f'exit code {w.exitcode}'})"
              for w in workers if w in hung or w.exitcode != 0]
    if failed:
        raise RuntimeError(f"asynchronous worker(s) failed: {', '.join(failed)}; see their errors above")
    return result


def _worker_main(run: Callable[[int], Any], index: int) -> None:
    # Ctrl-C reaches the chief, which then stops the workers; the chief's handlers are not theirs.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    # The parent's OpenMP thread team does not survive a fork; a worker that entered a
    # parallel region with it could hang. One thread per worker also avoids oversubscription.
    torch.set_num_threads(1)
    try:
        run(index)
    except BaseException:
        log.exception("asynchronous worker %d failed", index)
        os._exit(1)
    os._exit(0)  # skip the parent's atexit handlers and finalizers, which belong to the chief
