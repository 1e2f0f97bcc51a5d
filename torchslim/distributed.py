"""Several processes: the process group, the chief, gradient averaging, and asynchronous workers.

Synchronous data parallelism runs on PyTorch's own engine. Launch the same
script once per process with ``torchrun`` (or pass ``master=``, ``rank=`` and
``world_size=`` to ``learning.train``); ``train`` then

* sets up the process group (gloo on CPU, nccl for a model on CUDA) and tears
  it down at the end, unless the caller had set one up already;
* restores, on every process, the checkpoint the chief picked (a process that
  cannot read it, on a machine that does not see the chief's logdir, receives
  it from the chief by broadcast), or broadcasts the chief's freshly
  initialized weights, so that all start equal;
* averages the gradients of every update across processes with PyTorch's
  ``DistributedDataParallel`` (buckets all-reduced while the backward pass still
  runs), driven through hooks on the user's own modules: the loss function keeps
  calling the user's model, and checkpoint names stay its ``state_dict`` names;
* gives each process every ``world_size``-th batch of one shared order;
* lets only the chief (rank 0 unless ``is_chief`` says otherwise) write
  checkpoints, summaries and traces;
* stops every process at the same step on a signal: every 8 steps each process
  casts a vote (a one-number all-reduce on the CPU, started after one step and
  read after the next, so it never waits on the device).

Asynchronous updates, the original's behaviour without a sync optimizer, are
:func:`hogwild`: worker processes forked on one machine update the model's
shared-memory parameters without waiting for each other, while the chief also
checkpoints and summarizes.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from torchslim import checkpoint
from torchslim._checks import check_bool, check_non_negative_int
from torchslim._engine import Engine
from torchslim._gradsync import DDPGradients, GradientAverager
from torchslim._hogwild import Hogwild, SharedGlobalStep, hogwild

__all__ = ["Cluster", "DataParallel", "DDPGradients", "GradientAverager", "SharedGlobalStep", "StopVote", "engine_for", "hogwild",
           "resolve_cluster"]

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
    check_non_negative_int(rank, "rank", optional=True)
    check_non_negative_int(world_size, "world_size", optional=True)
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
    check_bool(is_chief, "is_chief", optional=True)
    return Cluster(rank, world_size, rank == 0 if is_chief is None else is_chief, init, timeout_secs)


def start_group(cluster: Cluster, device: torch.device | None) -> bool:
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


def give_shuffle_a_shared_generator(data: Any, src: int = 0) -> None:
    """Make every process shuffle alike: a DataLoader shuffling from the global RNG gets a generator of its own.

    The processes split one order of the batches between them, so the order must
    be the same everywhere, while each process's global RNG (dropout) differs. The
    seed is the chief's; the generator's state is checkpointed with the data position.
    """
    sampler = getattr(data, "sampler", None)
    if isinstance(sampler, torch.utils.data.RandomSampler) and sampler.generator is None:
        seed = broadcast_object(int(torch.randint(0, 2**62, ()).item()), src)
        sampler.generator = torch.Generator().manual_seed(seed)


def _groups(tensors: Sequence[torch.Tensor]) -> list[list[torch.Tensor]]:
    """Tensors grouped by (device, dtype), in order, so each group flattens into one buffer."""
    groups: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
    for t in tensors:
        groups.setdefault((t.device, t.dtype), []).append(t)
    return list(groups.values())


class StopVote:
    """Lets processes agree to stop after the same step: a stop wins if any process asked for one.

    Every ``every_n_steps`` global steps each process casts its vote: an
    all-reduce of one number over a gloo group, so it lives on the CPU whatever
    the model's device. It is started after that step and read after the next,
    so its latency hides behind a step; all processes therefore stop at the same
    global step, at most ``every_n_steps`` + 1 steps after the first request.
    Voting less often than every step keeps its cost (a collective, thread
    wake-ups) off most steps.
    """

    def __init__(self, every_n_steps: int = 8) -> None:
        # Its own group: the votes never queue behind (or interleave with) gradient traffic.
        self.group = dist.new_group(backend="gloo")
        self.every_n_steps = every_n_steps
        self.box = torch.zeros(1)
        self.pending: Any = None

    def __call__(self, wants_stop: bool, step: int) -> bool:
        if self.pending is not None:
            self.pending.wait()
            self.pending = None
            if self.box.item() > 0:  # a CPU tensor: no device sync
                return True
        if step % self.every_n_steps == 0:
            self.box.fill_(float(wants_stop))
            self.pending = dist.all_reduce(self.box, group=self.group, async_op=True)
        return False

    def close(self) -> None:
        """Wait for a vote still in flight (every process cast the same number of votes)."""
        if self.pending is not None:
            self.pending.wait()
            self.pending = None
        dist.destroy_process_group(self.group)


class DataParallel(Engine):
    """Synchronous data parallelism: every process holds the model, gradients are averaged each update.

    Joins the process group (unless one exists), restores on every process the
    checkpoint the chief picked (or broadcasts the chief's fresh weights), gives
    a shuffling DataLoader a generator shared by all, averages the gradients with
    :class:`DDPGradients` (a :class:`GradientAverager` for loose tensors, which
    DDP cannot take), and stops all processes together (:class:`StopVote`).
    """

    def __init__(self, cluster: Cluster, device: torch.device | None) -> None:
        super().__init__(cluster.rank, cluster.world_size, cluster.is_chief)
        self.cluster, self.device = cluster, device
        self.created_group = False
        self.vote: StopVote | None = None
        self.sync: DDPGradients | GradientAverager | None = None
        self.chief_rank = 0

    def start(self) -> None:
        self.created_group = start_group(self.cluster, self.device)
        self.vote = StopVote()
        # is_chief may name another rank than 0: every broadcast of the chief's state comes from it.
        flags = torch.tensor([self.rank if self.is_chief else -1])
        dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self.vote.group)
        self.chief_rank = max(int(flags.item()), 0)

    def close(self) -> None:
        if self.sync is not None:
            self.sync.close()  # its hooks leave the user's modules and parameters
            self.sync = None
        if self.vote is not None and dist.is_initialized():
            self.vote.close()
        self.vote = None
        if self.created_group and dist.is_initialized():
            dist.destroy_process_group()
        self.created_group = False

    def prepare_data(self, data: Any) -> None:
        give_shuffle_a_shared_generator(data, self.chief_rank)

    def find_checkpoint(self, find: Callable[[], Any]) -> Any:
        """The chief looks; every process loads the checkpoint it found, or receives it from the chief.

        A process that cannot read the path (a machine that does not see the
        chief's logdir) gets the chief's state by broadcast: tensors as one
        safetensors buffer, the rest as JSON (nothing is pickled).
        """
        restored = find() if self.is_chief else None
        path = broadcast_object(restored[0] if restored else None, self.chief_rank)
        if path is None:
            return None
        state, failure = (restored[1], None) if restored is not None else _try_load(path)
        missing = torch.tensor([0 if state is not None else 1])
        dist.all_reduce(missing)
        if int(missing.item()) == 0:
            return path, state
        if state is None:
            log.warning("Rank %d cannot read %s (%s): receiving the checkpoint from the chief", self.rank, path,
                        failure)
        received = broadcast_state(state if self.is_chief else None, self.chief_rank)
        return path, state if state is not None else received

    def prepare(self, train_op: Any, restored: bool) -> DDPGradients | GradientAverager:
        if not restored:  # every process starts from the chief's weights
            broadcast_tensors(list(train_op.model_variables().values()), self.chief_rank)
        modules = train_op.modules
        in_modules = {id(p) for m in modules.values() for p in m.parameters()}
        if modules and all(id(p) in in_modules for p in train_op.trained_parameters):
            self.sync = DDPGradients(modules, train_op.trained_parameters, self.device)
        else:  # loose tensors are no module's parameters: DDP cannot reduce them
            self.sync = GradientAverager(train_op.trained_parameters, self.world_size)
        return self.sync

    def agree_to_stop(self, wants_stop: bool, step: int) -> bool:
        if self.vote is None:
            raise RuntimeError("DataParallel.agree_to_stop() before start()")
        return self.vote(wants_stop, step)


def _try_load(path: str) -> tuple[dict[str, Any] | None, str | None]:
    try:
        return checkpoint.load(path, mmap=False), None  # a run's state: its optimizer writes it all
    except (OSError, ValueError) as error:
        return None, f"{type(error).__name__}: {error}"


def broadcast_state(state: dict[str, Any] | None, src: int) -> dict[str, Any]:
    """A checkpoint's state as rank ``src`` has it: tensors in one safetensors buffer, the rest JSON."""
    from safetensors.torch import load as st_load
    from safetensors.torch import save as st_save

    if dist.get_rank() == src:
        if state is None:
            raise RuntimeError("broadcast_state: the source rank has no state")
        tensors: dict[str, torch.Tensor] = {}
        tree = _flatten(state, tensors)
        payloads = [json.dumps(tree).encode(), st_save({k: v.cpu().clone() for k, v in tensors.items()})]
        sizes = torch.tensor([len(p) for p in payloads], dtype=torch.int64)
    else:
        payloads, sizes = [], torch.zeros(2, dtype=torch.int64)
    dist.broadcast(sizes, src=src)
    buffers = [torch.frombuffer(bytearray(p), dtype=torch.uint8) if payloads else
               torch.empty(int(n), dtype=torch.uint8) for p, n in zip(payloads or [b"", b""], sizes.tolist())]
    for b in buffers:
        dist.broadcast(b, src=src)
    if payloads:
        return state  # type: ignore[return-value]
    tree, tensors = json.loads(bytes(buffers[0].numpy())), st_load(bytes(buffers[1].numpy()))
    return _unflatten(tree, tensors)


_TENSOR_KEY = "__torchslim_tensor__"


def _flatten(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """``obj`` with each tensor replaced by a reference into ``tensors`` (JSON-able if the rest is)."""
    if isinstance(obj, torch.Tensor):
        key = str(len(tensors))
        tensors[key] = obj.detach()
        return {_TENSOR_KEY: key}
    if isinstance(obj, dict):
        return {"__dict__": [[_flatten(k, tensors), _flatten(v, tensors)] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        return {"__list__" if isinstance(obj, list) else "__tuple__": [_flatten(v, tensors) for v in obj]}
    return obj


def _unflatten(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        if _TENSOR_KEY in obj:
            return tensors[obj[_TENSOR_KEY]]
        if "__dict__" in obj:
            return {_unflatten(k, tensors): _unflatten(v, tensors) for k, v in obj["__dict__"]}
        if "__list__" in obj:
            return [_unflatten(v, tensors) for v in obj["__list__"]]
        return tuple(_unflatten(v, tensors) for v in obj["__tuple__"])
    return obj


def engine_for(cluster: Cluster, device: torch.device | None, *, asynchronous: bool = False,
               startup_delay_steps: int = 0, sharding: str | None = None) -> Engine:
    """The engine a run uses, from where it runs: one process, DDP, FSDP (``sharding="fsdp"``), or Hogwild workers."""
    if asynchronous:
        return Hogwild(cluster.world_size, startup_delay_steps)
    if sharding == "fsdp":
        from torchslim._fsdp import FullySharded

        return FullySharded(cluster, device)
    if cluster.active:
        return DataParallel(cluster, device)
    return Engine()
