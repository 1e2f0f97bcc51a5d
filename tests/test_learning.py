"""create_train_op and train: the behaviours TF-Slim's learning tests pin down, and their errors."""

from __future__ import annotations

import functools
import math
import os
import threading

import pytest
import torch
from conftest import Logistic, batches

from torchslim import checkpoint, gradients, learning, losses, variables
from torchslim.learning import GlobalStep, NonFiniteError, create_train_op, train


def params_of(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ---------------------------------------------------------------- create_train_op


def test_train_op_steps_and_returns_the_loss(problem):
    op = create_train_op(problem.loss, problem.optimizer)
    batch = batches()[0]
    before = params_of(problem.model)
    with losses.collect_losses():
        expected = problem.loss(batch).item()
    loss = op(batch)
    assert loss.item() == pytest.approx(expected)
    assert not loss.requires_grad
    assert op.step == 1
    assert not torch.equal(before["weight"], problem.model.weight)


def test_loss_decreases_on_the_logistic_problem(problem):
    op = create_train_op(problem.loss, problem.optimizer)
    data = batches()
    first = op(data[0]).item()
    for _ in range(20):
        for b in data:
            last = op(b).item()
    assert last < first / 4


def test_global_step_none_does_not_count_and_shared_step_counts_both(problem):
    op = create_train_op(problem.loss, problem.optimizer, global_step=None)
    op(batches()[0])
    assert op.global_step is None and op.step == 0
    shared = GlobalStep()
    a = create_train_op(problem.loss, problem.optimizer, global_step=shared)
    b = create_train_op(problem.loss, problem.optimizer, global_step=shared)
    a(batches()[0]), b(batches()[0]), a(batches()[0])
    assert shared.value == 3


def test_loss_function_without_batch():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.tensor([3.0]))
    opt = torch.optim.SGD([w], lr=0.1)
    op = create_train_op(lambda: (w ** 2).sum(), opt)
    for _ in range(50):
        op()
    assert abs(w.item()) < 0.01
    assert "w" in dict(op.named_parameters())


def test_finds_the_model_through_closure_global_bound_method_and_partial(problem):
    model = problem.model
    opt = problem.optimizer

    def closure_loss(batch):
        return model(batch[0]).mean()

    assert create_train_op(closure_loss, opt).model is model
    assert create_train_op(problem.loss, opt).model is model  # bound method: self.model
    assert create_train_op(functools.partial(lambda m, b: m(b[0]).mean(), model), opt).model is model
    op = create_train_op(closure_loss, opt)
    assert sorted(op.model_variables()) == ["bias", "weight"]


def test_several_modules_get_prefixed_names():
    encoder, head = torch.nn.Linear(4, 3), torch.nn.Linear(3, 1)
    opt = torch.optim.SGD([*encoder.parameters(), *head.parameters()], lr=0.1)
    op = create_train_op(lambda b: head(encoder(b[0])).mean(), opt)
    assert sorted(op.model_variables()) == ["encoder.bias", "encoder.weight", "head.bias", "head.weight"]
    assert set(op.modules) == {"encoder", "head"}


def test_optimizer_params_outside_the_found_modules_is_an_error_naming_the_fix():
    model, other = torch.nn.Linear(4, 1), torch.nn.Linear(4, 1)
    opt = torch.optim.SGD([*model.parameters(), *other.parameters()], lr=0.1)
    with pytest.raises(ValueError, match=r"model=my_model"):
        create_train_op(lambda b: model(b[0]).mean(), opt)
    op = create_train_op(lambda b: model(b[0]).mean() + other(b[0]).mean(), opt,
                         model={"model": model, "other": other})
    assert set(op.modules) == {"model", "other"}


def test_update_ops_default_runs_registered_ops_and_empty_list_disables(problem):
    calls = []
    handle = learning.register_update_op(problem.model, lambda: calls.append("ema"))
    try:
        op = create_train_op(problem.loss, problem.optimizer)
        op(batches()[0])
        assert calls == ["ema"]
        create_train_op(problem.loss, problem.optimizer, update_ops=[])(batches()[0])
        assert calls == ["ema"]
        mine = []
        with pytest.warns(UserWarning, match="leaves out 1 update op"):
            op = create_train_op(problem.loss, problem.optimizer, update_ops=[lambda: mine.append(1)])
        op(batches()[0])
        assert calls == ["ema"] and mine == [1]
    finally:
        handle.remove()
    create_train_op(problem.loss, problem.optimizer)(batches()[0])
    assert calls == ["ema"]


def test_update_op_keeps_an_ema_of_the_weights(problem):
    swa = torch.optim.swa_utils
    ema = swa.AveragedModel(problem.model, multi_avg_fn=swa.get_ema_multi_avg_fn(0.5))
    handle = learning.register_update_op(problem.model, lambda: ema.update_parameters(problem.model))
    op = create_train_op(problem.loss, problem.optimizer)
    handle.remove()
    for b in batches()[:3]:
        op(b)
    assert ema.n_averaged.item() == 3
    assert not torch.equal(ema.module.weight, problem.model.weight)


def test_batchnorm_statistics_update_in_the_step():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 1))
    op = create_train_op(lambda b: model(b[0]).pow(2).mean(), torch.optim.SGD(model.parameters(), lr=0.1))
    op(batches()[0])
    assert model[1].num_batches_tracked.item() == 1
    assert not torch.equal(model[1].running_mean, torch.zeros(4))


@pytest.mark.parametrize("by_name", [True, False])
def test_variables_to_train_leaves_the_others_unchanged(problem, by_name):
    chosen = ["bias"] if by_name else [problem.model.bias]
    op = create_train_op(problem.loss, problem.optimizer, variables_to_train=chosen)
    before = params_of(problem.model)
    for b in batches():
        op(b)
    assert torch.equal(problem.model.weight, before["weight"])
    assert not torch.equal(problem.model.bias, before["bias"])


def test_variables_to_train_errors(problem):
    with pytest.raises(ValueError, match="'nope', which is not a parameter"):
        create_train_op(problem.loss, problem.optimizer, variables_to_train=["nope"])
    with pytest.raises(ValueError, match="does not update"):
        create_train_op(problem.loss, problem.optimizer, variables_to_train=[torch.nn.Parameter(torch.ones(1))])
    with pytest.raises(TypeError, match="list of parameters or names"):
        create_train_op(problem.loss, problem.optimizer, variables_to_train="weight")
    with pytest.raises(ValueError, match="empty"):
        create_train_op(problem.loss, problem.optimizer, variables_to_train=[])


def test_clip_gradient_norm_clips_each_gradient_tensor(problem):
    seen = []
    op = create_train_op(problem.loss, problem.optimizer, clip_gradient_norm=1e-3,
                         transform_grads_fn=lambda gv: seen.append([g.norm().item() for g, _ in gv]) or gv)
    op(batches()[0])
    assert len(seen[0]) == 2 and all(n == pytest.approx(1e-3, rel=1e-4) for n in seen[0])
    assert problem.model.weight.grad.norm().item() == pytest.approx(1e-3, rel=1e-4)


def test_transform_grads_fn_sees_the_pairs_and_its_result_is_applied(problem):
    pairs = []

    def zero(gv):
        pairs.append(gv)
        return [(torch.zeros_like(g), p) for g, p in gv]

    op = create_train_op(problem.loss, problem.optimizer, transform_grads_fn=zero)
    before = params_of(problem.model)
    op(batches()[0])
    assert [p for _, p in pairs[0]] == [problem.model.weight, problem.model.bias]
    assert torch.equal(problem.model.weight, before["weight"])


def test_gradient_multipliers_change_the_loss_reached():
    results = {}
    for factor in (1.0, 0.0):
        p = Logistic(seed=3)
        op = create_train_op(p.loss, p.optimizer, gradient_multipliers={"weight": factor})
        before = p.model.weight.detach().clone()
        for b in batches():
            last = op(b).item()
        results[factor] = last
        if factor == 0.0:
            assert torch.equal(p.model.weight, before)
    assert results[1.0] < results[0.0] - 0.05


def test_gradient_multipliers_errors(problem):
    with pytest.raises(TypeError, match="must be a dict"):
        create_train_op(problem.loss, problem.optimizer, gradient_multipliers=[("weight", 2.0)])
    with pytest.raises(ValueError, match="is empty"):
        create_train_op(problem.loss, problem.optimizer, gradient_multipliers={})
    with pytest.raises(ValueError, match="does not train"):
        create_train_op(problem.loss, problem.optimizer, variables_to_train=["bias"],
                        gradient_multipliers={"weight": 2.0})
    unused = torch.nn.Parameter(torch.ones(2))
    model = problem.model
    opt = torch.optim.SGD([*model.parameters(), unused], lr=0.1)
    op = create_train_op(lambda b: model(b[0]).mean(), opt, gradient_multipliers={unused: 2.0},
                         model={"model": model, "unused": unused})
    with pytest.raises(ValueError, match="has no gradient"):
        op(batches()[0])


def test_check_numerics_names_the_step_on_a_nan_loss(problem):
    op = create_train_op(lambda b: problem.model(b[0]).mean() * float("nan"), problem.optimizer)
    with pytest.raises(NonFiniteError, match=r"at global step 0, the loss is nan"):
        op(batches()[0])
    assert op.step == 0


def test_check_numerics_names_the_parameter_with_a_nonfinite_gradient():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
    with torch.no_grad():
        model[1].weight.fill_(0.0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    # sqrt at 0 has an infinite gradient while the loss stays finite.
    op = create_train_op(lambda b: model[1](model[0](b)).sum() + model[1].weight.abs().sqrt().sum(), opt)
    op(torch.ones(1, 2))
    with pytest.raises(NonFiniteError, match=r"global step 1.*non-finite gradient \(from step 0\) is '1.weight'"):
        op(torch.ones(1, 2))


def test_check_numerics_off_lets_nan_through(problem):
    op = create_train_op(lambda b: problem.model(b[0]).mean() * float("nan"), problem.optimizer, check_numerics=False)
    assert math.isnan(op(batches()[0]).item())


def test_lr_scheduler_is_stepped_each_step(problem):
    sched = torch.optim.lr_scheduler.StepLR(problem.optimizer, step_size=2, gamma=0.1)
    op = create_train_op(problem.loss, problem.optimizer, lr_scheduler=sched)
    for b in batches()[:4]:
        op(b)
    assert problem.optimizer.param_groups[0]["lr"] == pytest.approx(0.5 * 0.01)


def test_loss_must_be_a_scalar_tensor_that_requires_grad(problem):
    with pytest.raises(TypeError, match=r"scalar tensor, got a tensor of shape \(16, 1\)"):
        create_train_op(lambda b: problem.model(b[0]), problem.optimizer)(batches()[0])
    with pytest.raises(ValueError, match="does not depend on any parameter"):
        create_train_op(lambda b: problem.model(b[0]).detach().mean(), problem.optimizer)(batches()[0])


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"clip_gradient_norm": -1.0}, ValueError, "clip_gradient_norm"),
        ({"clip_gradient_norm": "1"}, TypeError, "clip_gradient_norm"),
        ({"check_numerics": "yes"}, TypeError, "check_numerics"),
        ({"transform_grads_fn": 3}, TypeError, "transform_grads_fn"),
        ({"global_step": 5}, TypeError, "global_step"),
        ({"update_ops": [1]}, TypeError, r"update_ops\[0\]"),
        ({"update_ops": "op"}, TypeError, "update_ops"),
        ({"lr_scheduler": object()}, TypeError, "lr_scheduler"),
        ({"model": "net"}, TypeError, "`model`"),
    ],
)
def test_create_train_op_rejects_bad_arguments(problem, kwargs, error, match):
    with pytest.raises(error, match=match):
        create_train_op(problem.loss, problem.optimizer, **kwargs)


def test_create_train_op_rejects_bad_loss_and_optimizer(problem):
    with pytest.raises(TypeError, match="total_loss"):
        create_train_op(3, problem.optimizer)
    with pytest.raises(TypeError, match="optimizer"):
        create_train_op(problem.loss, problem.model.parameters())


def test_losses_do_not_leak_between_steps(problem):
    totals = []

    def loss_fn(batch):
        losses.sigmoid_cross_entropy(problem.model(batch[0]).squeeze(1), batch[1])
        totals.append(len(losses.get_losses()))
        return losses.get_total_loss()

    op = create_train_op(loss_fn, problem.optimizer)
    for b in batches()[:3]:
        op(b)
    assert totals == [1, 1, 1]


# ---------------------------------------------------------------- train


def test_train_reaches_the_target_and_writes_a_final_checkpoint(problem, tmp_path, info_logs):
    op = create_train_op(problem.loss, problem.optimizer)
    loss = train(op, tmp_path, batches(), number_of_steps=30, log_every_n_steps=10)
    assert isinstance(loss, float) and loss < 0.3
    assert op.step == 30
    assert [os.path.basename(p) for p in checkpoint.list_checkpoints(tmp_path)] == ["model.ckpt-30"]
    assert checkpoint.read_metadata(tmp_path / "model.ckpt-30")["final"] is True
    lines = [r.getMessage() for r in info_logs.records if r.getMessage().startswith("global step")]
    assert [line.split(":")[0] for line in lines] == ["global step 10", "global step 20", "global step 30"]
    assert all(" sec/step)" in line and "loss = " in line for line in lines)


@pytest.mark.parametrize("target", [300, 301, 305])
def test_resume_ends_at_exactly_the_target(tmp_path, target):
    p = Logistic()
    train(create_train_op(p.loss, p.optimizer), tmp_path, batches(), number_of_steps=300)
    p = Logistic(seed=9)  # a fresh process: new model, new optimizer
    op = create_train_op(p.loss, p.optimizer)
    loss = train(op, tmp_path, batches(), number_of_steps=target)
    assert op.step == target
    assert checkpoint.step_of(checkpoint.latest_checkpoint(tmp_path)) == target
    assert (loss is None) == (target == 300)


def test_resume_achieves_roughly_the_same_loss(tmp_path):
    p = Logistic()
    first = train(create_train_op(p.loss, p.optimizer), tmp_path, batches(), number_of_steps=100)
    p = Logistic(seed=5)
    second = train(create_train_op(p.loss, p.optimizer), tmp_path, batches(), number_of_steps=110)
    assert second < first * 1.5 and second < 0.2


def test_init_fn_runs_on_a_fresh_start_only(problem, tmp_path):
    calls = []
    op = create_train_op(problem.loss, problem.optimizer)
    train(op, tmp_path, batches(), number_of_steps=5, init_fn=lambda train_op: calls.append(train_op))
    assert calls == [op]
    p = Logistic()
    train(create_train_op(p.loss, p.optimizer), tmp_path, batches(), number_of_steps=8, init_fn=calls.append)
    assert calls == [op]


def test_warm_start_from_another_logdir(tmp_path):
    source = Logistic(seed=1)
    train(create_train_op(source.loss, source.optimizer), tmp_path / "a", batches(), number_of_steps=50)
    trained_weight = source.model.weight.detach().clone()
    p = Logistic(seed=2)
    op = create_train_op(p.loss, p.optimizer)
    init_fn = variables.assign_from_checkpoint_fn(tmp_path / "a", variables.get_variables_to_restore(p.model, exclude=["bias"]))
    train(op, tmp_path / "b", batches(), number_of_steps=1, init_fn=init_fn, save_interval_secs=None)
    restored = checkpoint.load(checkpoint.latest_checkpoint(tmp_path / "b"))
    # One step after the warm start: the weight began from the other run's value.
    assert torch.allclose(restored["model"]["weight"], trained_weight, atol=0.5)
    assert not torch.allclose(Logistic(seed=2).model.weight, trained_weight, atol=0.5)


def test_data_that_runs_out_stops_with_a_final_checkpoint(problem, tmp_path):
    data = iter(batches(7))
    op = create_train_op(problem.loss, problem.optimizer)
    loss = train(op, tmp_path, data, number_of_steps=100)
    assert op.step == 7 and loss is not None
    assert checkpoint.step_of(checkpoint.latest_checkpoint(tmp_path)) == 7


def test_reiterable_data_runs_several_epochs(problem, tmp_path):
    op = create_train_op(problem.loss, problem.optimizer)
    train(op, tmp_path, batches(3), number_of_steps=10)
    assert op.step == 10
    state = checkpoint.load(checkpoint.latest_checkpoint(tmp_path))
    assert (state["data"]["epoch"], state["data"]["batch"]) == (3, 1)


@pytest.mark.parametrize("data", ["list", "drop_last"])
def test_data_that_yields_no_batch_is_an_error_and_writes_nothing(problem, tmp_path, data):
    # An evaluator waiting for the end would otherwise score untrained weights marked final.
    if data == "list":
        data = []
    else:
        inputs, labels = batches(1, 10)[0]
        data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(inputs, labels), batch_size=32,
                                           drop_last=True)
    op = create_train_op(problem.loss, problem.optimizer)
    with pytest.raises(ValueError, match="`data` yielded no batch"):
        train(op, tmp_path, data, number_of_steps=10)
    assert op.step == 0 and checkpoint.list_checkpoints(tmp_path) == []


def test_logdir_none_trains_without_writing(problem, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    op = create_train_op(problem.loss, problem.optimizer)
    assert train(op, None, batches(), number_of_steps=12) is not None
    assert op.step == 12 and os.listdir(tmp_path) == []


def test_logdir_none_rejects_checkpoint_arguments(problem):
    op = create_train_op(problem.loss, problem.optimizer)
    with pytest.raises(ValueError, match="saver.*logdir=None"):
        train(op, None, batches(), number_of_steps=2, saver=checkpoint.Saver())
    with pytest.raises(ValueError, match="save_interval_steps.*logdir=None"):
        train(op, None, batches(), number_of_steps=2, save_interval_steps=1)


def test_save_interval_steps_saves_on_multiples(problem, tmp_path):
    op = create_train_op(problem.loss, problem.optimizer)
    train(op, tmp_path, batches(), number_of_steps=25, save_interval_steps=10, saver=checkpoint.Saver(max_to_keep=None))
    assert [checkpoint.step_of(p) for p in checkpoint.list_checkpoints(tmp_path)] == [10, 20, 25]
    assert [checkpoint.read_metadata(p)["final"] for p in checkpoint.list_checkpoints(tmp_path)] == [False, False, True]


def test_custom_train_step_fn_and_kwargs(problem, tmp_path):
    seen = []

    def step_fn(train_op, batch, kwargs):
        seen.append(kwargs["note"])
        loss = train_op(batch)
        return loss, train_op.step >= kwargs["stop_at"]

    op = create_train_op(problem.loss, problem.optimizer)
    train(op, tmp_path, batches(), train_step_fn=step_fn, train_step_kwargs={"note": "x", "stop_at": 4})
    assert op.step == 4 and seen == ["x"] * 4


def test_nan_during_training_raises_and_commits_nothing_after_it(tmp_path):
    p = Logistic()

    def loss_fn(batch):
        loss = p.loss(batch)
        return loss * float("nan") if op.step == 7 else loss

    op = create_train_op(loss_fn, p.optimizer)
    with pytest.raises(NonFiniteError, match="global step 7"):
        train(op, tmp_path, batches(), number_of_steps=20, save_interval_steps=5)
    assert [checkpoint.step_of(c) for c in checkpoint.list_checkpoints(tmp_path)] == [5]


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"number_of_steps": 0}, ValueError, "number_of_steps"),
        ({"number_of_steps": -3}, ValueError, "number_of_steps"),
        ({"number_of_steps": 2.5}, TypeError, "number_of_steps"),
        ({"log_every_n_steps": 0}, ValueError, "log_every_n_steps"),
        ({"save_interval_secs": -1}, ValueError, "save_interval_secs"),
        ({"save_interval_steps": 0}, ValueError, "save_interval_steps"),
        ({"saver": "saver"}, TypeError, "saver"),
        ({"init_fn": 3}, TypeError, "init_fn"),
        ({"init_fn": lambda a, b: None}, TypeError, "init_fn"),
        ({"train_step_fn": None}, TypeError, "train_step_fn"),
        ({"progress_bar": "yes"}, TypeError, "progress_bar"),
        ({"data": 5}, TypeError, "data"),
        ({"prefetch": 0}, ValueError, "prefetch"),
        ({"prefetch": "yes"}, TypeError, "prefetch"),
    ],
)
def test_train_rejects_bad_arguments_before_writing_anything(problem, tmp_path, kwargs, error, match):
    op = create_train_op(problem.loss, problem.optimizer)
    kwargs = {"data": batches(), **kwargs}
    with pytest.raises(error, match=match):
        train(op, tmp_path / "run", **kwargs)
    assert not (tmp_path / "run").exists()
    assert op.step == 0


def test_train_rejects_a_non_train_op_and_an_uncounted_op(problem, tmp_path):
    with pytest.raises(TypeError, match="train_op"):
        train(problem.loss, tmp_path)
    op = create_train_op(problem.loss, problem.optimizer, global_step=None)
    with pytest.raises(ValueError, match="global_step=None"):
        train(op, tmp_path, batches())


def test_progress_bar_shows_steps(problem, tmp_path, capsys):
    op = create_train_op(problem.loss, problem.optimizer)
    train(op, tmp_path, batches(), number_of_steps=20, progress_bar=True)
    err = capsys.readouterr().err
    assert "20/20" in err and "step/s" in err and "loss=" in err


def test_gradients_helpers_are_reexported():
    assert learning.clip_gradient_norms is gradients.clip_gradient_norms
    assert learning.multiply_gradients is gradients.multiply_gradients
    assert learning.clip_gradient_norms_fn is gradients.clip_gradient_norms_fn


# ---------------------------------------------------------------- prefetching


def test_prefetch_keeps_the_data_position_of_the_batches_taken(problem, tmp_path):
    before = set(threading.enumerate())
    op = create_train_op(problem.loss, problem.optimizer)
    train(op, tmp_path, batches(8), number_of_steps=11, prefetch=5)
    state = checkpoint.load(checkpoint.latest_checkpoint(tmp_path))
    assert (state["data"]["epoch"], state["data"]["batch"]) == (1, 3)  # not the 5 batches drawn ahead
    assert set(threading.enumerate()) == before


def test_prefetched_data_that_runs_out_stops_cleanly(problem, tmp_path):
    before = set(threading.enumerate())
    op = create_train_op(problem.loss, problem.optimizer)
    train(op, tmp_path, iter(batches(7)), number_of_steps=100, prefetch=True)
    assert op.step == 7 and checkpoint.step_of(checkpoint.latest_checkpoint(tmp_path)) == 7
    assert set(threading.enumerate()) == before


def test_an_error_in_prefetched_data_reaches_train_and_leaves_no_thread(problem, tmp_path):
    def broken():
        yield from batches(3)
        raise OSError("disk gone")

    before = set(threading.enumerate())
    op = create_train_op(problem.loss, problem.optimizer)
    with pytest.raises(OSError, match="disk gone"):
        train(op, tmp_path, broken(), number_of_steps=100, prefetch=2, save_interval_steps=2)
    assert op.step == 3
    assert [checkpoint.step_of(p) for p in checkpoint.list_checkpoints(tmp_path)] == [2]
    assert set(threading.enumerate()) == before


def test_deferred_numerics_check_reads_nothing_per_step_and_reports_at_the_flush(problem, monkeypatch):
    # The accelerator path (the loss is checked on the device, read at log/save points), run on the CPU.
    nan_at = 3

    def loss_fn(batch):
        loss = problem.loss(batch)
        return loss * float("nan") if op.step == nan_at else loss

    op = create_train_op(loss_fn, problem.optimizer)
    op(batches()[0])
    op._sync_numerics = False
    reads = []
    real_item = torch.Tensor.item
    monkeypatch.setattr(torch.Tensor, "item", lambda self: reads.append(1) or real_item(self))
    for b in batches()[1:6]:
        op(b)
    assert reads == [] and op.step == 6
    with pytest.raises(NonFiniteError, match=r"NaN or Inf at some global step in \[1, 6\]"):
        op.flush_numerics_check()


def test_a_logdir_that_is_a_file_is_refused_before_anything_is_made(problem, tmp_path):
    afile = tmp_path / "notes.txt"
    afile.write_text("mine")
    op = create_train_op(problem.loss, problem.optimizer)
    for logdir in (afile, afile / "run"):
        with pytest.raises(ValueError, match=r"`logdir` .*notes\.txt.* it must be a directory"):
            train(op, logdir, batches(), number_of_steps=3)
    assert afile.read_text() == "mine" and sorted(os.listdir(tmp_path)) == ["notes.txt"]


def test_an_optimizer_of_another_model_is_named_as_such(problem):
    other = torch.nn.Linear(4, 1)
    with pytest.raises(ValueError, match="the optimizer's parameters are not those of the modules the loss function"):
        create_train_op(problem.loss, torch.optim.SGD(other.parameters(), lr=0.1))
    with pytest.raises(ValueError, match="the optimizer's parameters are not the model's"):
        create_train_op(problem.loss, torch.optim.SGD(other.parameters(), lr=0.1), model=problem.model)


def test_resuming_with_another_optimizer_or_hyperparameters_says_so(problem, tmp_path, caplog):
    train(create_train_op(problem.loss, problem.optimizer), tmp_path, batches(), number_of_steps=4)
    adam = torch.optim.Adam(problem.model.parameters(), lr=0.01)
    with pytest.raises(ValueError, match=r"holds the state of a torch\.optim\.sgd\.SGD; this run's optimizer is a "
                                         r"torch\.optim\.adam\.Adam"):
        train(create_train_op(problem.loss, adam), tmp_path, batches(), number_of_steps=8)
    # Same optimizer, another learning rate in code: the checkpoint's is restored, and the log says which differ.
    caplog.set_level("WARNING", logger="torchslim")
    faster = torch.optim.SGD(problem.model.parameters(), lr=0.05, momentum=0.9)
    train(create_train_op(problem.loss, faster), tmp_path, batches(), number_of_steps=8)
    assert "group 0 lr: checkpoint 0.5, this run 0.05" in caplog.text
    assert faster.param_groups[0]["lr"] == 0.5


def test_a_scheduled_learning_rate_is_no_difference_on_resume(problem, tmp_path, caplog):
    def run(steps):
        p = Logistic()
        scheduler = torch.optim.lr_scheduler.ExponentialLR(p.optimizer, gamma=0.9)
        train(create_train_op(p.loss, p.optimizer, lr_scheduler=scheduler), tmp_path, batches(), number_of_steps=steps)

    run(4)
    caplog.set_level("WARNING", logger="torchslim")
    run(8)
    assert "hyperparameters differ" not in caplog.text


def test_a_checkpoint_from_before_the_optimizer_type_was_recorded_is_still_checked(problem):
    state = create_train_op(problem.loss, problem.optimizer).state_dict()
    del state["optimizer_class"]  # as written by torchslim 0.1.0
    adam_op = create_train_op(problem.loss, torch.optim.Adam(problem.model.parameters()))
    with pytest.raises(ValueError, match=r"hyperparameters \[.*'momentum'.*\]; this run's torch\.optim\.adam\.Adam"):
        adam_op.load_state_dict(state)
    two_groups = torch.optim.SGD([{"params": [problem.model.weight]}, {"params": [problem.model.bias]}], lr=0.5,
                                 momentum=0.9)
    with pytest.raises(ValueError, match=r"param groups of \[2\] parameters; this run's has groups of \[1, 1\]"):
        create_train_op(problem.loss, two_groups).load_state_dict(state)


def test_each_checkpoint_is_reported_once(problem, tmp_path, info_logs):
    train(create_train_op(problem.loss, problem.optimizer), tmp_path, batches(), number_of_steps=8,
          save_interval_steps=4)
    saved = [r.getMessage() for r in info_logs.records if r.getMessage().startswith("Saved ")]
    assert [m.split()[1].rsplit("-", 1)[1] for m in saved] == ["4", "8"]
    assert any(r.getMessage().startswith("Marked ") and r.getMessage().endswith("model.ckpt-8 as the final checkpoint "
                                                                                "of the run") for r in info_logs.records)


def test_an_epoch_scheduler_steps_at_epoch_starts_and_resumes_exactly(tmp_path):
    data = batches(4)  # 4 batches per epoch

    def make():
        p = Logistic()
        scheduler = torch.optim.lr_scheduler.StepLR(p.optimizer, step_size=1, gamma=0.5)
        return p, scheduler

    # By hand: for epoch in ...: (steps); scheduler.step()
    p, scheduler = make()
    lrs = []
    for _ in range(3):
        for batch in data:
            lrs.append(p.optimizer.param_groups[0]["lr"])
            p.optimizer.zero_grad()
            with losses.collect_losses():
                p.loss(batch).backward()
            p.optimizer.step()
        scheduler.step()
    assert lrs == [0.5] * 4 + [0.25] * 4 + [0.125] * 4
    expected = p.model.weight.detach().clone()

    seen = []
    q, scheduler = make()
    op = create_train_op(lambda b: seen.append(q.optimizer.param_groups[0]["lr"]) or q.loss(b), q.optimizer,
                         model=q.model, lr_scheduler=scheduler, lr_scheduler_interval="epoch")
    train(op, tmp_path / "once", data, number_of_steps=12)
    assert seen == lrs and torch.equal(q.model.weight, expected)

    for target in (6, 12):  # 6 + 6, stopped mid-epoch: the same weights and learning rates
        r, scheduler = make()
        op = create_train_op(r.loss, r.optimizer, lr_scheduler=scheduler, lr_scheduler_interval="epoch")
        train(op, tmp_path / "twice", data, number_of_steps=target)
    assert torch.equal(r.model.weight, expected) and scheduler.last_epoch == 2


def test_an_epoch_scheduler_needs_epochs(problem, tmp_path):
    scheduler = torch.optim.lr_scheduler.StepLR(problem.optimizer, step_size=1)
    with pytest.raises(ValueError, match="lr_scheduler_interval"):
        create_train_op(problem.loss, problem.optimizer, lr_scheduler=scheduler, lr_scheduler_interval="epochs")
    op = create_train_op(lambda: problem.loss(batches()[0]), problem.optimizer, model=problem.model,
                         lr_scheduler=scheduler, lr_scheduler_interval="epoch")
    with pytest.raises(ValueError, match="needs `data`"):
        train(op, tmp_path, None, number_of_steps=3)
