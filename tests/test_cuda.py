"""On a CUDA GPU: prefetch to the device, no per-step host sync, fp16 with the scaler, bf16, compile, NCCL.

Every test here is marked ``cuda`` and skipped on a machine without a GPU;
``bench/gpu_check.sh`` runs them, then ``bench/step_speed.py --device cuda``.
"""

from __future__ import annotations

import contextlib
import math
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from torchslim import checkpoint
from torchslim.learning import NonFiniteError, create_train_op, train

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
ROOT = Path(__file__).resolve().parents[1]


def setup(precision: str = "fp32", compile: bool = False, n: int = 64 * 40):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 256), torch.nn.ReLU(), torch.nn.Linear(256, 4)).cuda()
    g = torch.Generator().manual_seed(1)
    inputs = torch.randn(n, 16, generator=g)
    data = DataLoader(TensorDataset(inputs, (inputs[:, :4] * 3).argmax(1)), batch_size=64, shuffle=True, drop_last=True)
    seen = []

    def loss_fn(batch):
        x, y = batch
        seen.append(x.device)
        return F.cross_entropy(model(x), y)

    op = create_train_op(loss_fn, torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9), precision=precision,
                         compile=compile)
    return model, op, data, seen


def test_batches_are_prefetched_to_the_device(tmp_path):
    _, op, data, seen = setup()
    train(op, tmp_path, data, number_of_steps=20, progress_bar=False)
    assert op.step == 20 and all(d.type == "cuda" for d in seen)


@contextlib.contextmanager
def counting_host_reads():
    """Counts Tensor.item, __bool__, .cpu() and .tolist() on CUDA tensors: the host syncs a step could hide."""
    counts = {"n": 0}
    originals = {name: getattr(torch.Tensor, name) for name in ("item", "__bool__", "cpu", "tolist")}

    def wrap(name):
        original = originals[name]

        def counted(self, *args, **kwargs):
            if self.is_cuda:
                counts["n"] += 1
            return original(self, *args, **kwargs)
        return counted

    for name in originals:
        setattr(torch.Tensor, name, wrap(name))
    try:
        yield counts
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)


def test_no_host_sync_on_steps_without_logging_or_saving():
    _, op, data, _ = setup()
    train(op, None, data, number_of_steps=5, progress_bar=False)  # warm: first-step checks done
    with counting_host_reads() as reads:
        train(op, None, data, number_of_steps=35, log_every_n_steps=1000, save_summaries_secs=None,
              progress_bar=False)
    assert op.step == 35
    assert reads["n"] <= 3, reads  # the final numerics flush and loss, not one per step


def test_the_deferred_nan_check_reports_at_the_flush(tmp_path):
    model, op, data, _ = setup()
    op.total_loss = lambda b: F.cross_entropy(model(b[0]), b[1]) * (math.nan if op.step == 7 else 1.0)
    with pytest.raises(NonFiniteError, match=r"NaN or Inf at some global step in \[\d+, \d+\]"):
        train(op, tmp_path, data, number_of_steps=20, save_interval_steps=10, log_every_n_steps=1000,
              progress_bar=False)


def test_fp16_with_the_loss_scaler_trains_and_checkpoints_the_scaler(tmp_path):
    _, op, data, _ = setup("fp16")
    train(op, tmp_path, data, number_of_steps=30, progress_bar=False)
    state = checkpoint.load(checkpoint.latest_checkpoint(tmp_path))
    assert op.step == 30 and state["precision"]["scaler"]["scale"] > 0
    assert float(op.run(next(iter(data))).loss) < 1.0


def test_bf16_trains():
    _, op, data, _ = setup("bf16")
    train(op, None, data, number_of_steps=30, progress_bar=False)
    assert float(op.run(next(iter(data))).loss) < 1.0


def test_compiled_steps_train(tmp_path):
    _, op, data, _ = setup("bf16", compile=True)
    train(op, tmp_path, data, number_of_steps=30, progress_bar=False)
    assert op.step == 30 and float(op.run(next(iter(data))).loss) < 1.0


NCCL_TRAINER = textwrap.dedent('''
    import sys, torch, torch.nn.functional as F
    from torch.utils.data import DataLoader, TensorDataset
    from torchslim.learning import create_train_op, train
    rank, port, logdir = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    torch.cuda.set_device(rank)
    torch.manual_seed(0)
    model = torch.nn.Linear(16, 4).cuda()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64 * 16, 16, generator=g)
    data = DataLoader(TensorDataset(x, x[:, :4].argmax(1)), batch_size=32)
    op = create_train_op(lambda b: F.cross_entropy(model(b[0]), b[1]), torch.optim.SGD(model.parameters(), lr=0.1),
                         accumulate_steps=2)
    train(op, logdir, data, number_of_steps=8, master=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
          progress_bar=False)
    print("weight", model.weight.detach().cpu().sum().item())
''')


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
def test_two_processes_over_nccl_end_equal(tmp_path):
    script = tmp_path / "nccl_trainer.py"
    script.write_text(NCCL_TRAINER)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, str(script), str(r), str(port), str(tmp_path / "run")], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    weights = {o[0].strip().splitlines()[-1] for o in outs}
    assert len(weights) == 1, weights  # gradients averaged: the replicas stay equal
