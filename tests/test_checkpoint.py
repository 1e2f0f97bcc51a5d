"""Checkpoints: round trips, refusals, retention, committed-only listing, inspection."""

from __future__ import annotations

import json
import os

import pytest
import torch

from torchslim import checkpoint
from torchslim._types import NonFiniteError
from torchslim.checkpoint import (
    Saver,
    latest_checkpoint,
    list_checkpoints,
    load,
    save,
    step_of,
)


def names(logdir):
    return [os.path.basename(p) for p in list_checkpoints(logdir)]


def test_round_trip_of_a_nested_state(tmp_path):
    state = {
        "model": {"w": torch.randn(3, 4), "b16": torch.randn(2, dtype=torch.bfloat16),
                  "count": torch.tensor(7, dtype=torch.int64), "mask": torch.tensor([True, False])},
        "optimizer": {"state": {0: {"momentum_buffer": torch.ones(2)}, 1: {}},
                      "param_groups": [{"lr": 0.1, "betas": (0.9, 0.999), "params": [0, 1], "foreach": None}]},
        "text": "hello", "flag": True, "nan": float("nan"), "empty": [],
    }
    save(state, tmp_path / "model.ckpt-3")
    back = load(tmp_path / "model.ckpt-3")
    assert torch.equal(back["model"]["w"], state["model"]["w"])
    assert back["model"]["b16"].dtype == torch.bfloat16 and torch.equal(back["model"]["b16"], state["model"]["b16"])
    assert back["model"]["count"].item() == 7 and back["model"]["mask"].dtype == torch.bool
    assert list(back["optimizer"]["state"]) == [0, 1]  # int keys survive
    assert back["optimizer"]["param_groups"][0]["betas"] == (0.9, 0.999)  # tuples too
    assert back["text"] == "hello" and back["flag"] is True and back["empty"] == []
    assert back["nan"] != back["nan"]


def test_a_real_optimizer_state_loads_back_into_an_optimizer(tmp_path):
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    save({"optimizer": opt.state_dict()}, tmp_path / "model.ckpt-1")
    fresh = torch.optim.Adam(model.parameters())
    fresh.load_state_dict(load(tmp_path / "model.ckpt-1")["optimizer"])
    assert torch.equal(fresh.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])


def test_tied_and_non_contiguous_tensors(tmp_path):
    shared = torch.randn(4, 4)
    state = {"a": shared, "b": shared, "t": shared.t(), "row": shared[1]}
    save(state, tmp_path / "model.ckpt-1")
    back = load(tmp_path / "model.ckpt-1")
    assert back["a"] is back["b"]  # stored once, restored as one tensor
    assert torch.equal(back["t"], shared.t()) and torch.equal(back["row"], shared[1])


def test_nothing_is_unpickled_the_state_file_is_json(tmp_path):
    save({"w": torch.ones(1), "n": 3}, tmp_path / "model.ckpt-5")
    meta = json.loads((tmp_path / "model.ckpt-5" / "state.json").read_text())
    assert meta["global_step"] == 5 and meta["state"]["n"] == 3
    assert sorted(os.listdir(tmp_path / "model.ckpt-5")) == ["state.json", "tensors.safetensors"]


def test_unsupported_values_are_refused_naming_where(tmp_path):
    with pytest.raises(TypeError, match="cannot checkpoint opt/fn: a function"):
        save({"opt": {"fn": lambda: 0}}, tmp_path / "model.ckpt-1")
    with pytest.raises(TypeError, match="must be a dict"):
        save([torch.ones(1)], tmp_path / "model.ckpt-1")
    assert not os.path.exists(tmp_path / "model.ckpt-1")


def test_a_state_with_nan_or_inf_is_never_committed(tmp_path):
    Saver().save({"w": torch.ones(2)}, tmp_path, 1)
    with pytest.raises(NonFiniteError, match="model/w"):
        Saver().save({"model": {"w": torch.tensor([1.0, float("inf")])}}, tmp_path, 2)
    assert names(tmp_path) == ["model.ckpt-1"]
    assert [n for n in os.listdir(tmp_path) if n.startswith(".")] == []


def test_max_to_keep_keeps_the_newest(tmp_path):
    saver = Saver(max_to_keep=3)
    for step in (5, 10, 20, 100, 200):
        saver.save({"s": step}, tmp_path, step)
    assert names(tmp_path) == ["model.ckpt-20", "model.ckpt-100", "model.ckpt-200"]  # numeric order
    assert latest_checkpoint(tmp_path).endswith("model.ckpt-200")


def test_max_to_keep_none_keeps_all(tmp_path):
    saver = Saver(max_to_keep=None)
    for step in range(1, 8):
        saver.save({"s": step}, tmp_path, step)
    assert len(names(tmp_path)) == 7


def test_keep_checkpoint_every_n_hours_preserves_one_per_interval(tmp_path, monkeypatch):
    clock = [1_000_000.0]
    monkeypatch.setattr(checkpoint.time, "time", lambda: clock[0])
    saver = Saver(max_to_keep=2, keep_checkpoint_every_n_hours=1)
    for step in range(1, 11):  # one checkpoint every 20 minutes
        clock[0] += 20 * 60
        saver.save({"s": step}, tmp_path, step)
    # Kept for good: the first one written at least an hour after the saver started, then hourly.
    assert names(tmp_path) == ["model.ckpt-3", "model.ckpt-6", "model.ckpt-9", "model.ckpt-10"]
    # A new saver (a restarted job) adopts the preserved ones instead of deleting them.
    clock[0] += 20 * 60
    Saver(max_to_keep=2, keep_checkpoint_every_n_hours=1).save({"s": 11}, tmp_path, 11)
    assert names(tmp_path) == ["model.ckpt-3", "model.ckpt-6", "model.ckpt-9", "model.ckpt-10", "model.ckpt-11"]


def test_only_committed_checkpoints_are_listed(tmp_path):
    Saver().save({"s": 1}, tmp_path, 1)
    (tmp_path / ".model.ckpt-2.tmp-abc").mkdir()  # a write that crashed before its commit
    (tmp_path / "model.ckpt-3").mkdir()  # no state.json: never committed by torchslim
    (tmp_path / "model.ckpt-x").mkdir()
    (tmp_path / "events.out").write_text("")
    assert names(tmp_path) == ["model.ckpt-1"]
    assert latest_checkpoint(tmp_path / "missing") is None


def test_saving_the_same_step_again_replaces_it(tmp_path):
    save({"v": torch.zeros(1)}, tmp_path / "model.ckpt-4")
    save({"v": torch.ones(1)}, tmp_path / "model.ckpt-4")
    assert load(tmp_path / "model.ckpt-4")["v"].item() == 1.0
    assert os.listdir(tmp_path) == ["model.ckpt-4"]


def test_load_errors_name_the_checkpoint(tmp_path):
    with pytest.raises(ValueError, match="is not a torchslim checkpoint"):
        load(tmp_path)
    save({"v": torch.zeros(8)}, tmp_path / "model.ckpt-1")
    (tmp_path / "model.ckpt-1" / "state.json").write_text("{trunc")
    with pytest.raises(checkpoint.CorruptCheckpointError, match="model.ckpt-1 is corrupt: state.json"):
        load(tmp_path / "model.ckpt-1")
    save({"v": torch.zeros(8)}, tmp_path / "model.ckpt-2")
    os.remove(tmp_path / "model.ckpt-2" / "tensors.safetensors")
    with pytest.raises(checkpoint.CorruptCheckpointError, match="tensors.safetensors is missing"):
        load(tmp_path / "model.ckpt-2")


def test_restore_latest_skips_corrupt_ones(tmp_path, caplog):
    saver = Saver()
    for step in (1, 2):
        saver.save({"s": step, "w": torch.full((4,), float(step))}, tmp_path, step)
    with open(tmp_path / "model.ckpt-2" / "tensors.safetensors", "r+b") as f:
        f.truncate(20)
    path, state = saver.restore_latest(tmp_path)
    assert step_of(path) == 1 and state["s"] == 1
    assert "model.ckpt-2 is corrupt" in caplog.text
    assert saver.restore_latest(tmp_path / "empty") is None


def test_step_of_and_checkpoint_path(tmp_path):
    assert step_of(checkpoint.checkpoint_path(tmp_path, 42)) == 42
    assert step_of("runs/x/model.ckpt-7/") == 7
    with pytest.raises(ValueError, match="not a checkpoint name"):
        step_of("runs/x/model.ckpt")


@pytest.mark.parametrize("kwargs, error", [({"max_to_keep": -1}, ValueError), ({"max_to_keep": 2.5}, TypeError),
                                           ({"keep_checkpoint_every_n_hours": 0}, ValueError),
                                           ({"keep_checkpoint_every_n_hours": "1"}, TypeError)])
def test_saver_rejects_bad_arguments(kwargs, error):
    with pytest.raises(error, match=next(iter(kwargs))):
        Saver(**kwargs)


def test_describe_lists_metadata_and_tensors(tmp_path):
    Saver().save({"model": {"conv0.weight": torch.ones(2, 3)}, "global_step": 9, "lr": 0.5}, tmp_path, 9)
    text = checkpoint.describe(tmp_path)  # a logdir: its latest checkpoint
    assert "global_step: 9" in text
    assert "lr = 0.5" in text
    assert "model/conv0.weight" in text and "F32" in text and "[2, 3]" in text
    with pytest.raises(ValueError, match="no checkpoint or logdir"):
        checkpoint.describe(tmp_path / "nope")


def test_describe_sorts_naturally_totals_the_model_and_folds_bookkeeping(tmp_path):
    model = {f"layer{i}.weight": torch.ones(2, 5) for i in (11, 3, 2)}
    state = {"model": model, "optimizer": {"state": {0: {"exp_avg": torch.zeros(2, 5)}},
                                           "param_groups": [{"lr": 0.1, "params": [0]}]},
             "rng": {"torch": torch.zeros(7, dtype=torch.uint8), "python": [3, 4]}, "global_step": 4}
    path = Saver().save(state, tmp_path, 4)
    text = checkpoint.describe(path)
    assert text.index("model/layer2.") < text.index("model/layer3.") < text.index("model/layer11.")
    assert "model: 3 tensors, 30 values (120 B)" in text
    assert "optimizer/state: 1 tensor, 10 values (40 B)  (folded" in text and "exp_avg" not in text
    assert "rng: 1 tensor, 7 values (7 B)  (folded" in text and "rng/python" not in text
    assert "optimizer/param_groups/0/lr = 0.1" in text  # hyperparameters stay visible
    everything = checkpoint.describe(path, show_all=True)
    assert "optimizer/state/0/exp_avg" in everything and "rng/python/0 = 3" in everything
    with pytest.raises(TypeError, match="show_all"):
        checkpoint.describe(path, show_all="yes")


# ---------------------------------------------------------------- metadata, best checkpoints, evaluator records


def test_metadata_is_committed_with_the_checkpoint_and_must_be_json(tmp_path):
    path = save({"w": torch.ones(1)}, tmp_path / "model.ckpt-3", metadata={"metrics": {"accuracy": 0.75}})
    with open(os.path.join(path, checkpoint.STATE_FILE)) as f:
        assert json.load(f)["metadata"] == {"metrics": {"accuracy": 0.75}}
    assert checkpoint.read_metadata(path)["metadata"]["metrics"]["accuracy"] == 0.75
    with pytest.raises(TypeError, match="metadata"):
        save({"w": torch.ones(1)}, tmp_path / "model.ckpt-4", metadata={"t": torch.ones(1)})
    with pytest.raises(TypeError, match="metadata"):
        save({"w": torch.ones(1)}, tmp_path / "model.ckpt-4", metadata=[1])
    assert names(tmp_path) == ["model.ckpt-3"]  # nothing written for the refused ones


@pytest.mark.parametrize("mode, values, max_to_keep, keep_best, kept", [
    # steps 10..60 with these metric values; newest max_to_keep, plus the best keep_best
    ("max", [0.5, 0.9, 0.7, 0.8, 0.6, 0.4], 2, 1, [20, 50, 60]),
    ("max", [0.5, 0.9, 0.7, 0.8, 0.6, 0.4], 2, 2, [20, 40, 50, 60]),
    ("min", [0.5, 0.9, 0.7, 0.8, 0.6, 0.4], 2, 2, [10, 50, 60]),  # best two (60, 10): 60 is newest anyway
    ("max", [0.5, 0.9, 0.9, 0.8, 0.6, 0.4], 1, 1, [20, 60]),  # ties go to the earlier step
    ("max", [float("nan"), 0.1, float("nan"), 0.2, 0.3, 0.0], 1, 2, [40, 50, 60]),  # NaN is never best
])
def test_keep_best_keeps_the_best_by_the_metric_besides_the_newest(tmp_path, mode, values, max_to_keep, keep_best,
                                                                    kept):
    saver = Saver(max_to_keep=max_to_keep, keep_best=keep_best, metric="m", mode=mode)
    for i, value in enumerate(values):
        saver.save({"w": torch.ones(1)}, tmp_path, (i + 1) * 10, metadata={"metrics": {"m": value}})
    assert [step_of(p) for p in list_checkpoints(tmp_path)] == kept


def test_checkpoints_without_the_metric_fall_out_as_before(tmp_path):
    saver = Saver(max_to_keep=1, keep_best=1, metric="accuracy")
    saver.save({"w": torch.ones(1)}, tmp_path, 1, metadata={"metrics": {"accuracy": 0.3}})
    for step in (2, 3, 4):
        saver.save({"w": torch.ones(1)}, tmp_path, step)
    assert names(tmp_path) == ["model.ckpt-1", "model.ckpt-4"]


def test_best_checkpoint_and_read_metrics(tmp_path):
    saver = Saver(max_to_keep=None, metric="loss", mode="min")
    for step, loss in ((1, 0.5), (2, 0.2), (3, 0.4)):
        saver.save({"w": torch.ones(1)}, tmp_path, step, metadata={"metrics": {"loss": loss, "acc": 1 - loss}})
    saver.save({"w": torch.ones(1)}, tmp_path, 4)  # not evaluated
    assert checkpoint.best_checkpoint(tmp_path) == checkpoint.checkpoint_path(tmp_path, 2)  # the saver's watch
    assert checkpoint.best_checkpoint(tmp_path, "acc", "max") == checkpoint.checkpoint_path(tmp_path, 2)
    assert checkpoint.best_checkpoint(tmp_path, "loss", "max") == checkpoint.checkpoint_path(tmp_path, 1)
    assert checkpoint.read_metrics(tmp_path) == {1: {"loss": 0.5, "acc": 0.5}, 2: {"loss": 0.2, "acc": 0.8},
                                                 3: {"loss": 0.4, "acc": 0.6}}
    with pytest.raises(ValueError, match="pass `mode`"):
        checkpoint.best_checkpoint(tmp_path, "acc")
    assert checkpoint.best_checkpoint(tmp_path, "nothing", "max") is None
    other = tmp_path / "other"
    Saver().save({"w": torch.ones(1)}, other, 1, metadata={"metrics": {"loss": 1.0}})
    with pytest.raises(ValueError, match="records a watched metric; pass `metric`"):
        checkpoint.best_checkpoint(other)
    assert checkpoint.best_checkpoint(tmp_path / "missing", "loss", "min") is None


def test_an_evaluators_records_rank_checkpoints_and_have_one_writer(tmp_path):
    from torchslim._records import RecordWriter, read_records

    saver = Saver(max_to_keep=1, keep_best=1, metric="accuracy")
    with RecordWriter(tmp_path) as writer:
        with pytest.raises(ValueError, match="another evaluator is already recording"):
            RecordWriter(tmp_path)
        for step, accuracy in ((1, 0.6), (2, 0.8), (3, 0.7)):
            saver.save({"w": torch.ones(1)}, tmp_path, step)
            writer.record(step, {"accuracy": accuracy})
        saver.save({"w": torch.ones(1)}, tmp_path, 4)
    assert names(tmp_path) == ["model.ckpt-2", "model.ckpt-4"]  # 2 was recorded best by the evaluator
    assert read_records(tmp_path) == {1: {"accuracy": 0.6}, 2: {"accuracy": 0.8}, 3: {"accuracy": 0.7}}
    assert checkpoint.read_metrics(tmp_path) == {2: {"accuracy": 0.8}}  # committed checkpoints only
    assert checkpoint.best_checkpoint(tmp_path) == checkpoint.checkpoint_path(tmp_path, 2)
    assert not [n for n in os.listdir(tmp_path) if ".tmp-" in n]
    with RecordWriter(tmp_path) as again:  # the lock went with the first writer; the records are resumed
        assert again.recorded(3) and not again.recorded(4)
    assert "accuracy = 0.8" in checkpoint.describe(checkpoint.checkpoint_path(tmp_path, 2))


def test_describe_shows_the_metrics_in_the_metadata(tmp_path):
    Saver(metric="accuracy").save({"w": torch.ones(1)}, tmp_path, 5,
                                  metadata={"metrics": {"accuracy": 0.93}, "stop_reason": "no improvement"})
    text = checkpoint.describe(tmp_path)
    assert "metrics/accuracy = 0.93" in text and "stop_reason = 'no improvement'" in text
    assert "watch/metric = 'accuracy'" in text


@pytest.mark.parametrize("kwargs, error, match", [
    ({"keep_best": 2}, ValueError, "needs `metric`"),
    ({"keep_best": -1, "metric": "a"}, ValueError, "keep_best"),
    ({"keep_best": 1, "metric": "a", "mode": "maximum"}, ValueError, "'max'.*'min'.*'maximum'"),
    ({"metric": 3}, TypeError, "metric"),
])
def test_saver_rejects_bad_best_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        Saver(**kwargs)
