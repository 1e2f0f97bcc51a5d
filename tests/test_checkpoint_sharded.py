"""Sharded checkpoints: each process writes its rows, the chief commits; loads join the pieces; failures commit nothing.

The processes here are threads exchanging through a barrier (the protocol is
the same as over torch.distributed); tests/test_distributed.py runs it with
FSDP in real processes, including a kill -9 in the middle of a save.
"""

from __future__ import annotations

import errno
import json
import os
import threading
from collections.abc import Callable
from typing import Any

import pytest
import torch

from torchslim import _tensorfile, checkpoint
from torchslim._types import NonFiniteError
from torchslim.checkpoint import CorruptCheckpointError, Shard

WHOLE = {"w": torch.arange(15.0).reshape(5, 3), "b": torch.tensor([7.0]), "e": torch.arange(4, dtype=torch.int64)}


class ThreadPeers:
    """``world_size`` threads that exchange values as torch.distributed's all_gather_object would."""

    def __init__(self, rank: int, board: dict[str, Any]) -> None:
        self.rank, self.world_size, self.is_chief, self.board = rank, board["world"], rank == 0, board

    def exchange(self, value: Any) -> list[Any]:
        self.board["values"][self.rank] = value
        self.board["barrier"].wait(timeout=30)
        out = list(self.board["values"])
        self.board["barrier"].wait(timeout=30)
        return out


def split(t: torch.Tensor, rank: int, world: int) -> Shard:
    per = -(-t.shape[0] // world)
    first = min(rank * per, t.shape[0])
    return Shard(t[first:first + per].clone(), first, tuple(t.shape))


def state_of(rank: int, world: int, whole: dict[str, torch.Tensor] = WHOLE) -> dict[str, Any]:
    return {"model": {k: split(v, rank, world) for k, v in whole.items()}, "step": torch.tensor(3), "note": "x"}


def on_every_rank(world: int, fn: Callable[[int, ThreadPeers], Any]) -> list[Any]:
    """``fn(rank, peers)`` in ``world`` threads; each one's result or the exception it raised."""
    board = {"world": world, "values": [None] * world, "barrier": threading.Barrier(world)}
    results: list[Any] = [None] * world

    def run(rank: int) -> None:
        try:
            results[rank] = fn(rank, ThreadPeers(rank, board))
        except BaseException as e:  # noqa: BLE001 - returned to the test
            results[rank] = e

    threads = [threading.Thread(target=run, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return results


def save_sharded(logdir, step: int, world: int = 2, states: Callable[[int], dict] | None = None) -> list[Any]:
    saver = checkpoint.Saver()
    return on_every_rank(world, lambda rank, peers: saver.save_sharded(
        (states or (lambda r: state_of(r, world)))(rank), logdir, step, peers))


def hidden(logdir) -> list[str]:
    return [n for n in os.listdir(logdir) if n.startswith(".model.ckpt")]


@pytest.mark.parametrize("world", [2, 3])
def test_each_process_writes_its_rows_and_the_checkpoint_loads_whole(tmp_path, world):
    results = save_sharded(tmp_path, 10, world)
    path = str(tmp_path / "model.ckpt-10")
    assert results == [path] * world
    assert sorted(os.listdir(path)) == sorted(["state.json"] + [f"tensors-rank{r}-of-{world}.safetensors"
                                                                  for r in range(world)])
    assert checkpoint.latest_checkpoint(tmp_path) == path and hidden(tmp_path) == []
    meta = checkpoint.read_metadata(path)
    assert meta["format"] == "torchslim.checkpoint/3" and meta["world_size"] == world
    state = checkpoint.load(path)
    assert state["note"] == "x" and int(state["step"]) == 3
    for k, v in WHOLE.items():
        assert torch.equal(state["model"][k], v), k
    # Into live tensors of the whole shape (a resume on one process): copied in place, row after row.
    live = {"model": {k: torch.zeros_like(v) for k, v in WHOLE.items()}, "step": torch.tensor(0)}
    loaded = checkpoint.load(path, into=live)
    assert loaded["model"]["w"] is live["model"]["w"] and torch.equal(live["model"]["w"], WHOLE["w"])
    listing = checkpoint.describe(path)
    assert "format: torchslim.checkpoint/3 (version 3, sharded over 2 processes)".replace("2", str(world)) in listing
    assert "model/w  F32   [5, 3]" in listing and "@rank" not in listing


def test_a_checkpoint_missing_one_rank_s_file_is_refused_naming_it_and_the_one_before_is_used(tmp_path):
    save_sharded(tmp_path, 10)
    save_sharded(tmp_path, 20)
    os.remove(tmp_path / "model.ckpt-20" / "tensors-rank1-of-2.safetensors")
    with pytest.raises(CorruptCheckpointError, match=r"model.ckpt-20 is corrupt: tensors-rank1-of-2.safetensors is "
                                                     "missing"):
        checkpoint.load(tmp_path / "model.ckpt-20")
    found = checkpoint.restore(tmp_path)
    assert found is not None and found[0].endswith("model.ckpt-10")


@pytest.mark.parametrize("edit, reason", [
    (lambda s: s["model/w"]["pieces"].pop(), "has 5 rows, but its pieces hold 3"),
    (lambda s: s["model/w"]["pieces"][1].__setitem__(1, 2), "starts at row 2, but the rows before it end at 3"),
    (lambda s: s["model/w"].__setitem__("shape", [5, 4]), "of shape \\[5, 4\\] has a piece"),
    (lambda s: s["model/w"]["pieces"][0].__setitem__(0, "model/w@rank7"), "a piece 'model/w@rank7' that no file"),
    (lambda s: s["model/w"].__setitem__("shape", [2**40, 3]), "has 1099511627776 rows, but its pieces hold 5"),
    (lambda s: s.__setitem__("model/w", {"shape": [5, 3], "pieces": "all"}), "not \\[\\[piece key, first row\\]"),
])
def test_a_state_json_whose_pieces_do_not_make_up_the_tensor_is_refused(tmp_path, edit, reason):
    save_sharded(tmp_path, 10)
    meta_file = tmp_path / "model.ckpt-10" / "state.json"
    meta = json.loads(meta_file.read_text())
    edit(meta["sharded"])
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(CorruptCheckpointError, match=f"model.ckpt-10 is corrupt: state.json: sharded tensor 'model/w'.*{reason}"):
        checkpoint.load(tmp_path / "model.ckpt-10")


def test_a_nan_on_one_process_refuses_the_save_on_every_process_and_writes_nothing(tmp_path):
    save_sharded(tmp_path, 10)

    def states(rank: int) -> dict:
        state = state_of(rank, 2)
        if rank == 1:
            state["model"]["w"].local[0, 0] = float("nan")
        return state

    results = save_sharded(tmp_path, 20, states=states)
    assert all(isinstance(r, NonFiniteError) and "model/w@rank1 (rank 1)" in str(r) for r in results), results
    assert checkpoint.list_checkpoints(tmp_path) == [str(tmp_path / "model.ckpt-10")] and hidden(tmp_path) == []


def test_a_write_failing_on_one_process_fails_the_save_on_every_process_naming_it(tmp_path, monkeypatch):
    save_sharded(tmp_path, 10)
    real = _tensorfile.write

    def full_disk_for_rank_1(path: str, tensors: Any, **kw: Any) -> Any:
        if path.endswith("tensors-rank1-of-2.safetensors"):
            with open(path, "wb") as f:
                f.write(b"half")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, tensors, **kw)

    monkeypatch.setattr(_tensorfile, "write", full_disk_for_rank_1)
    results = save_sharded(tmp_path, 20)
    for r in results:
        assert isinstance(r, OSError) and r.errno == errno.ENOSPC, results
        assert "model.ckpt-20" in str(r) and "rank 1 on" in str(r) and "is free" in str(r)
    assert checkpoint.list_checkpoints(tmp_path) == [str(tmp_path / "model.ckpt-10")] and hidden(tmp_path) == []
    assert torch.equal(checkpoint.load(tmp_path / "model.ckpt-10")["model"]["w"], WHOLE["w"])


def test_a_process_that_does_not_see_the_chief_s_logdir_is_named(tmp_path):
    from torchslim._shardedio import check_shared_logdir

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    results = on_every_rank(2, lambda rank, peers: check_shared_logdir(str(tmp_path / "ab"[rank]), peers))
    for r in results:
        assert isinstance(r, ValueError), results
        assert "rank 1 on host" in str(r) and f"logdir {tmp_path / 'b'}" in str(r) and str(tmp_path / "a") in str(r)
    assert os.listdir(tmp_path / "a") == []  # the probe file is gone
    assert on_every_rank(2, lambda rank, peers: check_shared_logdir(str(tmp_path / "a"), peers)) == [None, None]


def test_warm_starts_and_evaluation_read_a_sharded_checkpoint_as_any_other(tmp_path):
    from torchslim import evaluation, variables

    layer = torch.nn.Linear(3, 5)
    torch.nn.init.normal_(layer.weight)
    whole = {k: v.detach().clone() for k, v in layer.state_dict().items()}  # weight [5, 3], bias [5]
    results = save_sharded(tmp_path / "train", 10, states=lambda r: {"model": {k: split(v, r, 2) for k, v in whole.items()}})
    assert not any(isinstance(r, BaseException) for r in results), results
    fresh = torch.nn.Linear(3, 5)
    variables.assign_from_checkpoint_fn(tmp_path / "train", fresh)()
    assert all(torch.equal(fresh.state_dict()[k], whole[k]) for k in whole)

    x = torch.randn(8, 3)
    data = [(x, layer(x).argmax(1))]
    metrics = evaluation.evaluate_once(tmp_path / "train" / "model.ckpt-10", tmp_path / "eval", torch.nn.Linear(3, 5),
                                       data, metrics={"accuracy": lambda out, y: (out.argmax(1) == y).float().mean()})
    assert metrics["accuracy"] == 1.0


def test_a_chief_that_cannot_create_the_checkpoint_directory_fails_the_save_everywhere(tmp_path, monkeypatch):
    from torchslim import _checkpointdir

    def no_directory(path: str) -> str:
        raise PermissionError(errno.EACCES, "Permission denied", os.path.dirname(path))

    monkeypatch.setattr(_checkpointdir, "temporary", no_directory)
    results = save_sharded(tmp_path, 10)
    for r in results:
        assert isinstance(r, PermissionError) and "the chief cannot create the checkpoint's directory" in str(r), results
    assert checkpoint.list_checkpoints(tmp_path) == []
