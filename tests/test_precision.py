"""create_train_op's precision and accumulate_steps: mixed precision, loss scaling, gradient accumulation."""

from __future__ import annotations

import contextlib
import json
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import Logistic, batches
from torch.utils.data import DataLoader, TensorDataset

from torchslim import checkpoint, learning
from torchslim._cpumemory import keep_freed_memory, should_keep
from torchslim.learning import NonFiniteError, create_train_op, train

pytestmark = pytest.mark.filterwarnings("ignore:precision=.*no native")  # this CPU may emulate bf16/fp16


def mlp(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 3))


def classification(n: int = 64 * 20, seed: int = 1) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    inputs = torch.randn(n, 8, generator=g)
    return TensorDataset(inputs, (inputs @ torch.randn(8, 3, generator=g)).argmax(1))  # learnable labels


# ---------------------------------------------------------------- mixed precision


@pytest.mark.parametrize("precision, dtype", [
    pytest.param("bf16", torch.bfloat16, marks=pytest.mark.slow),  # seconds a step where the CPU emulates bf16
    ("fp16", torch.float16)])
def test_the_loss_function_runs_under_autocast_and_the_weights_stay_fp32(precision, dtype):
    model = mlp()
    seen = []

    def loss_fn(batch):
        logits = model(batch[0])
        seen.append(logits.dtype)
        return F.cross_entropy(logits, batch[1])

    op = create_train_op(loss_fn, torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.9), precision=precision)
    data = list(DataLoader(classification(), batch_size=64))[:8]  # few steps: bf16 may be emulated on this CPU
    first = float(op(data[0]))
    for batch in data[1:]:
        last = float(op(batch))
    assert seen[0] == dtype and op.step == 8
    assert last < first * 0.7
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_fp32_is_the_default_and_runs_as_written():
    model = mlp()
    seen = []
    op = create_train_op(lambda b: seen.append(model(b[0]).dtype) or F.cross_entropy(model(b[0]), b[1]),
                         torch.optim.SGD(model.parameters(), lr=0.1))
    op(next(iter(DataLoader(classification(), batch_size=8))))
    assert seen == [torch.float32] and repr(op.precision) == "fp32" and "precision" not in op.state_dict()


def test_fp16_gradients_are_unscaled_before_transforms_see_them():
    data = next(iter(DataLoader(classification(), batch_size=64)))
    seen = {}

    def record(name):
        def transform(grads_and_vars):
            seen[name] = [g.clone() for g, _ in grads_and_vars]
            return grads_and_vars
        return transform

    for precision in ("fp32", "fp16"):
        model = mlp()
        op = create_train_op(lambda b, m=model: F.cross_entropy(m(b[0]), b[1]),
                             torch.optim.SGD(model.parameters(), lr=0.1), precision=precision,
                             transform_grads_fn=record(precision), model=model)
        op(data)
    assert op.precision.scaler.get_scale() > 1000  # the loss really was scaled
    for g32, g16 in zip(seen["fp32"], seen["fp16"]):
        torch.testing.assert_close(g16, g32, atol=2e-3, rtol=2e-2)  # true values, not scaled by 65536


class Overflow:
    """A gradient hook that makes one update's gradient Inf, as an fp16 overflow would."""

    def __init__(self, param: torch.Tensor, at_call: int) -> None:
        self.calls, self.at_call = 0, at_call
        param.register_hook(self)

    def __call__(self, grad: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return grad * math.inf if self.calls == self.at_call else grad


def test_an_fp16_update_with_inf_gradients_is_skipped_counted_logged_and_summarized(tmp_path, info_logs):
    model = mlp()
    Overflow(model[0].weight, at_call=4)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    op = create_train_op(lambda b: F.cross_entropy(model(b[0]), b[1]), optimizer, precision="fp16",
                         lr_scheduler=scheduler)
    loader = DataLoader(classification(), batch_size=64)
    train(op, tmp_path, loader, number_of_steps=6, save_summaries_steps=1, progress_bar=False)
    assert op.step == 6  # 7 batches taken: the 4th update was skipped and not counted
    assert scheduler.last_epoch == 6 and op.precision.skipped_updates == 1
    assert op.precision.scaler.get_scale() == 65536.0 / 2
    assert "the fp16 loss scaler skipped this update" in info_logs.text
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    skipped = {r["step"]: r["value"] for r in rows if r["tag"] == "skipped_updates"}
    assert skipped[3] == 0 and skipped[6] == 1
    state = checkpoint.load(checkpoint.latest_checkpoint(tmp_path))
    assert state["precision"]["skipped_updates"] == 1 and state["precision"]["scaler"]["scale"] == 32768.0


def test_the_loss_scaler_is_restored_on_resume(tmp_path):
    def run(steps):
        model = mlp()
        op = create_train_op(lambda b: F.cross_entropy(model(b[0]), b[1]),
                             torch.optim.SGD(model.parameters(), lr=0.1), precision="fp16")
        op.precision.scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=3)
        train(op, tmp_path, DataLoader(classification(), batch_size=64), number_of_steps=steps, progress_bar=False)
        return op

    assert run(4).precision.scaler.get_scale() == 2048.0  # grew once, after 3 good updates
    resumed = run(7)
    assert resumed.precision.scaler.get_scale() == 4096.0  # 2048 restored, then 3 more good updates


def test_check_numerics_still_catches_a_nan_loss_under_fp16():
    model = mlp()
    op = create_train_op(lambda b: F.cross_entropy(model(b[0]), b[1]) * math.nan,
                         torch.optim.SGD(model.parameters(), lr=0.1), precision="fp16")
    with pytest.raises(NonFiniteError, match="the loss is nan"):
        op(next(iter(DataLoader(classification(), batch_size=8))))


# ---------------------------------------------------------------- gradient accumulation


def train_weights(batch_size: int, k: int, updates: int = 20) -> tuple[dict, learning.TrainOp]:
    model = mlp()
    op = create_train_op(lambda b: F.cross_entropy(model(b[0]), b[1]),
                         torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9), accumulate_steps=k)
    loader = DataLoader(classification(), batch_size=batch_size)
    train(op, None, loader, number_of_steps=updates, progress_bar=False)
    return {n: p.detach().clone() for n, p in model.named_parameters()}, op


def test_k_batches_of_b_make_the_update_one_batch_of_k_times_b_makes():
    torch.use_deterministic_algorithms(True)
    try:
        accumulated, op = train_weights(16, 4)
        whole, _ = train_weights(64, 1)
        single, _ = train_weights(16, 1)
    finally:
        torch.use_deterministic_algorithms(False)
    assert op.step == 20
    for name in whole:
        torch.testing.assert_close(accumulated[name], whole[name], rtol=1e-5, atol=1e-6)
    assert any(not torch.allclose(single[n], whole[n]) for n in whole)  # the test can tell them apart


def test_an_update_reports_the_mean_loss_of_its_micro_batches():
    problem = Logistic()
    seen = []

    def loss_fn(batch):
        loss = problem.loss(batch)
        seen.append(loss.detach())
        return loss

    op = create_train_op(loss_fn, problem.optimizer, accumulate_steps=3)
    results = [op.run(b) for b in batches(3)]
    assert [r.applied for r in results] == [False, False, True] and op.step == 1
    torch.testing.assert_close(results[-1].loss, sum(seen) / 3)


class RecordingSync:
    """A GradientSync that records what a run over several processes would communicate."""

    def __init__(self) -> None:
        self.events: list[str] = []

    @contextlib.contextmanager
    def no_sync(self):
        self.events.append("no_sync")
        yield

    def synchronize(self) -> None:
        self.events.append("synchronize")


def test_gradients_are_synchronized_once_per_update_not_per_micro_batch():
    problem = Logistic()
    op = create_train_op(problem.loss, problem.optimizer, accumulate_steps=4)
    sync = RecordingSync()
    with op.synchronized(sync):
        for batch in batches(8):
            op(batch)
    assert sync.events == ["no_sync"] * 3 + ["synchronize"] + ["no_sync"] * 3 + ["synchronize"]
    assert op.step == 2


def test_epochs_and_the_data_position_count_batches(tmp_path):
    problem = Logistic()
    op = create_train_op(problem.loss, problem.optimizer, accumulate_steps=4)
    loader = DataLoader(TensorDataset(*[torch.cat(t) for t in zip(*batches(8))]), batch_size=16)  # 8 batches
    train(op, tmp_path, loader, number_of_steps=3, progress_bar=False)
    state = checkpoint.load(checkpoint.latest_checkpoint(tmp_path))
    assert state["global_step"] == 3 and (state["data"]["epoch"], state["data"]["batch"]) == (1, 4)


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize("kwargs, error, match", [
    ({"precision": "fp8"}, ValueError, r"`precision` must be one of 'fp32', 'bf16', 'fp16', got 'fp8'"),
    ({"precision": torch.float16}, ValueError, r"`precision` must be one of .* got torch.float16"),
    ({"accumulate_steps": 0}, ValueError, r"`accumulate_steps` must be positive, got 0"),
    ({"accumulate_steps": 2.0}, TypeError, r"`accumulate_steps` must be a positive int, got 2.0"),
    ({"accumulate_steps": True}, TypeError, r"`accumulate_steps` must be a positive int, got True"),
])
def test_bad_precision_and_accumulation_are_refused(kwargs, error, match):
    problem = Logistic()
    with pytest.raises(error, match=match):
        create_train_op(problem.loss, problem.optimizer, **kwargs)


def test_a_precision_the_device_cannot_run_is_refused_naming_it():
    model = torch.nn.Linear(2, 1, device="meta")  # autocast has no meta backend
    with pytest.raises(ValueError, match=r"`precision`='fp16' cannot run on the model's device \(meta\)"):
        create_train_op(lambda: model(torch.ones(1, 2, device="meta")).sum(),
                        torch.optim.SGD(model.parameters(), lr=0.1), precision="fp16")


# ---------------------------------------------------------------- CPU memory


class FakeLibc:
    """Records the allocator calls instead of making them."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def mallopt(self, param: int, value: int) -> int:
        self.calls.append(("mallopt", param, value))
        return 1

    def malloc_trim(self, pad: int) -> int:
        self.calls.append(("malloc_trim", pad))
        return 1


def test_freed_memory_is_kept_while_train_runs_a_cpu_model_and_released_after(monkeypatch):
    from torchslim import _cpumemory as cm

    for var in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES", cm.OPT_OUT):
        monkeypatch.delenv(var, raising=False)
    libc = FakeLibc()
    monkeypatch.setattr(cm, "_glibc", lambda: libc)
    problem = Logistic()
    during = []
    op = create_train_op(lambda b: during.append(len(libc.calls)) or problem.loss(b), problem.optimizer)
    train(op, None, batches(2), number_of_steps=2, progress_bar=False)
    kept = [("mallopt", cm.M_MMAP_THRESHOLD, cm.KEEP_MMAP_BELOW), ("mallopt", cm.M_TRIM_THRESHOLD, cm.KEEP_HEAP_TOP)]
    released = [("mallopt", cm.M_MMAP_THRESHOLD, cm.GLIBC_INITIAL), ("mallopt", cm.M_TRIM_THRESHOLD, cm.GLIBC_INITIAL),
                ("malloc_trim", 0)]
    assert during == [2, 2] and libc.calls == kept + released
    with keep_freed_memory(), keep_freed_memory():  # nested runs: set once, released by the last
        assert libc.calls[5:] == kept
    assert libc.calls[5:] == kept + released


@pytest.mark.skipif(not should_keep(), reason="not glibc, or the allocator is set from the environment")
def test_the_real_allocator_accepts_the_settings():
    from torchslim import _cpumemory as cm

    libc = cm._glibc()
    assert libc.mallopt(cm.M_MMAP_THRESHOLD, cm.KEEP_MMAP_BELOW) == 1  # glibc refuses a threshold above its limit
    assert libc.mallopt(cm.M_TRIM_THRESHOLD, cm.KEEP_HEAP_TOP) == 1
    assert libc.mallopt(cm.M_MMAP_THRESHOLD, cm.GLIBC_INITIAL) == 1 and libc.mallopt(cm.M_TRIM_THRESHOLD, cm.GLIBC_INITIAL) == 1


def test_the_opt_out_leaves_the_allocator_alone(monkeypatch):
    monkeypatch.setenv("TORCHSLIM_KEEP_FREED_MEMORY", "0")
    with keep_freed_memory() as kept:
        assert not kept
    monkeypatch.delenv("TORCHSLIM_KEEP_FREED_MEMORY")
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "1000000")  # the user's own setting stands
    with keep_freed_memory() as kept:
        assert not kept



# ---------------------------------------------------------------- compile


def dropout_mlp(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Dropout(0.2), torch.nn.Linear(32, 3))


def compiled_run(logdir, steps: int, compile: bool = True) -> tuple[dict, learning.TrainOp]:
    model = dropout_mlp()
    op = create_train_op(lambda b: F.cross_entropy(model(b[0]), b[1]),
                         torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9), compile=compile)
    loader = DataLoader(classification(64 * 8), batch_size=64, shuffle=True, drop_last=True)
    train(op, logdir, loader, number_of_steps=steps, save_interval_steps=5, progress_bar=False)
    return {n: p.detach().clone() for n, p in model.named_parameters()}, op


@pytest.mark.slow
def test_compiled_steps_train_resume_exactly_and_log_the_compile_time_once(tmp_path, info_logs):
    torch.manual_seed(5)
    once, op = compiled_run(tmp_path / "once", 20)
    assert info_logs.text.count("compile: the first step took") == 1 and op.step == 20
    assert "_orig_mod" not in "".join(op.model_variables())  # checkpoint names stay the model's own
    torch.manual_seed(5)
    compiled_run(tmp_path / "twice", 10)
    torch.manual_seed(77)  # a new process would start elsewhere: the checkpoint's RNG states must be restored
    twice, _ = compiled_run(tmp_path / "twice", 20)
    for name in once:
        assert torch.equal(once[name], twice[name]), name
    torch.manual_seed(5)
    eager, _ = compiled_run(tmp_path / "eager", 20, compile=False)
    for name in once:  # the same training as eager, up to the compiled kernels' rounding and dropout draws
        assert torch.isfinite(once[name]).all() and once[name].shape == eager[name].shape


class DataDependent(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if float(x.sum()) > 0:  # a host read: no full graph can hold it
            return self.linear(x)
        return -self.linear(x)


@pytest.mark.slow
def test_a_model_that_cannot_be_compiled_raises_with_the_compilers_message(tmp_path):
    model = DataDependent()
    op = create_train_op(lambda b: F.cross_entropy(model(b[0]), b[1]), torch.optim.SGD(model.parameters(), lr=0.1),
                         compile=True)
    with pytest.raises(ValueError, match=r"`compile`=True: torch.compile\(fullgraph=True\) cannot compile the model "
                                         r"\(model\): .*data-dependent.+Pass compile=False"):
        train(op, tmp_path, DataLoader(classification(64), batch_size=16), number_of_steps=2, progress_bar=False)
    assert checkpoint.latest_checkpoint(tmp_path) is None


def test_compile_must_be_a_bool():
    problem = Logistic()
    with pytest.raises(TypeError, match="`compile` must be"):
        create_train_op(problem.loss, problem.optimizer, compile="yes")


def test_resuming_with_another_number_of_micro_batches_per_update_warns_how_to_keep_the_run(tmp_path, caplog):
    def run(k: int, target: int) -> None:
        model = mlp()
        op = create_train_op(lambda b: F.cross_entropy(model(b[0]), b[1]),
                             torch.optim.SGD(model.parameters(), lr=0.2), accumulate_steps=k)
        train(op, tmp_path, DataLoader(classification(), batch_size=16), number_of_steps=target, progress_bar=False)

    run(2, 3)
    assert checkpoint.load(checkpoint.latest_checkpoint(tmp_path))["run"] == {"processes": 1, "accumulate_steps": 2}
    with caplog.at_level("WARNING", logger="torchslim"):
        run(2, 4)  # the same: nothing to say
    assert "micro-batch" not in caplog.text
    with caplog.at_level("WARNING", logger="torchslim"):
        run(1, 5)
    assert ("model.ckpt-4 was written by 1 process(es) x 2 micro-batch(es) per update, this run has 1 x 1: each "
            "update now takes 1 batch(es) instead of 2") in caplog.text
    assert "keep processes x accumulate_steps = 2 (e.g. accumulate_steps=2)" in caplog.text
