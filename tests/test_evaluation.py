"""Evaluation: one checkpoint, the loop over new ones, waiting and timeouts, beside a live trainer, CLI and demo."""

from __future__ import annotations

import glob
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torchmetrics
from conftest import batches
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.backend.event_processing.event_multiplexer import EventMultiplexer
from torch import nn

from torchslim import checkpoint, cli, demo, evaluation, learning

ROOT = Path(__file__).resolve().parents[1]


def binary_accuracy(predictions, labels):
    return ((predictions.reshape(-1) > 0).float() == labels).float().mean()


def hand_accuracy(model, data):
    """Accuracy computed directly, with no torchslim involved."""
    with torch.no_grad():
        inputs = torch.cat([x for x, _ in data])
        labels = torch.cat([y for _, y in data])
        return ((model(inputs).squeeze(1) > 0).float() == labels).sum().item() / len(labels)  # exact


def save(logdir, model, step, final=False):
    return checkpoint.Saver(max_to_keep=None).save({"model": model.state_dict()}, logdir, step, final=final)


class Recorder:
    """A summary writer that remembers what it was given."""

    def __init__(self):
        self.scalars, self.flushes = [], 0

    def add_scalar(self, tag, value, step):
        self.scalars.append((step, tag, value))

    def flush(self):
        self.flushes += 1


# ---------------------------------------------------------------- evaluate_once


def test_restored_model_performance_matches_the_trained_model(tmp_path, problem):
    data = batches(4, 16, seed=0)
    learning.train(learning.create_train_op(problem.loss, problem.optimizer), tmp_path, data, number_of_steps=40)
    fresh = nn.Linear(4, 1)  # random weights: only the checkpoint can make it accurate
    held_out = batches(4, 16, seed=1)
    assert hand_accuracy(fresh, held_out) < 0.9
    metric = torchmetrics.classification.BinaryAccuracy()
    results = evaluation.evaluate_once(
        checkpoint.latest_checkpoint(tmp_path), None, fresh, held_out,
        metrics={"accuracy": binary_accuracy, "tm_accuracy": metric},
        eval_fn=lambda batch: (fresh(batch[0]).squeeze(1), batch[1]))
    expected = hand_accuracy(problem.model, held_out)
    assert expected > 0.9
    assert results["accuracy"] == pytest.approx(expected, abs=1e-12)
    assert results["tm_accuracy"] == pytest.approx(expected, abs=1e-6)
    metric.update(torch.ones(2), torch.ones(2))  # reset afterwards, outside inference mode: still usable


def test_metric_values_match_a_computation_by_hand_over_unequal_batches(tmp_path):
    model = nn.Linear(3, 3)
    path = save(tmp_path, model, 5)
    g = torch.Generator().manual_seed(3)
    data = [(torch.randn(n, 3, generator=g), torch.randint(0, 3, (n,), generator=g)) for n in (5, 3, 7)]
    inputs, labels = torch.cat([x for x, _ in data]), torch.cat([y for _, y in data])
    with torch.no_grad():
        logits = model(inputs)
    results = evaluation.evaluate_once(path, None, nn.Linear(3, 3), data, metrics={
        "accuracy": lambda p, t: (p.argmax(1) == t).float().mean(),
        "max_logit": lambda p, t: p.max(1).values.mean().item(),  # a Python number works as well
        "micro": torchmetrics.classification.MulticlassAccuracy(num_classes=3, average="micro"),
        "per_class": torchmetrics.classification.MulticlassAccuracy(num_classes=3, average=None),
    }, final_op=lambda: {"extra": torch.tensor(2.0)})
    correct = logits.argmax(1) == labels
    # weighted by batch size (not a mean of the batches' means); float32 per-batch values, hence 1e-6
    assert results["accuracy"] == pytest.approx(correct.sum().item() / 15, abs=1e-6)
    batch_means = [(model(x).argmax(1) == y).float().mean().item() for x, y in data]
    assert abs(sum(batch_means) / 3 - correct.sum().item() / 15) > 1e-3
    assert results["micro"] == pytest.approx(correct.float().mean().item(), abs=1e-6)
    assert results["max_logit"] == pytest.approx(logits.max(1).values.double().mean().item(), abs=1e-6)
    for c in range(3):
        assert results[f"per_class/{c}"] == pytest.approx(correct[labels == c].float().mean().item(), abs=1e-6)
    assert results["extra"] == 2.0
    assert all(type(v) is float for v in results.values())


def test_eval_op_runs_exactly_num_evals_times_then_the_final_op_once(tmp_path):
    path = save(tmp_path, nn.Linear(4, 1), 1)
    calls = []
    results = evaluation.evaluate_once(
        path, None, nn.Linear(4, 1), batches(10, 4), num_evals=3,
        initial_op=lambda: calls.append("initial"), eval_op=lambda batch: calls.append(("eval", len(batch[0]))),
        final_op=lambda: calls.append("final") or 7)
    assert calls == ["initial"] + [("eval", 4)] * 3 + ["final"]
    assert results == {"final_op": 7.0}


def test_only_a_final_op(tmp_path):
    model = nn.Linear(4, 1)
    path = save(tmp_path, model, 1)
    assert evaluation.evaluate_once(path, None, nn.Linear(4, 1), final_op=lambda: {"value": 3}) == {"value": 3.0}
    # without data, num_evals batches of None go to the eval op (which reads its own input)
    seen = []
    evaluation.evaluate_once(path, None, nn.Linear(4, 1), num_evals=2, eval_op=seen.append)
    assert seen == [None, None]


def test_epoch_limited_data_ends_the_evaluation_cleanly(tmp_path, info_logs):
    model = nn.Linear(4, 1)
    path = save(tmp_path, model, 1)
    data = batches(5, 8, seed=2)
    count = []
    results = evaluation.evaluate_once(path, None, nn.Linear(4, 1), (b for b in data), num_evals=100,
                                       metrics={"accuracy": binary_accuracy}, eval_op=count.append)
    assert len(count) == 5
    assert results["accuracy"] == pytest.approx(hand_accuracy(model, data), abs=1e-12)
    assert "ran out after 5 of num_evals=100" in info_logs.text
    everything = evaluation.evaluate_once(path, None, nn.Linear(4, 1), data, metrics={"accuracy": binary_accuracy})
    assert everything == results


def test_the_model_is_left_as_it_was_found(tmp_path):
    torch.manual_seed(0)
    trained = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Dropout(0.5), nn.Linear(4, 1))
    trained(torch.randn(32, 4))  # BatchNorm statistics of its own
    path = save(tmp_path, trained, 3)
    trained.eval()
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Dropout(0.5), nn.Linear(4, 1))
    model[2].eval()  # mixed modes must come back as they were
    modes = [m.training for m in model.modules()]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    seen = {}

    def eval_op(batch):
        seen["inference"] = torch.is_inference_mode_enabled()
        seen["modes"] = [m.training for m in model.modules()]
        seen["weights"] = {k: v.clone() for k, v in model.state_dict().items()}

    data = batches(2, 8)
    results = evaluation.evaluate_once(path, None, model, data, metrics={"accuracy": binary_accuracy}, eval_op=eval_op)
    assert seen["inference"] and not any(seen["modes"])
    assert all(torch.equal(seen["weights"][k], v) for k, v in trained.state_dict().items())
    assert results["accuracy"] == pytest.approx(hand_accuracy(trained, data), abs=1e-12)  # eval-mode BatchNorm
    assert [m.training for m in model.modules()] == modes
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert torch.is_grad_enabled() and not torch.is_inference_mode_enabled()
    assert model[0].weight.requires_grad and model[0].weight.grad is None


def test_variables_to_restore_picks_and_renames(tmp_path):
    source = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 1))
    path = save(tmp_path, source, 2)
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 1))
    original_head = model[1].weight.clone()
    seen = {}

    def look(batch):
        seen["body"], seen["head"] = model[0].weight.clone(), model[1].weight.clone()

    evaluation.evaluate_once(path, None, model, num_evals=1, eval_op=look, variables_to_restore=["0.weight", "0.bias"])
    assert torch.equal(seen["body"], source[0].weight) and torch.equal(seen["head"], original_head)
    other = nn.Linear(4, 1)  # checkpoint name -> tensor, as when names differ
    evaluation.evaluate_once(path, None, other, num_evals=1, eval_op=lambda b: seen.update(w=other.weight.clone()),
                             variables_to_restore={"1.weight": other.weight, "1.bias": other.bias})
    assert torch.equal(seen["w"], source[1].weight)


def test_a_checkpoint_that_does_not_exist_or_fit_raises_value_error(tmp_path):
    missing = tmp_path / "model.ckpt-5"
    with pytest.raises(ValueError, match=f"`checkpoint_path` '{missing}' does not exist"):
        evaluation.evaluate_once(missing, tmp_path, nn.Linear(4, 1), batches())
    path = save(tmp_path, nn.Linear(4, 2), 1)
    with pytest.raises(ValueError, match=r"does not fit the model: .*weight \(model \(1, 4\), checkpoint \(2, 4\)\)"):
        evaluation.evaluate_once(path, None, nn.Linear(4, 1), batches(), metrics={"a": binary_accuracy})
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="is neither a torchslim checkpoint nor a logdir holding one"):
        evaluation.evaluate_once(tmp_path / "empty", None, nn.Linear(4, 1))


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(model="net"), TypeError, "`model` must be a torch.nn.Module, got str"),
    (dict(data=3), TypeError, "`data` must be an iterable of batches"),
    (dict(metrics=[binary_accuracy]), TypeError, "`metrics` must be a dict of name -> metric"),
    (dict(metrics={"a": 3}), TypeError, r"`metrics\['a'\]` must have update/compute/reset .* got int"),
    (dict(metrics={"a": binary_accuracy}, data=None), ValueError, "`metrics` need `data`"),
    (dict(num_evals=0), ValueError, "`num_evals` must be positive, got 0"),
    (dict(num_evals=1.5), TypeError, "`num_evals` must be a positive int or None, got 1.5"),
    (dict(eval_op="op"), TypeError, "`eval_op` must be callable, got str"),
    (dict(final_op=1), TypeError, "`final_op` must be callable"),
    (dict(hooks=[object()]), TypeError, r"`hooks\[0\]` \(object\) has none of the hook methods"),
    (dict(summary_writer=3), TypeError, "`summary_writer` must have add_scalar"),
    (dict(variables_to_restore=["nope"]), ValueError, r"names \['nope'\] that are not variables of the model"),
    (dict(variables_to_restore=3), TypeError, "`variables_to_restore` must be None"),
])
def test_evaluate_once_rejects_bad_arguments_before_writing_anything(tmp_path, kwargs, error, match):
    path = save(tmp_path / "run", nn.Linear(4, 1), 1)
    args = dict(model=nn.Linear(4, 1), data=batches(2)) | kwargs
    with pytest.raises(error, match=match):
        evaluation.evaluate_once(path, tmp_path / "eval", args.pop("model"), args.pop("data"), **args)
    assert not (tmp_path / "eval").exists()


def test_hooks_begin_stop_and_end(tmp_path):
    path = save(tmp_path, nn.Linear(4, 1), 1)
    events = []

    class Hook:
        def begin(self):
            events.append("begin")

        def after_batch(self, n):
            events.append(n)
            return False

        def end(self, results):
            events.append(results)

    results = evaluation.evaluate_once(path, None, nn.Linear(4, 1), batches(8), metrics={"a": binary_accuracy},
                                       hooks=[Hook(), evaluation.StopAfterNEvalsHook(3)])
    assert events == ["begin", 1, 2, 3, results]
    with pytest.raises(ValueError, match="`num_evals` must be positive"):
        evaluation.StopAfterNEvalsHook(0)


def test_summaries_at_the_checkpoints_global_step(tmp_path):
    model = nn.Linear(4, 1)
    path = save(tmp_path / "run", model, 42)
    data = batches(2)
    results = evaluation.evaluate_once(path, tmp_path / "eval", nn.Linear(4, 1), data,
                                       metrics={"accuracy": binary_accuracy})
    events = EventAccumulator(str(tmp_path / "eval"))
    events.Reload()
    [scalar] = events.Scalars("accuracy")
    assert scalar.step == 42 and scalar.value == pytest.approx(results["accuracy"])
    lines = (tmp_path / "eval" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 1 and '"step": 42' in lines[0] and '"tag": "accuracy"' in lines[0]
    recorder = Recorder()
    evaluation.evaluate_once(path, None, nn.Linear(4, 1), data, metrics={"accuracy": binary_accuracy},
                             summary_writer=recorder)
    assert recorder.scalars == [(42, "accuracy", results["accuracy"])] and recorder.flushes == 1


# ---------------------------------------------------------------- waiting for checkpoints


def test_wait_for_new_checkpoint_times_out_with_the_originals_timing(tmp_path):
    started = time.monotonic()
    assert evaluation.wait_for_new_checkpoint(tmp_path / "missing", "foo", timeout=1.0, seconds_to_sleep=0.5) is None
    # The original's rule: looks at 0 and 0.5 s, then stops, as another sleep would end past the timeout
    # (an extra sleep would take it to 1.0 s). The margin below that is for a loaded machine's late wake-ups.
    assert 0.5 < time.monotonic() - started < 0.95


def test_wait_for_new_checkpoint_returns_a_newer_one_only(tmp_path):
    first = save(tmp_path, nn.Linear(4, 1), 10)
    assert evaluation.wait_for_new_checkpoint(tmp_path, timeout=0) == first
    assert evaluation.wait_for_new_checkpoint(tmp_path, first, seconds_to_sleep=0.01, timeout=0.05) is None
    second = save(tmp_path, nn.Linear(4, 1), 20)
    assert evaluation.wait_for_new_checkpoint(tmp_path, first, timeout=0) == second
    assert evaluation.wait_for_new_checkpoint(tmp_path, second, seconds_to_sleep=0.01, timeout=0.05) is None


def test_a_missing_or_empty_directory_yields_nothing(tmp_path):
    for directory in (tmp_path / "missing", tmp_path):
        started = time.monotonic()
        assert list(evaluation.checkpoints_iterator(directory, timeout=0)) == []
        assert list(evaluation.checkpoints_iterator(directory, timeout=0.3)) == []
        assert 0.2 < time.monotonic() - started < 1.0


def test_one_checkpoint_is_yielded_once(tmp_path):
    path = save(tmp_path, nn.Linear(4, 1), 3)
    assert list(evaluation.checkpoints_iterator(tmp_path, timeout=0)) == [path]
    assert list(evaluation.checkpoints_iterator(tmp_path, timeout=0, every_checkpoint=True)) == [path]


def test_uncommitted_checkpoints_are_never_yielded(tmp_path):
    path = save(tmp_path, nn.Linear(4, 1), 3)
    (tmp_path / ".model.ckpt-6.tmp-abc").mkdir()
    (tmp_path / ".model.ckpt-6.tmp-abc" / "state.json").write_text("{")
    (tmp_path / "model.ckpt-9").mkdir()  # no state.json: not committed
    (tmp_path / "model.ckpt-9" / "tensors.safetensors").write_bytes(b"partial")
    assert list(evaluation.checkpoints_iterator(tmp_path, timeout=0, every_checkpoint=True)) == [path]


def test_timeout_fn_is_called_once_per_timeout(tmp_path):
    calls = []

    def timeout_fn():
        calls.append(time.monotonic())
        return len(calls) > 3

    assert list(evaluation.checkpoints_iterator(tmp_path / "missing", timeout=0.1, timeout_fn=timeout_fn)) == []
    assert len(calls) == 4


def test_default_yields_the_newest_every_checkpoint_yields_all_in_order(tmp_path):
    paths = [save(tmp_path, nn.Linear(4, 1), step) for step in (5, 10, 15)]
    assert list(evaluation.checkpoints_iterator(tmp_path, timeout=0)) == paths[-1:]
    assert list(evaluation.checkpoints_iterator(tmp_path, timeout=0, every_checkpoint=True)) == paths


def test_a_checkpoint_deleted_before_its_turn_is_skipped_with_a_warning(tmp_path, caplog):
    paths = [save(tmp_path, nn.Linear(4, 1), step) for step in (5, 10, 15)]
    it = evaluation.checkpoints_iterator(tmp_path, timeout=0, every_checkpoint=True)
    assert next(it) == paths[0]
    shutil.rmtree(paths[1])
    assert list(it) == [paths[2]]
    assert f"Checkpoint {paths[1]} was deleted before it could be evaluated" in caplog.text


def test_when_timeout_fn_ends_it_a_checkpoint_that_arrived_meanwhile_is_still_yielded(tmp_path):
    calls = []

    def timeout_fn():  # the trainer commits its final checkpoint just as the wait times out
        calls.append(1)
        return save(tmp_path, nn.Linear(4, 1), 7, final=True) is not None

    assert list(evaluation.checkpoints_iterator(tmp_path, timeout=0.05, timeout_fn=timeout_fn)) == \
        [str(tmp_path / "model.ckpt-7")]
    assert len(calls) == 1


def test_checkpoints_iterator_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="`timeout` must be a number of seconds >= 0 or None, got -1"):
        evaluation.checkpoints_iterator(tmp_path, timeout=-1)
    with pytest.raises(TypeError, match="`min_interval_secs` must be a number of seconds >= 0"):
        evaluation.checkpoints_iterator(tmp_path, min_interval_secs="1")
    with pytest.raises(TypeError, match="`timeout_fn` must be callable"):
        evaluation.checkpoints_iterator(tmp_path, timeout_fn=True)
    with pytest.raises(ValueError, match="`seconds_to_sleep` must be positive"):
        evaluation.wait_for_new_checkpoint(tmp_path, seconds_to_sleep=0)


# ---------------------------------------------------------------- the loop


def test_evaluation_loop_times_out_after_the_one_checkpoint(tmp_path):
    save(tmp_path, nn.Linear(4, 1), 1)
    count = []
    started = time.monotonic()
    results = evaluation.evaluation_loop(tmp_path, None, nn.Linear(4, 1), batches(2), eval_op=count.append,
                                         eval_interval_secs=1, max_number_of_evaluations=2, timeout=0)
    assert 1.0 <= time.monotonic() - started < 2.5  # the interval, then the timeout
    assert len(count) == 2 and results == {}


def test_evaluation_loop_timeout_fn_call_count(tmp_path):
    save(tmp_path, nn.Linear(4, 1), 1)
    calls = []
    evaluation.evaluation_loop(tmp_path, None, nn.Linear(4, 1), batches(2), eval_interval_secs=0, timeout=0.1,
                               timeout_fn=lambda: calls.append(1) or len(calls) > 3)
    assert len(calls) == 4


def test_evaluation_loop_max_evaluations_and_one_event_file(tmp_path):
    model = nn.Linear(4, 1)
    data = batches(2)
    expected = {}
    for step in (10, 20, 30):
        with torch.no_grad():
            model.weight.add_(0.5)
        save(tmp_path / "run", model, step)
        expected[step] = hand_accuracy(model, data)
    results = evaluation.evaluation_loop(tmp_path / "run", tmp_path / "eval", nn.Linear(4, 1), data,
                                         metrics={"accuracy": binary_accuracy}, eval_interval_secs=0, timeout=0,
                                         every_checkpoint=True)
    assert results == {"accuracy": pytest.approx(expected[30], abs=1e-12)}
    [event_file] = glob.glob(str(tmp_path / "eval" / "events.out.tfevents.*"))
    events = EventAccumulator(event_file)
    events.Reload()
    assert [(s.step, pytest.approx(s.value)) for s in events.Scalars("accuracy")] == list(expected.items())
    recorder = Recorder()
    evaluation.evaluation_loop(tmp_path / "run", None, nn.Linear(4, 1), data, metrics={"accuracy": binary_accuracy},
                               eval_interval_secs=0, timeout=0, every_checkpoint=True, max_number_of_evaluations=2,
                               summary_writer=recorder)
    assert [s for s, _, _ in recorder.scalars] == [10, 20] and recorder.flushes == 2


def test_evaluation_loop_skips_a_checkpoint_deleted_before_it_was_read(tmp_path, monkeypatch, caplog):
    path = save(tmp_path, nn.Linear(4, 1), 2)
    gone = str(tmp_path / "model.ckpt-1")

    def paths(*args):
        yield from (gone, path)

    monkeypatch.setattr(evaluation, "checkpoints_iterator", paths)
    recorder = Recorder()
    evaluation.evaluation_loop(tmp_path, None, nn.Linear(4, 1), batches(2), metrics={"a": binary_accuracy},
                               summary_writer=recorder)
    assert [s for s, _, _ in recorder.scalars] == [2]
    assert f"Checkpoint {gone} was deleted before it could be evaluated" in caplog.text


def test_evaluation_loop_rejects_bad_arguments(tmp_path):
    model = nn.Linear(4, 1)
    with pytest.raises(ValueError, match="one-shot iterator"):
        evaluation.evaluation_loop(tmp_path, None, model, iter(batches(2)))
    with pytest.raises(TypeError, match="evaluation_loop\\(\\) got an unexpected keyword argument 'num_eval'"):
        evaluation.evaluation_loop(tmp_path, None, model, batches(2), num_eval=3)
    with pytest.raises(ValueError, match="`max_number_of_evaluations` must be positive"):
        evaluation.evaluation_loop(tmp_path, None, model, batches(2), max_number_of_evaluations=0)
    with pytest.raises(ValueError, match="`eval_interval_secs` must be a number of seconds >= 0"):
        evaluation.evaluation_loop(tmp_path, None, model, batches(2), eval_interval_secs=-1)


# ---------------------------------------------------------------- beside a live trainer

TRAINER = """
import sys, time, torch
from torchslim import checkpoint, learning, losses
torch.set_num_threads(1)
torch.manual_seed(0)
g = torch.Generator().manual_seed(0)
x = torch.randn(256, 4, generator=g)
y = (x @ torch.tensor([1.0, -2.0, 0.5, 1.5]) > 0).float()
data = [(x[i:i + 16], y[i:i + 16]) for i in range(0, 256, 16)]
model = torch.nn.Linear(4, 1)
def total_loss(batch):
    time.sleep(0.01)
    losses.sigmoid_cross_entropy(model(batch[0]).squeeze(1), batch[1])
    return losses.get_total_loss()
op = learning.create_train_op(total_loss, torch.optim.SGD(model.parameters(), lr=0.5))
learning.train(op, sys.argv[1], data, number_of_steps=int(sys.argv[2]), save_interval_steps=4,
               save_interval_secs=None, saver=checkpoint.Saver(max_to_keep=2), log_every_n_steps=1000)
"""


@pytest.mark.slow
def test_beside_a_live_trainer_every_committed_checkpoint_in_order_until_the_final_one(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="torchslim")
    logdir, steps = tmp_path / "run", 80
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    trainer = subprocess.Popen([sys.executable, "-c", TRAINER, str(logdir), str(steps)], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        data = batches(3, 16, seed=1)
        model, recorder, deadline = nn.Linear(4, 1), Recorder(), time.monotonic() + 90
        finished = evaluation.stop_when_training_ends(logdir)
        results = evaluation.evaluation_loop(
            logdir, None, model, data, metrics={"accuracy": binary_accuracy}, summary_writer=recorder,
            eval_op=lambda batch: time.sleep(0.1),  # slower than the trainer: it deletes some before their turn
            eval_interval_secs=0, timeout=0.5, every_checkpoint=True,
            timeout_fn=lambda: finished() or time.monotonic() > deadline)
        output, _ = trainer.communicate(timeout=60)
    finally:
        trainer.kill()
    assert trainer.returncode == 0, output
    assert time.monotonic() < deadline
    evaluated = [s for s, _, _ in recorder.scalars]
    assert evaluated == sorted(set(evaluated)) and all(s % 4 == 0 for s in evaluated)  # committed ones, in order
    assert evaluated[-1] == steps and len(evaluated) < steps // 4
    final = checkpoint.latest_checkpoint(logdir)
    assert checkpoint.read_metadata(final)["final"] and checkpoint.step_of(final) == steps
    trained = nn.Linear(4, 1)
    trained.load_state_dict(checkpoint.load(final)["model"])
    assert results["accuracy"] == pytest.approx(hand_accuracy(trained, data), abs=1e-12)
    assert "was deleted before it could be evaluated" in caplog.text


# ---------------------------------------------------------------- CLI and demo


def test_cli_eval_once_and_watching(tmp_path, capsys):
    model = demo.make_model()
    save(tmp_path, model, 5)
    assert cli.main(["eval", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("global step 5: accuracy ")
    images, labels = demo.load_digits()[1].tensors
    with torch.no_grad():
        expected = (model.eval()(images).argmax(1) == labels).float().mean().item()
    assert float(out.split("accuracy ")[1].split(",")[0]) == pytest.approx(expected, abs=1e-4)
    assert glob.glob(str(tmp_path / "eval" / "events.out.tfevents.*"))

    factories = tmp_path / "factories.py"
    factories.write_text("import torch\nfrom conftest import batches\n"
                         "def model():\n    return torch.nn.Linear(4, 2)\n"
                         "def data():\n    return [(x, y.long()) for x, y in batches(2)]\n")
    run = tmp_path / "run"
    for step in (1, 2):
        save(run, nn.Linear(4, 2), step, final=step == 2)
    assert cli.main(["eval", str(run), "--watch", "--every-checkpoint", "--timeout", "0.1",
                     "--model", f"{factories}:model", "--data", f"{factories}:data"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in lines] == ["global step 1", "global step 2"]


def test_cli_eval_reports_a_logdir_without_checkpoints(tmp_path, capsys):
    assert cli.main(["eval", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert "holds no checkpoint" in err and "Traceback" not in err
    assert not (tmp_path / "missing").exists()


def test_demo_reports_held_out_accuracy_through_evaluate_once_beside_training_curves(tmp_path, capsys):
    logdir = tmp_path / "digits"
    accuracy = demo.main(str(logdir), number_of_steps=10)
    assert f"held-out accuracy {accuracy:.2%}" in capsys.readouterr().out
    runs = EventMultiplexer().AddRunsFromDirectory(str(logdir))
    runs.Reload()
    tags = {run: set(t["scalars"]) for run, t in runs.Runs().items()}
    assert set(tags) == {".", "eval"}  # as TensorBoard lists them
    assert {"accuracy", "total_loss"} <= tags["eval"] and "total_loss" in tags["."]  # one chart, two runs
    [scalar] = runs.Scalars("eval", "accuracy")
    assert scalar.step == 10 and scalar.value == pytest.approx(accuracy)


def test_prefetched_evaluation_gives_the_same_results_and_leaves_no_thread(tmp_path):
    import threading

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    path = checkpoint.Saver().save({"model": model.state_dict()}, tmp_path, 7)
    data = [(torch.randn(8, 4), torch.randint(0, 3, (8,))) for _ in range(5)]
    metrics = {"accuracy": lambda p, t: (p.argmax(1) == t).float().mean()}
    plain = evaluation.evaluate_once(path, None, model, data, metrics=metrics)
    before = set(threading.enumerate())
    fetched = evaluation.evaluate_once(path, None, model, data, metrics=metrics, prefetch=3)
    stopped = evaluation.evaluate_once(path, None, model, data, metrics=metrics, prefetch=True,
                                       hooks=[evaluation.StopAfterNEvalsHook(2)])
    assert fetched == plain and set(stopped) == {"accuracy"}
    assert set(threading.enumerate()) == before
    with pytest.raises(ValueError, match="prefetch"):
        evaluation.evaluate_once(path, None, model, data, metrics=metrics, prefetch=0)


def test_a_logdir_that_is_a_file_or_a_missing_checkpoint_is_a_clear_error(tmp_path):
    path = save(tmp_path / "run", nn.Linear(4, 1), 3)
    afile = tmp_path / "events.txt"
    afile.write_text("")
    with pytest.raises(ValueError, match="`logdir` .* is a file"):
        evaluation.evaluate_once(path, afile, nn.Linear(4, 1), batches(1))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="`checkpoint_path` is None"):
        evaluation.evaluate_once(checkpoint.latest_checkpoint(tmp_path / "empty"), tmp_path / "eval", nn.Linear(4, 1))
    assert not (tmp_path / "eval").exists()
