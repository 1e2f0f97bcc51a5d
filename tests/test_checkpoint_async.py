"""Async saves (Saver(async_save=True)), the full disk, and one trainer per logdir."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
import torch
from conftest import Logistic, batches, wait_until

from torchslim import _checkpointdir, _tensorfile, checkpoint, learning
from torchslim._types import NonFiniteError

ROOT = Path(__file__).resolve().parents[1]


def names(logdir):
    return [os.path.basename(p) for p in checkpoint.list_checkpoints(logdir)]


@pytest.fixture
def gated_writes(monkeypatch):
    """Tensor-file writes wait until the test opens the gate."""
    gate, real = threading.Event(), _tensorfile.write

    def write(*args, **kwargs):
        assert gate.wait(30)
        return real(*args, **kwargs)

    monkeypatch.setattr(_tensorfile, "write", write)
    return gate


def test_an_async_save_commits_the_state_as_it_was_when_saved(tmp_path, gated_writes):
    saver = checkpoint.Saver(async_save=True)
    w = torch.zeros(1000)
    path = saver.save({"w": w}, tmp_path, 1)
    assert names(tmp_path) == []  # not committed yet: the step goes on
    w += 5  # the run changes its tensors while the save is in flight
    gated_writes.set()
    saver.wait()
    assert names(tmp_path) == ["model.ckpt-1"] and path == str(tmp_path / "model.ckpt-1")
    assert torch.equal(checkpoint.load(path)["w"], torch.zeros(1000))


def test_staging_buffers_are_allocated_once_and_reused(tmp_path):
    saver = checkpoint.Saver(async_save=True)
    saver.save({"w": torch.ones(100)}, tmp_path, 1)
    first = saver._staging._buffers["w"].data_ptr()
    saver.save({"w": torch.full((100,), 2.0)}, tmp_path, 2)
    saver.wait()
    assert saver._staging._buffers["w"].data_ptr() == first
    assert checkpoint.load(tmp_path / "model.ckpt-2")["w"][0] == 2.0


def test_a_save_due_while_one_is_in_flight_waits_and_the_wait_is_logged_and_counted(tmp_path, gated_writes, caplog):
    saver = checkpoint.Saver(async_save=True)
    saver.save({"w": torch.ones(10)}, tmp_path, 1)
    threading.Timer(0.2, gated_writes.set).start()
    saver.save({"w": torch.ones(10)}, tmp_path, 2)
    assert saver.waits == 1 and saver.waited_secs > 0.1
    assert "Waited" in caplog.text and "model.ckpt-1 to finish before saving" in caplog.text
    saver.wait()
    assert names(tmp_path) == ["model.ckpt-1", "model.ckpt-2"]


def test_a_failed_async_save_is_raised_at_the_next_save_naming_it(tmp_path, monkeypatch):
    saver = checkpoint.Saver(async_save=True)
    saver.save({"w": torch.ones(10)}, tmp_path, 1)
    saver.wait()

    def fail(*args, **kwargs):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(_tensorfile, "write", fail)
    saver.save({"w": torch.ones(10)}, tmp_path, 2)
    with pytest.raises(OSError, match="async save of checkpoint .*model.ckpt-2 failed .*Input/output error"):
        saver.save({"w": torch.ones(10)}, tmp_path, 3)
    assert names(tmp_path) == ["model.ckpt-1"] and not [n for n in os.listdir(tmp_path) if n.startswith(".")]
    saver.check()  # raised once


def test_an_async_save_of_nan_is_never_committed(tmp_path):
    saver = checkpoint.Saver(async_save=True)
    saver.save({"w": torch.tensor([1.0, float("nan")])}, tmp_path, 1)
    with pytest.raises(NonFiniteError, match="model.ckpt-1 failed .* NaN/Inf values in: w"):
        saver.wait()
    assert names(tmp_path) == []


def test_a_full_disk_names_the_checkpoint_and_the_space_needed(tmp_path, monkeypatch):
    checkpoint.save({"w": torch.ones(10)}, tmp_path / "model.ckpt-1")

    def full(fd, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(_tensorfile, "_write_all", full)
    with pytest.raises(OSError, match=r"No space left on device for checkpoint .*model.ckpt-2: it needs 3\.8 MiB") as e:
        checkpoint.save({"w": torch.ones(1000, 1000)}, tmp_path / "model.ckpt-2")
    assert e.value.errno == errno.ENOSPC and "is free on the disk of" in str(e.value)
    assert os.listdir(tmp_path) == ["model.ckpt-1"]


def train(problem, logdir, steps, **kwargs):
    op = learning.create_train_op(problem.loss, problem.optimizer)
    learning.train(op, logdir, data=batches(), number_of_steps=steps, progress_bar=False, **kwargs)
    return op


def test_train_with_async_saves_matches_blocking_saves_and_commits_the_final_one(tmp_path):
    blocking, background = Logistic(), Logistic()
    train(blocking, tmp_path / "a", 12, save_interval_steps=2)
    saver = checkpoint.Saver(async_save=True)
    train(background, tmp_path / "b", 12, save_interval_steps=2, saver=saver)
    assert names(tmp_path / "b") == names(tmp_path / "a")  # every save committed, the final one before train returned
    final = checkpoint.load(tmp_path / "b" / "model.ckpt-12")
    assert torch.equal(final["model"]["weight"], blocking.model.weight)
    assert checkpoint.read_metadata(tmp_path / "b" / "model.ckpt-12")["final"]


def test_an_async_save_error_stops_train_at_the_next_step(tmp_path, monkeypatch, caplog):
    real = _tensorfile.write

    def fail_at_4(path, tensors, **kwargs):
        if "model.ckpt-4" in path:
            raise OSError(errno.EIO, "Input/output error")
        return real(path, tensors, **kwargs)

    monkeypatch.setattr(_tensorfile, "write", fail_at_4)
    with pytest.raises(OSError, match="async save of checkpoint .*model.ckpt-4 failed"):
        train(Logistic(), tmp_path, 50, save_interval_steps=2, saver=checkpoint.Saver(async_save=True))
    assert checkpoint.step_of(checkpoint.latest_checkpoint(tmp_path)) == 2


# ---------------------------------------------------------------- one trainer per logdir


def test_the_logdir_lock_refuses_a_second_holder_naming_the_first(tmp_path):
    first = _checkpointdir.LogdirLock(str(tmp_path))
    first.acquire()
    with pytest.raises(_checkpointdir.LogdirLockedError, match=f"in use by another trainer \\(pid {os.getpid()} on host"):
        _checkpointdir.LogdirLock(str(tmp_path)).acquire()
    first.release()
    again = _checkpointdir.LogdirLock(str(tmp_path))
    again.acquire()
    again.release()


HOLDER = textwrap.dedent('''
    import sys, time
    from torchslim import learning, losses
    import torch
    logdir, started = sys.argv[1], sys.argv[2]
    model = torch.nn.Linear(4, 1)
    def loss(batch):
        open(started, "w").close()
        time.sleep(0.05)
        losses.mean_squared_error(model(batch), torch.zeros(len(batch), 1))
        return losses.get_total_loss()
    op = learning.create_train_op(loss, torch.optim.SGD(model.parameters(), lr=0.1))
    learning.train(op, logdir, data=[torch.ones(2, 4)], number_of_steps=10**6, progress_bar=False)
''')


@pytest.mark.slow
def test_a_second_trainer_on_a_logdir_refuses_and_a_holder_killed_by_kill_9_holds_nothing(tmp_path):
    script, started, logdir = tmp_path / "holder.py", tmp_path / "started", tmp_path / "run"
    script.write_text(HOLDER)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    holder = subprocess.Popen([sys.executable, str(script), str(logdir), str(started)], env=env)
    try:
        wait_until(lambda: started.exists() or holder.poll() is not None, "the first trainer never stepped")
        second = subprocess.run([sys.executable, "-c", textwrap.dedent(f'''
            import torch
            from torchslim import learning, losses
            model = torch.nn.Linear(4, 1)
            def loss(batch):
                losses.mean_squared_error(model(batch), torch.zeros(len(batch), 1))
                return losses.get_total_loss()
            learning.train(learning.create_train_op(loss, torch.optim.SGD(model.parameters(), lr=0.1)), {str(logdir)!r},
                           data=[torch.ones(2, 4)], number_of_steps=5, progress_bar=False)
        ''')], env=env, capture_output=True, text=True, timeout=120)
        assert second.returncode != 0
        assert f"is in use by another trainer (pid {holder.pid} on host" in second.stderr
        assert holder.poll() is None  # the first one trains on
    finally:
        holder.kill()  # SIGKILL: no handler runs, the kernel drops the lock
        holder.wait()
    problem = Logistic()
    op = train(problem, logdir, 3)  # the logdir is free again, and the killed run's files are no obstacle
    assert op.step >= 3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_tensors_stage_into_pinned_buffers_and_load_back_into_live_cuda_tensors(tmp_path):
    state = {"w": torch.randn(1000, 100, device="cuda"), "step": torch.tensor(3.0)}
    expected = {k: v.cpu().clone() for k, v in state.items()}
    saver = checkpoint.Saver(async_save=True)
    saver.save(state, tmp_path, 1)
    state["w"].add_(1)  # changed after the copy: the checkpoint keeps the values saved
    saver.wait()
    assert saver._staging._buffers["w"].is_pinned()
    live = {"w": torch.zeros(1000, 100, device="cuda"), "step": torch.tensor(0.0)}
    loaded = checkpoint.load(tmp_path / "model.ckpt-1", into=live)
    assert loaded["w"] is live["w"] and torch.equal(live["w"].cpu(), expected["w"])
    assert checkpoint.load(tmp_path / "model.ckpt-1", map_location="cuda")["w"].device.type == "cuda"


def test_a_run_ending_on_a_saved_step_marks_that_checkpoint_final_without_rewriting_its_tensors(tmp_path, monkeypatch):
    writes = []
    real = _tensorfile.write
    monkeypatch.setattr(_tensorfile, "write", lambda path, *a, **k: writes.append(path) or real(path, *a, **k))
    train(Logistic(), tmp_path, 4, save_interval_steps=2, saver=checkpoint.Saver(async_save=True))
    assert len(writes) == 2  # steps 2 and 4; the end of the run wrote no tensor file again
    meta = checkpoint.read_metadata(tmp_path / "model.ckpt-4")
    assert meta["final"] and checkpoint.step_of(checkpoint.latest_checkpoint(tmp_path)) == 4
    assert not [n for n in os.listdir(tmp_path / "model.ckpt-4") if n.startswith(".")]
    checkpoint.load(tmp_path / "model.ckpt-4")  # its files still check out against the new state.json
