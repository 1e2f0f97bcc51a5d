"""Fully sharded data parallelism (FSDP2): each process holds 1/world_size of the parameters and optimizer state.

``train(..., sharding="fsdp")`` runs :class:`FullySharded` instead of DDP:
after the restore, ``torch.distributed.fsdp.fully_shard`` is applied to each
child module that has parameters, then to the root (each of the train op's
modules), so that a child's parameters are gathered only while it runs and its
gradients are reduce-scattered as soon as its backward pass is done. The
user's model object stays the same object and its ``state_dict`` names stay
the same; its parameters become ``DTensor`` shards, and the optimizer is
pointed at them (its state sharded alike).

Checkpoints hold the whole model: every process takes part in gathering the
full tensors (a collective), the chief writes them. So a checkpoint written by
N processes resumes on any number, with or without sharding. The decision to
save is the chief's, sent to all every step (its clock decides time-based saves).

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
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor

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
    """FSDP2 over the train op's modules; checkpoints gathered whole for the chief to write."""

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
        replaced: dict[int, torch.Tensor] = {}
        roots: list[FSDPModule] = []
        for module in train_op.modules.values():
            before = dict(module.named_parameters())
            for child in module.children():
                if any(True for _ in child.parameters()):
                    fully_shard(child, mesh=mesh)
            roots.append(fully_shard(module, mesh=mesh))
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

    def full_state(self, state: Any) -> Any:
        """``state`` with every ``DTensor`` gathered whole (a collective: every process calls it, in one order)."""
        if isinstance(state, DTensor):
            return state.full_tensor()
        if isinstance(state, dict):
            return {k: self.full_state(v) for k, v in state.items()}
        if isinstance(state, (list, tuple)):
            return type(state)(self.full_state(v) for v in state)
        return state


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
