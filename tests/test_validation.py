"""Validation while training: untouched training, results written, best checkpoints kept, early stop and resume."""

from __future__ import annotations

import json
import logging
import os
import random

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from torchslim import checkpoint, evaluation, learning, losses
from torchslim._evalrun import default_eval_fn, evaluating, run_pass
from torchslim._metrics import check_metrics
from torchslim.validation import EarlyStopping, Validation, Watch


def data_sets(seed: int = 1) -> tuple[TensorDataset, TensorDataset]:
    g = torch.Generator().manual_seed(seed)
    inputs = torch.randn(240, 6, generator=g)
    labels = (inputs[:, 0] + inputs[:, 1] * inputs[:, 2] > 0).long()
    return TensorDataset(inputs[:192], labels[:192]), TensorDataset(inputs[192:], labels[192:])


def accuracy(logits, labels):
    return (logits.argmax(1) == labels).float().mean()


def cross_entropy(logits, labels):
    return torch.nn.functional.cross_entropy(logits, labels)


class Run:
    """A run that uses every RNG a validation could disturb: shuffling, dropout, BatchNorm, noise."""

    def __init__(self, seed: int = 0) -> None:
        torch.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed)
        train, self.held_out = data_sets()
        self.loader = DataLoader(train, batch_size=16, shuffle=True)
        self.model = torch.nn.Sequential(torch.nn.Linear(6, 32), torch.nn.BatchNorm1d(32), torch.nn.ReLU(),
                                         torch.nn.Dropout(0.3), torch.nn.Linear(32, 2))
        optimizer = torch.optim.Adam(self.model.parameters(), lr=1e-2)
        self.train_op = learning.create_train_op(self.loss, optimizer)

    def loss(self, batch):
        x, y = batch
        losses.sparse_softmax_cross_entropy(self.model(x + random.random() * 1e-3), y)
        return losses.get_total_loss()

    def validation(self, **schedule) -> Validation:
        # A shuffled loader: iterating it draws from the global RNG, which must be put back.
        data = DataLoader(self.held_out, batch_size=16, shuffle=True)
        return Validation(data, {"accuracy": accuracy, "loss": cross_entropy}, **schedule)

    def train(self, logdir, **kwargs):
        kwargs.setdefault("save_interval_secs", None)
        kwargs.setdefault("log_every_n_steps", 1000)
        return learning.train(self.train_op, logdir, self.loader, **kwargs)


def eval_records(logdir) -> dict[int, dict[str, float]]:
    out: dict[int, dict[str, float]] = {}
    with open(os.path.join(logdir, "eval", "metrics.jsonl")) as f:
        for line in f:
            r = json.loads(line)
            out.setdefault(r["step"], {})[r["tag"]] = r["value"]
    return out


def test_validating_leaves_training_bitwise_unchanged(tmp_path):
    plain = Run()
    plain.train(tmp_path / "plain", number_of_steps=40, save_interval_steps=10)
    validated = Run()
    validated.train(tmp_path / "validated", number_of_steps=40, save_interval_steps=10,
                    validation=validated.validation(every_n_steps=7, at_checkpoints=True))
    for name, tensor in plain.model.state_dict().items():  # weights and BatchNorm statistics
        assert torch.equal(tensor, validated.model.state_dict()[name]), name
    assert plain.model.training and validated.model.training
    # Evaluated at every 7 steps and at each save (10, 20, 30, 40; 40 is the final one).
    assert sorted(eval_records(tmp_path / "validated")) == [7, 10, 14, 20, 21, 28, 30, 35, 40]
    assert set(eval_records(tmp_path / "validated")[40]) == {"accuracy", "loss"}
    final = checkpoint.latest_checkpoint(tmp_path / "validated")
    assert set(checkpoint.read_metadata(final)["metadata"]["metrics"]) == {"accuracy", "loss"}


def test_a_run_that_asks_for_none_of_it_writes_none_of_it(tmp_path):
    run = Run()
    run.train(tmp_path, number_of_steps=10, save_interval_steps=5)
    path = checkpoint.latest_checkpoint(tmp_path)
    assert "metadata" not in checkpoint.read_metadata(path)
    assert "validation" not in checkpoint.load(path)
    assert not os.path.exists(tmp_path / "eval")


def test_the_evaluation_pass_puts_back_modes_buffers_and_rng():
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.BatchNorm1d(3), torch.nn.Dropout(0.5))
    model.train()
    model[2].eval()  # a mixed mode must come back as it was
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    py_rng = random.getstate()
    with evaluating(model):
        assert not any(m.training for m in model.modules())
        model[1].running_mean.add_(5)  # even a buffer written in eval mode is put back
        torch.rand(3), random.random(), np.random.rand()
        results, n = run_pass(check_metrics({"mean": lambda p, t: p.mean()}),
                              [(torch.randn(4, 3), torch.zeros(4))] * 3, lambda b: (model(b[0]), b[1]))
    assert n == 3 and isinstance(results["mean"], float)
    assert [m.training for m in model.modules()] == [True, True, True, False]
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert torch.equal(torch.get_rng_state(), rng) and random.getstate() == py_rng
    assert all(p.grad is None for p in model.parameters())


def scripted_validation(values, **schedule):
    metric = _Curve(values)
    return Validation([(torch.zeros(2, 6), torch.zeros(2, dtype=torch.long))], {"score": metric}, **schedule), metric


class _Curve:
    def __init__(self, values):
        self.values, self.n = list(values), 0

    def reset(self):
        pass

    def update(self, predictions, targets):
        pass

    def compute(self):
        self.n += 1
        return self.values[self.n - 1]


def test_the_best_checkpoints_are_kept_beside_the_newest(tmp_path):
    run = Run()
    validation, _ = scripted_validation([0.2, 0.9, 0.4, 0.8, 0.3, 0.1], every_n_steps=5)
    run.train(tmp_path, number_of_steps=30, save_interval_steps=5, saver=checkpoint.Saver(max_to_keep=1),
              validation=validation, watch=Watch("score", keep_best=2))
    steps = [checkpoint.step_of(p) for p in checkpoint.list_checkpoints(tmp_path)]
    assert steps == [10, 20, 30]  # the best two (0.9 at 10, 0.8 at 20) and the newest
    assert checkpoint.best_checkpoint(tmp_path) == checkpoint.checkpoint_path(tmp_path, 10)
    assert checkpoint.read_metrics(tmp_path)[20] == {"score": 0.8}
    # The best checkpoint is one evaluate_once (and export) accept as any other.
    assert "accuracy" in evaluation.evaluate_once(checkpoint.best_checkpoint(tmp_path), None, run.model,
                                                  run.validation(every_n_steps=1).data,
                                                  metrics={"accuracy": accuracy}, summary_writer=None)


def test_a_watch_with_keep_best_saves_at_each_evaluation(tmp_path):
    run = Run()
    validation, _ = scripted_validation([0.5, 0.7, 0.6], every_n_steps=4)
    run.train(tmp_path, number_of_steps=12, save_interval_steps=None, saver=checkpoint.Saver(max_to_keep=5),
              validation=validation, watch=Watch("score", keep_best=1))
    assert [checkpoint.step_of(p) for p in checkpoint.list_checkpoints(tmp_path)] == [4, 8, 12]


def test_early_stopping_writes_a_final_checkpoint_with_the_reason(tmp_path, caplog, capsys):
    caplog.set_level(logging.INFO, logger="torchslim")
    run = Run()
    validation, metric = scripted_validation([0.5, 0.30, 0.32, 0.31, 0.2, 0.1], every_n_steps=3)
    loss = run.train(tmp_path, number_of_steps=100, validation=validation, progress_bar=True,
                     watch=Watch("score", mode="min", patience=2, min_delta=0.05))
    assert loss is not None and run.train_op.step == 12  # best 0.30 at 6; 9 and 12 not better by 0.05
    assert metric.n == 4
    path = checkpoint.latest_checkpoint(tmp_path)
    meta = checkpoint.read_metadata(path)
    assert checkpoint.step_of(path) == 12 and meta["final"] is True
    assert "did not improve" in meta["metadata"]["stop_reason"] and "global step 6" in meta["metadata"]["stop_reason"]
    assert evaluation.training_finished(tmp_path)
    assert any("Stopping early at global step 12" in r.getMessage() for r in caplog.records)
    assert "score=0.31" in capsys.readouterr().err  # the progress bar shows the watched metric
    # Run again with the same command: it stopped early, so there is nothing to do.
    caplog.clear()
    again = Run()
    assert again.train(tmp_path, number_of_steps=100, validation=scripted_validation([9.0], every_n_steps=3)[0],
                       watch=Watch("score", mode="min", patience=2, min_delta=0.05)) is None
    assert again.train_op.step == 12 and any("stopped early" in r.getMessage() for r in caplog.records)


def run_with_patience(logdir, crash_at=None):
    run = Run()
    validation = run.validation(every_n_steps=4)
    step_fn = learning.train_step
    if crash_at is not None:
        def step_fn(train_op, batch, kwargs):
            if train_op.step == crash_at:
                raise RuntimeError("killed")
            return learning.train_step(train_op, batch, kwargs)
    kwargs = dict(number_of_steps=400, save_interval_steps=4, validation=validation, train_step_fn=step_fn,
                  watch=Watch("loss", mode="min", patience=3, min_delta=0.02, keep_best=1))
    try:
        run.train(logdir, **kwargs)
    except RuntimeError:
        pass
    return run


def test_a_killed_and_resumed_run_stops_at_the_same_step(tmp_path):
    once = run_with_patience(tmp_path / "once")
    stop = once.train_op.step
    assert stop < 400, "the curve must plateau for this test to mean anything"
    early = EarlyStopping(Watch("loss", mode="min", patience=3, min_delta=0.02))
    counts = {}
    for step, results in sorted(eval_records(tmp_path / "once").items()):
        early.update(step, results["loss"])
        counts[step] = early.waited
    # Crash two steps after an evaluation that left the count at 1 or 2: the checkpoint there must carry it.
    crash = next(s for s, waited in counts.items() if waited > 0 and s < stop) + 2
    crashed = run_with_patience(tmp_path / "twice", crash_at=crash)
    assert crashed.train_op.step == crash
    restored = checkpoint.load(checkpoint.latest_checkpoint(tmp_path / "twice"))["validation"]["early_stopping"]
    assert restored["waited"] == counts[crash - 2] > 0
    twice = run_with_patience(tmp_path / "twice")
    assert twice.train_op.step == stop
    for name, tensor in once.model.state_dict().items():
        assert torch.equal(tensor, twice.model.state_dict()[name]), name


@pytest.mark.parametrize("make, error, match", [
    (lambda v: {"watch": Watch("accuracy", mode="maximum")}, ValueError, "'max'.*'min'.*'maximum'"),
    (lambda v: {"watch": Watch("accuracy", patience=0)}, ValueError, "patience.*>= 1.*0"),
    (lambda v: {"watch": Watch("accuracy", min_delta=-1)}, ValueError, "min_delta"),
    (lambda v: {"validation": Validation(None, None, every_n_steps=10)}, ValueError, "needs an evaluation"),
    (lambda v: {"validation": Validation(v.data, v.metrics)}, ValueError, "needs a schedule"),
    (lambda v: {"validation": Validation(iter(v.data), v.metrics, every_n_steps=3)}, ValueError, "one-shot"),
    (lambda v: {"validation": v, "watch": Watch("acc")}, ValueError, "'acc'.*produces: accuracy, loss"),
    (lambda v: {"validation": v, "watch": Watch("loss", mode="min"),
                "saver": checkpoint.Saver(keep_best=1, metric="accuracy")}, ValueError, "give one of them"),
    (lambda v: {"validation": "every 10 steps"}, TypeError, "validation"),
])
def test_bad_input_is_refused_before_anything_is_written(tmp_path, make, error, match):
    run = Run()
    with pytest.raises(error, match=match):
        run.train(tmp_path / "run", number_of_steps=5, **make(run.validation(every_n_steps=2)))
    assert not os.path.exists(tmp_path / "run")


def test_a_watch_without_validation_needs_a_logdir():
    run = Run()
    with pytest.raises(ValueError, match="logdir=None"):
        run.train(None, number_of_steps=5, watch=Watch("accuracy"))


def test_a_watched_metric_the_evaluation_does_not_produce_fails_at_the_first_evaluation(tmp_path):
    run = Run()
    validation = Validation(run.validation(every_n_steps=1).data, {"m": _Curve([{"a": 1.0, "b": 2.0}])},
                            every_n_steps=3)  # produces m/a and m/b
    with pytest.raises(ValueError, match="'m/c' is not one the validation produces; it produces: m/a, m/b"):
        run.train(tmp_path, number_of_steps=10, validation=validation, watch=Watch("m/c"))
    assert run.train_op.step == 3


# ---------------------------------------------------------------- across two processes (TF-Slim's layout)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The model carries a clock (a buffer counting steps), and the evaluator's score is a
# function of it, so the curve is known: best (0) at step 30, then worse every checkpoint.
MODEL = '''
import torch
def make_model():
    model = torch.nn.Linear(2, 2)
    model.register_buffer("clock", torch.zeros(()))
    return model
class Score:
    def __init__(self, model): self.model = model
    def reset(self): pass
    def update(self, predictions, targets): pass
    def compute(self): return -abs(float(self.model.clock) - 30)
'''

TRAINER = '''
import sys, time, torch
from model import make_model
from torchslim import checkpoint, learning, _records
from torchslim.validation import Watch
logdir = sys.argv[1]
model = make_model()
def total_loss():
    step = op.step
    if step > 30 and step % 10 == 1:  # from 31 on, lockstep: wait until the evaluator recorded the last checkpoint
        deadline = time.monotonic() + 120
        while step - 1 not in _records.read_records(logdir):
            assert time.monotonic() < deadline, f"no record of step {step - 1}"
            time.sleep(0.02)
    time.sleep(0.02)
    with torch.no_grad():
        model.clock += 1
    return (model(torch.ones(1, 2)) ** 2).sum()
op = learning.create_train_op(total_loss, torch.optim.SGD(model.parameters(), lr=0.01), model=model)
learning.train(op, logdir, number_of_steps=400, save_interval_steps=10, save_interval_secs=None,
               saver=checkpoint.Saver(max_to_keep=2), watch=Watch("score", keep_best=1, patience=3),
               progress_bar=False)
print("stopped at", op.step)
'''

EVALUATOR = '''
import sys, torch
from model import make_model, Score
from torchslim import evaluation
logdir = sys.argv[1]
model = make_model()
evaluation.evaluation_loop(logdir, logdir + "/eval", model, [(torch.ones(1, 2), torch.zeros(1))],
                           metrics={"score": Score(model)}, every_checkpoint=True, eval_interval_secs=0,
                           timeout=0.2, timeout_fn=evaluation.stop_when_training_ends(logdir), record=True)
'''


def start(tmp_path, name, source, logdir):
    import subprocess
    import sys

    (tmp_path / "model.py").write_text(MODEL)
    (tmp_path / f"{name}.py").write_text(source)
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{tmp_path}"}
    return subprocess.Popen([sys.executable, str(tmp_path / f"{name}.py"), str(logdir)], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


@pytest.mark.slow
def test_an_evaluator_in_another_process_keeps_the_best_and_stops_the_trainer(tmp_path):
    import signal

    from conftest import wait_until

    from torchslim._records import read_records

    logdir = tmp_path / "run"
    trainer = start(tmp_path, "trainer", TRAINER, logdir)
    evaluator = None
    try:
        # The evaluator starts late: the trainer has written 10, 20, 30 and waits at 31 for a record of 30.
        wait_until(lambda: checkpoint.latest_checkpoint(logdir) == checkpoint.checkpoint_path(logdir, 30),
                   "the trainer's checkpoint at step 30")
        assert trainer.poll() is None
        evaluator = start(tmp_path, "evaluator", EVALUATOR, logdir)
        wait_until(lambda: 40 in read_records(logdir), "a record of step 40", timeout=120)
        evaluator.send_signal(signal.SIGKILL)  # killed mid-run, then restarted
        evaluator.wait()
        first = sorted(read_records(logdir))
        assert first[:3] == [20, 30, 40]  # 10 was gone (max_to_keep=2, nothing recorded yet): skipped
        evaluator = start(tmp_path, "evaluator", EVALUATOR, logdir)
        out, err = trainer.communicate(timeout=180)
        assert trainer.returncode == 0, err
        _, evaluator_err = evaluator.communicate(timeout=120)
        assert evaluator.returncode == 0, evaluator_err
    finally:
        for proc in (trainer, evaluator):
            if proc is not None and proc.poll() is None:
                proc.kill()
    stop = int(out.split("stopped at")[1])
    assert 61 <= stop < 100  # patience 3: 40, 50 and 60 did not beat 30; the trainer stopped on that record
    # The restarted evaluator went on at the first checkpoint it had not recorded.
    assert "model.ckpt-40 (global step" not in evaluator_err and f"model.ckpt-{first[-1] + 10} (global step" in \
        evaluator_err
    records = read_records(logdir)
    assert {20, 30, 40, 50, 60, stop} <= set(records) and records[30] == {"score": 0.0}
    final = checkpoint.latest_checkpoint(logdir)
    meta = checkpoint.read_metadata(final)
    assert checkpoint.step_of(final) == stop and meta["final"]
    assert "score did not improve" in meta["metadata"]["stop_reason"] and "global step 30" in \
        meta["metadata"]["stop_reason"]
    # Retention kept the best (30) besides the newest two, though its metric is only in the evaluator's records.
    assert [checkpoint.step_of(p) for p in checkpoint.list_checkpoints(logdir)][0] == 30
    assert checkpoint.best_checkpoint(logdir) == checkpoint.checkpoint_path(logdir, 30)


def test_cli_eval_records_for_the_trainer_and_evaluates_the_best(tmp_path, capsys):
    from torchslim import cli
    from torchslim._records import read_records

    factories = tmp_path / "factories.py"
    factories.write_text("import torch\n"
                         "def model():\n    return torch.nn.Linear(2, 2)\n"
                         "def data():\n    return [(torch.eye(2), torch.tensor([0, 1]))]\n")
    saver = checkpoint.Saver(max_to_keep=None)
    for step, scale in ((1, 1.0), (2, -1.0)):  # step 1 is the identity (accuracy 1), step 2 its opposite (0)
        saver.save({"model": {"weight": torch.eye(2) * scale, "bias": torch.zeros(2)}}, tmp_path, step,
                   final=step == 2)
    given = ["--model", f"{factories}:model", "--data", f"{factories}:data"]
    assert cli.main(["eval", str(tmp_path), "--record", *given]) == 2
    assert "--record goes with --watch" in capsys.readouterr().err
    assert cli.main(["eval", str(tmp_path), "--watch", "--every-checkpoint", "--record", "--timeout", "0.1",
                     *given]) == 0
    assert read_records(tmp_path) == {1: {"accuracy": 1.0}, 2: {"accuracy": 0.0}}
    capsys.readouterr()
    assert checkpoint.best_checkpoint(tmp_path, "accuracy", "max") == checkpoint.checkpoint_path(tmp_path, 1)
    assert cli.main(["eval", str(tmp_path), "--best", *given]) == 2  # no run watched a metric here: say so
    assert "records a watched metric" in capsys.readouterr().err
    saver.keeping_best(1, "accuracy").save({"model": {"weight": -torch.eye(2), "bias": torch.zeros(2)}},
                                           tmp_path, 3)
    assert cli.main(["eval", str(tmp_path), "--best", *given]) == 0
    assert capsys.readouterr().out.startswith("global step 1: accuracy 1.0")
    assert cli.main(["export", str(tmp_path), str(tmp_path / "best.safetensors"), "--best"]) == 0
    import safetensors.torch

    assert torch.equal(safetensors.torch.load_file(tmp_path / "best.safetensors")["weight"], torch.eye(2))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="blocked: no CUDA device here")
def test_the_evaluation_pass_puts_back_the_cuda_rng_and_runs_on_the_device():
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Dropout(0.5)).cuda()
    torch.cuda.manual_seed(0)
    rng = torch.cuda.get_rng_state()
    with evaluating(model):
        torch.rand(3, device="cuda")
        results, _ = run_pass(check_metrics({"mean": lambda p, t: p.mean()}), [(torch.randn(4, 3), torch.zeros(4))],
                              default_eval_fn(model))
    assert torch.equal(torch.cuda.get_rng_state(), rng) and isinstance(results["mean"], float)


@pytest.mark.slow
def test_every_n_secs_evaluates_by_the_clock(tmp_path):
    import time

    def run_for(logdir, secs):
        run = Run()
        original = run.loss

        def slow_loss(batch):
            time.sleep(0.01)
            return original(batch)

        run.train_op = learning.create_train_op(slow_loss, run.train_op.optimizer, model=run.model)
        run.train(logdir, number_of_steps=20, validation=run.validation(every_n_secs=secs))

    run_for(tmp_path / "never", 1000.0)
    assert not os.path.exists(tmp_path / "never" / "eval")  # not due in the run's few seconds: no evaluation
    run_for(tmp_path / "often", 0.025)
    assert len(eval_records(tmp_path / "often")) >= 2  # at least 10 ms a step: due again within a few steps


# A run killed by SIGKILL (no final save, as after a power cut) and started again with the same command.
KILLED = '''
import os, signal, sys
sys.path.insert(0, os.path.dirname(__file__))
from test_validation import Run
from torchslim import learning
from torchslim.validation import Watch
logdir, die_at = sys.argv[1], int(sys.argv[2])
run = Run()
def step_fn(train_op, batch, kwargs):
    if train_op.step == die_at:
        os.kill(os.getpid(), signal.SIGKILL)
    return learning.train_step(train_op, batch, kwargs)
run.train(logdir, number_of_steps=400, save_interval_steps=4, validation=run.validation(every_n_steps=4),
          train_step_fn=step_fn, progress_bar=False,
          watch=Watch("loss", mode="min", patience=3, min_delta=0.02, keep_best=1))
print("stopped at", run.train_op.step)
'''


@pytest.mark.slow
def test_a_run_killed_by_sigkill_and_restarted_stops_at_the_same_step(tmp_path):
    import shutil
    import subprocess
    import sys

    once = run_with_patience(tmp_path / "once")
    stop = once.train_op.step
    assert stop < 400
    shutil.copy(os.path.join(ROOT, "tests", "test_validation.py"), tmp_path / "test_validation.py")
    (tmp_path / "killed.py").write_text(KILLED)
    env = {**os.environ, "PYTHONPATH": ROOT}
    args = [sys.executable, str(tmp_path / "killed.py"), str(tmp_path / "twice")]
    killed = subprocess.run([*args, str(stop - 3)], env=env, capture_output=True, text=True, timeout=300)
    assert killed.returncode == -9, killed.stderr
    resumed = subprocess.run([*args, "-1"], env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert f"stopped at {stop}" in resumed.stdout
    final = checkpoint.load(checkpoint.latest_checkpoint(tmp_path / "twice"))
    for name, tensor in once.model.state_dict().items():
        assert torch.equal(tensor, final["model"][name]), name
