"""Summaries: TF-Slim's helpers and tags, the train loop's summary and trace services, real TensorBoard."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from conftest import Logistic, batches
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from torchslim import losses, summaries
from torchslim.learning import create_train_op, train
from torchslim.summaries import (
    SummaryCollection,
    TensorBoardWriter,
    add_histogram_summaries,
    add_histogram_summary,
    add_image_summary,
    add_scalar_summary,
    add_zero_fraction_summary,
    collecting,
    write_summaries,
)


def events(logdir) -> EventAccumulator:
    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "histograms": 0, "images": 0})
    acc.Reload()
    return acc


def scalars(logdir, tag) -> dict[int, float]:
    return {e.step: e.value for e in events(logdir).Scalars(tag)}


@pytest.fixture(autouse=True)
def no_pending_summaries():
    summaries.take_pending()  # each test starts with an empty context collection
    yield
    summaries.take_pending()


# ---------------------------------------------------------------- helpers and tags


def test_prefix_gives_eval_my_score_read_back_by_tensorboard(tmp_path):
    collection = SummaryCollection()
    with collecting(collection):
        add_scalar_summary(torch.tensor(3.0), "my_score", prefix="eval", print_summary=True)
    writer = TensorBoardWriter(tmp_path)
    write_summaries(collection, writer, step=7)
    writer.close()
    assert scalars(tmp_path, "eval/my_score") == {7: 3.0}


def test_zero_fraction_tag_and_value():
    collection = SummaryCollection()
    with collecting(collection):
        add_zero_fraction_summary(torch.tensor([0.0, 2.0, 0.0, 1.0]), "relu1", prefix="act")
    assert write_summaries(collection, summaries.NullWriter(), 1) == {"act/relu1/Fraction_of_Zero_Values": 0.5}


def test_print_summary_prints_the_value_when_written(capsys):
    collection = SummaryCollection()
    with collecting(collection):
        add_scalar_summary(2.5, "lr", print_summary=True)
    assert capsys.readouterr().out == ""
    write_summaries(collection, summaries.NullWriter(), 1)
    assert capsys.readouterr().out == "lr: 2.5\n"


def test_a_parameter_is_read_live_and_a_callable_when_written():
    w = torch.nn.Parameter(torch.tensor([1.0]))
    calls = []
    collection = SummaryCollection()
    with collecting(collection):
        add_scalar_summary(w, "w")
        add_scalar_summary(lambda: calls.append(1) or 4.0, "computed")
    with torch.no_grad():
        w.fill_(5.0)
    assert calls == []
    assert write_summaries(collection, summaries.NullWriter(), 1) == {"w": 5.0, "computed": 4.0}


def test_names_default_to_state_dict_names_and_unnamed_tensors_are_refused():
    model = torch.nn.Linear(2, 1)
    collection = SummaryCollection()
    with collecting(collection):
        add_histogram_summaries(model.parameters(), prefix="weights")
        collection.set_names({id(t): n for n, t in model.state_dict(keep_vars=True).items()})
        with pytest.raises(ValueError, match="needs a name="):
            add_histogram_summary(torch.ones(3))
    assert [s.tag(collection.names) for s in collection.summaries] == ["weights/weight", "weights/bias"]
    with pytest.raises(ValueError, match="needs a name="):
        add_scalar_summary(3.0)


@pytest.mark.parametrize("data_format, shape", [("NHWC", (2, 8, 6, 3)), ("NCHW", (2, 3, 8, 6))])
def test_images_in_both_layouts(tmp_path, data_format, shape):
    collection = SummaryCollection()
    with collecting(collection):
        add_image_summary(torch.rand(shape), "digits", data_format=data_format)
    writer = TensorBoardWriter(tmp_path)
    write_summaries(collection, writer, 3)
    writer.close()
    (image,) = events(tmp_path).Images("digits")
    assert image.step == 3 and image.height == 8 and image.width == 6 * 2  # a grid of the 2 images side by side


def test_image_with_the_wrong_layout_suggests_the_other():
    with pytest.raises(ValueError, match="data_format='NCHW'"):
        add_image_summary(torch.rand(2, 3, 8, 8), "x")
    with pytest.raises(ValueError, match="data_format"):
        add_image_summary(torch.rand(2, 8, 8, 3), "x", data_format="HWC")


@pytest.mark.parametrize("call, error", [
    (lambda: add_scalar_summary(torch.ones(3), "x"), ValueError),
    (lambda: add_scalar_summary("3", "x"), TypeError),
    (lambda: add_scalar_summary(1.0, name=3), TypeError),
    (lambda: add_scalar_summary(1.0, "x", prefix=1), TypeError),
    (lambda: add_histogram_summaries(torch.ones(3)), TypeError),
])
def test_bad_arguments_are_refused(call, error):
    with pytest.raises(error):
        call()


def test_collections_do_not_leak_between_threads():
    seen = {}

    def worker():
        add_scalar_summary(1.0, "from_thread")
        seen["thread"] = len(summaries.current_collection().summaries)

    add_scalar_summary(2.0, "from_main")
    t = threading.Thread(target=worker)
    t.start()
    t.join()
    assert seen["thread"] == 1
    assert [s.name for s in summaries.current_collection().summaries] == ["from_main"]


# ---------------------------------------------------------------- in train


def relu_problem():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))

    def total_loss(batch):
        inputs, labels = batch
        hidden = model[1](model[0](inputs))
        add_zero_fraction_summary(hidden, "hidden")
        losses.sigmoid_cross_entropy(model[2](hidden).squeeze(1), labels)
        losses.l2_regularization_loss(model[0].parameters(), 1e-3)
        return losses.get_total_loss()

    return model, total_loss


def test_train_writes_the_run_scalars_and_every_added_summary(tmp_path):
    model, total_loss = relu_problem()
    add_histogram_summaries(model.parameters())  # before training: adopted by the run
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    op = create_train_op(total_loss, optimizer)
    train(op, tmp_path, batches(), number_of_steps=12, save_summaries_steps=5)
    acc = events(tmp_path)
    tags = acc.Tags()
    assert {"total_loss", "losses/sigmoid_cross_entropy", "regularization_losses/l2_regularization",
            "learning_rate", "global_step/sec", "hidden/Fraction_of_Zero_Values"} <= set(tags["scalars"])
    assert {"0.weight", "0.bias", "2.weight", "2.bias"} <= set(tags["histograms"])
    assert sorted(scalars(tmp_path, "total_loss")) == [5, 10, 12]  # 12: the final write
    assert sorted(scalars(tmp_path, "hidden/Fraction_of_Zero_Values")) == [5, 10]  # a step summary: due steps only
    assert list(scalars(tmp_path, "learning_rate").values()) == pytest.approx([0.1, 0.1, 0.1])
    assert 0 < scalars(tmp_path, "hidden/Fraction_of_Zero_Values")[10] < 1
    total, parts = scalars(tmp_path, "total_loss")[10], (
        scalars(tmp_path, "losses/sigmoid_cross_entropy")[10]
        + scalars(tmp_path, "regularization_losses/l2_regularization")[10])
    assert total == pytest.approx(parts, rel=1e-5)
    # The run took its summaries along: nothing is left for the next run in this context.
    assert summaries.current_collection().summaries == []


def test_metrics_jsonl_carries_the_scalars(tmp_path):
    p = Logistic()
    train(create_train_op(p.loss, p.optimizer), tmp_path, batches(), number_of_steps=6, save_summaries_steps=3)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    loss_steps = [r["step"] for r in records if r["tag"] == "total_loss"]
    assert loss_steps == [3, 6]
    assert all({"step", "tag", "value", "wall_time"} == set(r) for r in records)


def test_step_summaries_cost_nothing_on_steps_where_none_is_due(tmp_path):
    p = Logistic()
    reads = []

    def total_loss(batch):
        add_scalar_summary(lambda: reads.append(op.step) or 1.0, "probe")
        return p.loss(batch)

    op = create_train_op(total_loss, p.optimizer, model=p.model)
    train(op, tmp_path, batches(), number_of_steps=20, save_summaries_steps=10)
    assert reads == [10, 20]


def test_summarize_gradients_writes_a_histogram_and_a_norm_per_parameter(tmp_path):
    p = Logistic()
    op = create_train_op(p.loss, p.optimizer, summarize_gradients=True)
    train(op, tmp_path, batches(), number_of_steps=4, save_summaries_steps=2)
    tags = events(tmp_path).Tags()
    assert {"weight/gradient", "bias/gradient"} <= set(tags["histograms"])
    norms = scalars(tmp_path, "weight/gradient_norm")
    assert sorted(norms) == [2, 4] and all(v > 0 for v in norms.values())
    assert norms[4] == pytest.approx(p.model.weight.grad.norm().item(), rel=1e-5)


def test_a_parameter_without_gradient_is_logged(caplog):
    caplog.set_level("INFO", logger="torchslim")
    collection = SummaryCollection()
    w = torch.nn.Parameter(torch.ones(1))
    collection.set_names({id(w): "frozen.w"})
    with collecting(collection):
        assert summaries.add_gradients_summaries([(None, w)]) == []
    assert "frozen.w has no gradient" in caplog.text


def test_summary_writer_none_and_summary_op_none_write_no_event_file(tmp_path):
    for kwargs in ({"summary_writer": None}, {"summary_op": None}):
        logdir = tmp_path / next(iter(kwargs))
        p = Logistic()
        train(create_train_op(p.loss, p.optimizer), logdir, batches(), number_of_steps=3, save_summaries_steps=1,
              **kwargs)
        assert not [n for n in os.listdir(logdir) if n.startswith("events") or n == "metrics.jsonl"]


def test_summary_op_adds_scalars(tmp_path):
    p = Logistic()
    op = create_train_op(p.loss, p.optimizer)
    train(op, tmp_path, batches(), number_of_steps=4, save_summaries_steps=2,
          summary_op=lambda train_op: {"weight_norm": train_op.model.weight.norm().item()})
    assert sorted(scalars(tmp_path, "weight_norm")) == [2, 4]


def test_given_writer_gets_scalars_at_due_steps(tmp_path):
    class Recorder(summaries.NullWriter):
        def __init__(self):
            self.scalars = []

        def add_scalar(self, tag, value, step):
            self.scalars.append((tag, step))

    p = Logistic()
    recorder = Recorder()
    train(create_train_op(p.loss, p.optimizer), tmp_path, batches(), number_of_steps=4, save_summaries_steps=2,
          summary_writer=recorder)
    assert [s for t, s in recorder.scalars if t == "total_loss"] == [2, 4]


def test_logdir_none_rejects_summary_and_trace_arguments():
    p = Logistic()
    op = create_train_op(p.loss, p.optimizer)
    with pytest.raises(ValueError, match="trace_every_n_steps.*logdir=None"):
        train(op, None, batches(), number_of_steps=2, trace_every_n_steps=1)
    with pytest.raises(ValueError, match="summary_op.*logdir=None"):
        train(op, None, batches(), number_of_steps=2, summary_op=lambda op: {})
    with pytest.raises(ValueError, match="summary_writer.*logdir=None"):
        train(op, None, batches(), number_of_steps=2, summary_writer=summaries.NullWriter())
    with pytest.raises(TypeError, match="summary_writer"):
        train(op, "unused", batches(), number_of_steps=2, summary_writer=object())


def test_trace_every_n_steps_writes_chrome_traces(tmp_path):
    p = Logistic()
    train(create_train_op(p.loss, p.optimizer), tmp_path, batches(), number_of_steps=6, trace_every_n_steps=3)
    traces = sorted(n for n in os.listdir(tmp_path) if n.startswith("trace-"))
    assert traces == ["trace-3.json", "trace-6.json"]
    trace = json.loads((tmp_path / "trace-3.json").read_text())
    assert any("addmm" in e.get("name", "") or "linear" in e.get("name", "") for e in trace["traceEvents"])


# ---------------------------------------------------------------- the real TensorBoard


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_tensorboard_server_serves_the_loss_series(tmp_path):
    p = Logistic()
    train(create_train_op(p.loss, p.optimizer), tmp_path, batches(), number_of_steps=9, save_summaries_steps=3)
    port = free_port()
    tensorboard = Path(sys.executable).with_name("tensorboard")
    server = subprocess.Popen([str(tensorboard), "--logdir", str(tmp_path), "--host", "127.0.0.1", "--port",
                               str(port), "--load_fast=false", "--reload_interval", "1"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}/data/plugin/scalars/scalars?run=.&tag=total_loss"
        deadline, series = time.monotonic() + 60, None
        while time.monotonic() < deadline and not series:
            try:
                with urllib.request.urlopen(url, timeout=5) as response:
                    series = json.loads(response.read())
            except OSError:
                time.sleep(0.5)
        assert series, "tensorboard did not serve the series in 60 s"
        assert [step for _, step, _ in series] == [3, 6, 9]
        assert [value for _, _, value in series] == pytest.approx(list(scalars(tmp_path, "total_loss").values()))
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_histograms_read_back_with_their_statistics(tmp_path):
    collection = SummaryCollection()
    values = torch.tensor([0.0, 1.0, 2.0, 3.0, float("nan")])
    with collecting(collection):
        add_histogram_summary(values, "h")
        add_histogram_summary(torch.full((3,), 2.0), "flat")
    writer = TensorBoardWriter(tmp_path, buckets=3)
    write_summaries(collection, writer, 4)
    writer.close()
    acc = events(tmp_path)
    (event,) = acc.Histograms("h")
    h = event.histogram_value
    assert event.step == 4 and (h.min, h.max, h.num, h.sum, h.sum_squares) == (0.0, 3.0, 4, 6.0, 14.0)
    assert sum(h.bucket) == 4 and h.bucket_limit[-1] == pytest.approx(3.0)
    (flat,) = acc.Histograms("flat")
    assert (flat.histogram_value.num, list(flat.histogram_value.bucket)) == (3, [3.0])


def test_the_final_summary_carries_each_loss_and_a_run_that_writes_nothing_leaves_no_file(tmp_path):
    p = Logistic()
    op = create_train_op(p.loss, p.optimizer)
    train(op, tmp_path, batches(), number_of_steps=5)  # summaries every 600 s: only the final one is written
    assert scalars(tmp_path, "losses/sigmoid_cross_entropy") == pytest.approx({5: scalars(tmp_path, "total_loss")[5]})
    assert list(scalars(tmp_path, "learning_rate")) == [5]
    files = sorted(os.listdir(tmp_path))
    train(op, tmp_path, batches(), number_of_steps=5)  # resumed with nothing left to train: writes nothing
    assert sorted(os.listdir(tmp_path)) == files


@pytest.mark.slow
def test_tensorboard_shows_the_demo_run_as_a_showcase(tmp_path):
    from torchslim import demo

    logdir = tmp_path / "digits"
    demo.main(str(logdir), number_of_steps=300)
    port = free_port()
    tensorboard = Path(sys.executable).with_name("tensorboard")
    server = subprocess.Popen([str(tensorboard), "--logdir", str(logdir), "--host", "127.0.0.1", "--port", str(port),
                               "--load_fast=false", "--reload_interval", "1"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def get(path: str):
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return json.loads(response.read())

    try:
        deadline, tags = time.monotonic() + 60, {}
        while time.monotonic() < deadline and "eval" not in tags:
            try:
                tags = get("/data/plugin/scalars/tags")
            except OSError:
                time.sleep(0.5)
        assert "eval" in tags, "tensorboard did not list the runs in 60 s"
        assert {"total_loss", "losses/sparse_softmax_cross_entropy", "learning_rate", "global_step/sec"} <= set(tags["."])
        loss = get("/data/plugin/scalars/scalars?run=.&tag=total_loss")
        accuracy = get("/data/plugin/scalars/scalars?run=eval&tag=accuracy")
        assert len(loss) >= 10 and [step for _, step, _ in loss][:2] == [25, 50]
        assert [step for _, step, _ in accuracy] == [250, 300] and all(0.5 < v <= 1 for _, _, v in accuracy)
        histograms = get("/data/plugin/histograms/tags")["."]
        assert {"0.weight", "9.weight", "11.bias"} <= set(histograms)
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_under_accumulation_each_loss_is_summarized_over_the_whole_update_as_the_total_is(tmp_path):
    model, total_loss = relu_problem()
    op = create_train_op(total_loss, torch.optim.SGD(model.parameters(), lr=0.1), accumulate_steps=4)
    train(op, tmp_path, batches(), number_of_steps=6, save_summaries_steps=5)
    total, parts = scalars(tmp_path, "total_loss")[5], (
        scalars(tmp_path, "losses/sigmoid_cross_entropy")[5]
        + scalars(tmp_path, "regularization_losses/l2_regularization")[5])
    assert total == pytest.approx(parts, rel=1e-5)  # each loss is the mean of its 4 micro-batches, as the total
