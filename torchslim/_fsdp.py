"""Fully sharded data parallelism (FSDP2): each process holds 1/world_size of the parameters and optimizer state.

``train(..., sharding="fsdp")`` runs :class:`FullySharded` instead of DDP:
after the restore, ``torch.distributed.fsdp.fully_shard`` is applied to each
child module that has parameters (each element of a ``ModuleList`` or
``ModuleDict``, such as a transformer's blocks), then to the root (each of the
train op's modules), so that a child's parameters are gathered only while it runs and its
gradients are reduce-scattered as soon as its backward pass is done. Under
``precision="bf16"``/``"fp16"`` the gathered parameters are in that dtype and
the gradients are reduced in fp32 (``MixedPrecisionPolicy``); fp16's loss
scaler skips an update on every process when any process's gradient shard
holds an Inf (DTensor reduces the check over the mesh). The
user's model object stays the same object and its ``state_dict`` names stay
the same; its parameters become ``DTensor`` shards, and the optimizer is
pointed at them (its state sharded alike).

Checkpoints are sharded: every process writes the rows it holds into a file
of its own, and the chief commits the checkpoint once all are durable
(:mod:`torchslim._shardedio`); nothing is gathered whole on one process. So the
logdir must be one directory every process sees (checked at start). A
checkpoint written by N processes resumes on any number, with or without
sharding (each process reads the whole tensors, then keeps its rows), and
``torchslim export`` joins one into a single file. The decision to save is the
chief's, sent to all every step (its clock decides time-based saves).

After ``train`` returns the model stays sharded (``DTensor`` parameters on a
process group that is gone); use the final checkpoint for its full weights.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

from torchslim._shardedio import Shard as CheckpointShard
from torchslim._shardedio import check_shared_logdir
from torchslim.distributed import Cluster, DataParallel, broadcast_tensors

SHARDINGS = ("fsdp",)


class FSDPGradients:
    """The :class:`~torchslim._types.GradientSync` of FSDP: the reduce-scatter runs inside the backward pass.

    ``no_sync()`` (an inner micro-batch) tells every sharded module not to
    reduce yet; ``synchronize()`` has nothing left to do.
    """

    def __init__(self, roots: list[FSDPModule]) -> None:
        self.roots = roots

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        for root in self.roots:
            root.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            for root in self.roots:
                root.set_requires_gradient_sync(True)

    def synchronize(self) -> None:
        """Nothing: FSDP has reduce-scattered every gradient by the end of the backward pass."""

    def close(self) -> None:
        """Nothing to undo (the modules stay sharded)."""


class FullySharded(DataParallel):
    """FSDP2 over the train op's modules; each process writes its shards of every checkpoint."""

    collective_save = True

    def __init__(self, cluster: Cluster, device: torch.device | None) -> None:
        super().__init__(cluster, device)
        self.save_flag = torch.zeros(1)

    def prepare(self, train_op: Any, restored: bool) -> FSDPGradients:  # type: ignore[override]
        if not restored:  # every process starts from the chief's weights
            broadcast_tensors(list(train_op.model_variables().values()), self.chief_rank)
        already = [name or "the model" for name, m in train_op.modules.items()
                   if any(isinstance(sub, FSDPModule) for sub in m.modules())]
        if already:
            raise ValueError(f"sharding='fsdp': {', '.join(already)} is already sharded (by an earlier "
                             "train(sharding='fsdp') in this process); build the model afresh for each run")
        mesh = init_device_mesh(self.device.type if self.device is not None else "cpu", (self.world_size,))
        # Mixed precision (create_train_op(precision="bf16"/"fp16")): parameters are gathered, and layers run,
        # in that dtype (half the all-gather traffic); gradients are reduced and kept, like the shards and the
        # optimizer's state, in fp32.
        dtype = getattr(train_op.precision, "dtype", None)
        policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32) if dtype is not None \
            else MixedPrecisionPolicy()
        replaced: dict[int, torch.Tensor] = {}
        roots: list[FSDPModule] = []
        for module in train_op.modules.values():
            before = dict(module.named_parameters())
            for unit in _units(module):
                fully_shard(unit, mesh=mesh, mp_policy=policy)
            roots.append(fully_shard(module, mesh=mesh, mp_policy=policy))
            replaced.update((id(before[name]), p) for name, p in module.named_parameters())
        train_op.replace_parameters(replaced)
        _shard_optimizer_state(train_op.optimizer)
        self.sync = FSDPGradients(roots)  # type: ignore[assignment]
        return self.sync  # type: ignore[return-value]

    def agree_to_save(self, due: bool) -> bool:
        """The chief's decision, on every process (a save is a collective: all must take part)."""
        if self.vote is None:
            raise RuntimeError("FullySharded.agree_to_save() before start()")
        self.save_flag.fill_(float(due))
        dist.broadcast(self.save_flag, src=self.chief_rank, group=self.vote.group)
        return bool(self.save_flag.item())

    def checkpoint_state(self, state: Any) -> Any:
        """``state`` with each ``DTensor`` as the :class:`~torchslim.checkpoint.Shard` this process holds.

        FSDP's placement (``Shard(0)`` on a 1-D mesh) splits dimension 0 as
        ``torch.chunk`` does; another placement is gathered whole (a collective:
        every process walks the state in the same order), for the chief to write.
        """
        if isinstance(state, DTensor):
            if len(state.placements) == 1 and state.placements[0] == Shard(0):
                local = state.to_local()
                rows = state.shape[0]
                per = -(-rows // self.world_size)
                offset = min(self.rank * per, rows)
                if local.shape[0] != min(per, rows - offset):
                    raise RuntimeError(f"an FSDP shard of {tuple(state.shape)} on rank {self.rank} has "
                                       f"{local.shape[0]} rows, not the {min(per, rows - offset)} of an even split")
                return CheckpointShard(local, offset, tuple(state.shape))
            return state.full_tensor()
        if isinstance(state, dict):
            return {k: self.checkpoint_state(v) for k, v in state.items()}
        if isinstance(state, (list, tuple)):
            return type(state)(self.checkpoint_state(v) for v in state)
        return state

    def exchange(self, value: Any) -> list[Any]:
        if self.vote is None:
            raise RuntimeError("FullySharded.exchange() before start()")
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, value, group=self.vote.group)
        return out

    def check_logdir(self, logdir: str | None) -> None:
        check_shared_logdir(logdir, self)


def _units(module: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """The modules sharded (and gathered) one at a time: each child that has parameters, looking through containers.

    A container without a ``forward`` of its own (``ModuleList``, ``ModuleDict``:
    a transformer's ``layers``) is never called, so it cannot gather its
    parameters; its elements are the units instead (each block of the list).
    Parameters held by no unit are the root's.
    """
    for child in module.children():
        if not any(True for _ in child.parameters()):
            continue
        if type(child).forward is torch.nn.Module.forward:  # a container: never called itself
            yield from _units(child)
        else:
            yield child


def _shard_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """Shard each state tensor shaped as its (now sharded) parameter the way the parameter is (restored state)."""
    for param, state in optimizer.state.items():
        if not isinstance(param, DTensor):
            continue
        for key, value in state.items():
            if isinstance(value, torch.Tensor) and not isinstance(value, DTensor) and value.shape == param.shape:
                state[key] = distribute_tensor(value.to(param.device), param.device_mesh, param.placements)


def local_numel(tensors: Any) -> int:
    """Elements this process holds of ``tensors`` (a ``DTensor`` counts its local shard)."""
    return sum((t.to_local() if isinstance(t, DTensor) else t).numel() for t in tensors)
