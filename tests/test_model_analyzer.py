"""model_analyzer: the original's formats, counts against hand counts and
FlopCounterMode, and a model left exactly as it was found."""

from __future__ import annotations

import textwrap

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from torchslim import cli
from torchslim.model_analyzer import (
    analyze_ops,
    analyze_vars,
    profile_ops,
    tensor_description,
)

# --------------------------------------------------------------------- models written for the tests


def mlp() -> nn.Module:
    # params: 10*20 + 20 + 20*5 + 5 = 325
    return nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 5))


def small_cnn() -> nn.Module:
    # params: conv 3*8*9 + 8 = 224, bn 8 + 8 = 16, fc 128*10 + 10 = 1290 -> 1530
    # buffers: running_mean 8, running_var 8, num_batches_tracked 1 (int64)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(inplace=True),
        nn.MaxPool2d(2), nn.Flatten(), nn.Linear(8 * 4 * 4, 10),
    )


class Residual(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + x)


class TinyResNet(nn.Module):
    # params: stem 3*4*9 = 108 (no bias), 2 blocks * (2 * 4*4*9 + 2 * 8) = 2 * 304, fc 4*3 + 3 = 15 -> 731
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.blocks = nn.Sequential(Residual(4), Residual(4))
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.blocks(self.stem(x)).mean(dim=(2, 3)))


class Branchy(nn.Module):
    """Takes `pos` when the input sums positive, else `neg`: only one runs."""

    def __init__(self) -> None:
        super().__init__()
        self.pos, self.neg = nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pos(x) if x.sum() > 0 else self.neg(x)


class Twice(nn.Module):
    """One Linear called twice, plus functional and in-place ops in its own forward."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.sigmoid(self.fc(x))
        y.add_(1.0)
        return F.relu(self.fc(y))


def flop_counter_total(model: nn.Module, *args: torch.Tensor) -> int:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(*args)
    return counter.get_total_flops()


MODELS = {
    "mlp": (mlp, (2, 10), 325),
    "cnn": (small_cnn, (2, 3, 8, 8), 1530),
    "resnet": (TinyResNet, (2, 3, 8, 8), 731),
    "branchy": (Branchy, (3, 4), 20 + 10),
    "twice": (Twice, (3, 4), 20),
}


# --------------------------------------------------------------------- tensor_description, analyze_vars


@pytest.mark.parametrize(
    "t, expected",
    [
        (torch.zeros(1, 8, 8, 1024), "(float32 1x8x8x1024)"),
        (torch.zeros(3, dtype=torch.int64), "(int64 3)"),
        (torch.zeros(2, 0, dtype=torch.bool), "(bool 2x0)"),
        (torch.tensor(1.0, dtype=torch.float16), "(float16 )"),
    ],
)
def test_tensor_description_gives_dtype_and_dims(t, expected):
    assert tensor_description(t) == expected


def test_tensor_description_rejects_a_non_tensor():
    with pytest.raises(TypeError, match=r"takes a torch.Tensor, got list: \[1, 2\]"):
        tensor_description([1, 2])


def test_analyze_vars_prints_the_original_lines_and_tells_kinds_apart(capsys):
    model = small_cnn()
    model[0].bias.requires_grad_(False)
    assert analyze_vars(model, print_info=True, include_buffers=True) == (1530 + 17, 1530 * 4 + 16 * 4 + 8)
    assert capsys.readouterr().out == textwrap.dedent("""\
        ---------
        Variables: name (type shape) [size]
        ---------
        0.weight (float32 8x3x3x3) [216, bytes: 864]
        0.bias (float32 8) [8, bytes: 32] (non-trainable)
        1.weight (float32 8) [8, bytes: 32]
        1.bias (float32 8) [8, bytes: 32]
        5.weight (float32 10x128) [1280, bytes: 5120]
        5.bias (float32 10) [10, bytes: 40]
        1.running_mean (float32 8) [8, bytes: 32] (buffer)
        1.running_var (float32 8) [8, bytes: 32] (buffer)
        1.num_batches_tracked (int64 ) [1, bytes: 8] (buffer)
        Total size of variables: 1547
        Total bytes of variables: 6192
        Total size of trainable variables: 1522
        """)


@pytest.mark.parametrize("name", MODELS)
def test_analyze_vars_matches_hand_counts(name):
    factory, _, params = MODELS[name]
    assert analyze_vars(factory()) == (params, 4 * params)


def test_analyze_vars_takes_named_tensors_and_counts_shared_ones_once():
    model = nn.Sequential(nn.Linear(3, 3, bias=False), nn.Linear(3, 3, bias=False))
    model[1].weight = model[0].weight
    assert analyze_vars(model) == (9, 36)
    assert analyze_vars(model.named_parameters(remove_duplicate=False)) == (9, 36)
    assert analyze_vars(model.state_dict()) == (9, 36)  # detached aliases of one storage
    assert analyze_vars([("a", torch.zeros(2, dtype=torch.float64))]) == (2, 16)


@pytest.mark.parametrize("bad", ["weights", torch.zeros(2), 3, [torch.zeros(2)], [("w", [1.0])]])
def test_analyze_vars_rejects_what_is_not_named_tensors(bad):
    with pytest.raises(TypeError, match=r"`variables` must be an nn.Module, a dict name -> tensor, or .* got"):
        analyze_vars(bad)


# --------------------------------------------------------------------- analyze_ops


def test_analyze_ops_prints_the_original_lines(capsys):
    model = nn.Sequential(nn.Linear(3, 2), nn.ReLU())
    assert analyze_ops(model, torch.ones(4, 3), print_info=True) == 6 + 8 + 8
    assert capsys.readouterr().out == textwrap.dedent("""\
        ---------
        Operations: name -> (type shapes) [size]
        ---------
        0/t -> (float32 3x2) [6]
        0/addmm -> (float32 4x2) [8]
        1/relu -> (float32 4x2) [8]
        Total size of op outputs: 22
        Total FLOPs: 48
        """)


@pytest.mark.parametrize("name", MODELS)
def test_flops_agree_with_flop_counter_mode_and_params_with_hand_counts(name):
    factory, shape, params = MODELS[name]
    model, x = factory(), torch.randn(shape)
    report = profile_ops(model, x)
    assert report.total_flops == flop_counter_total(model, x) > 0
    assert report.modules[""].params == params
    assert report.total_size == sum(op.size for op in report.ops) == analyze_ops(model, x)


def test_flops_of_an_mlp_by_hand():
    report = profile_ops(mlp(), torch.randn(2, 10))
    assert report.total_flops == 2 * (2 * 10 * 20) + 2 * (2 * 20 * 5)
    assert [report.modules[m].flops for m in ("0", "1", "2")] == [800, 0, 400]


def test_module_flops_agree_with_flop_counter_mode_per_module():
    model, x = TinyResNet(), torch.randn(1, 3, 8, 8)
    report = profile_ops(model, x)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    theirs = {k: sum(v.values()) for k, v in counter.get_flop_counts().items()}
    for path in ("stem", "blocks", "blocks.0", "blocks.1.conv2", "fc"):
        assert report.modules[path].flops == theirs[f"TinyResNet.{path}"]


def test_residual_adds_are_recorded_in_their_block():
    report = profile_ops(TinyResNet(), torch.randn(1, 3, 8, 8))
    assert [op.name for op in report.ops if op.type == "aten.add"] == ["blocks.0/add", "blocks.1/add"]


def test_only_the_branch_taken_is_recorded():
    model = Branchy()
    pos = profile_ops(model, torch.ones(1, 4))
    neg = profile_ops(model, -torch.ones(1, 4))
    assert {op.module for op in pos.ops} >= {"", "pos"} and "neg" not in {op.module for op in pos.ops}
    assert "pos" not in {op.module for op in neg.ops}
    assert (pos.modules["pos"].calls, pos.modules["neg"].calls) == (1, 0)
    # the test itself is an op: sum, compare, and reading the bool back
    assert [op.type for op in pos.ops[:3]] == ["aten.sum", "aten.gt", "aten._local_scalar_dense"]
    assert pos.ops[2].size == 0 and pos.ops[2].outputs == ()


def test_shared_module_counted_once_in_params_its_ops_twice():
    report = profile_ops(Twice(), torch.randn(3, 4))
    assert report.modules["fc"].params == report.modules[""].params == 20
    assert report.modules["fc"].calls == 2
    assert report.modules["fc"].output_size == 2 * 12
    assert [op.name for op in report.ops if op.module == "fc"] == ["fc/t", "fc/addmm", "fc/t_1", "fc/addmm_1"]


def test_functional_and_in_place_ops_are_attributed_to_the_calling_module():
    report = profile_ops(nn.Sequential(Twice()), torch.randn(3, 4))
    own = [(op.name, op.type) for op in report.ops if op.module == "0"]
    assert own == [("0/sigmoid", "aten.sigmoid"), ("0/add_", "aten.add_"), ("0/relu", "aten.relu")]
    relu_ = profile_ops(small_cnn(), torch.randn(1, 3, 8, 8)).ops
    assert [op.name for op in relu_ if op.type == "aten.relu_"] == ["2/relu_"]


def test_module_created_inside_forward_belongs_to_its_caller():
    class Ad(nn.Module):
        def forward(self, x):
            return nn.Tanh()(x)

    report = profile_ops(nn.Sequential(Ad()), torch.randn(2))
    assert [op.name for op in report.ops] == ["0/tanh"]


def test_op_records_carry_shapes_outputs_and_flops():
    (conv,) = [op for op in profile_ops(small_cnn(), torch.randn(2, 3, 8, 8)).ops if op.type == "aten.convolution"]
    assert (conv.name, conv.module, conv.shapes) == ("0/convolution", "0", ((2, 8, 8, 8),))
    assert conv.outputs == ("(float32 2x8x8x8)",)
    assert (conv.size, conv.flops) == (2 * 8 * 64, 2 * (2 * 8 * 64) * (3 * 9))


def test_table_lists_modules_indented_with_counts():
    table = profile_ops(TinyResNet(), torch.randn(1, 3, 8, 8)).table(max_depth=1)
    lines = table.splitlines()
    assert lines[0].split() == ["Module", "Type", "Calls", "Params", "Output", "elements", "FLOPs"]
    assert [line.split()[:4] for line in lines[2:]] == [
        ["(root)", "TinyResNet", "1", "731"], ["stem", "Conv2d", "1", "108"],
        ["blocks", "Sequential", "1", "608"], ["fc", "Linear", "1", "15"],
    ]


# --------------------------------------------------------------------- the model is left as it was


class Meddler(nn.Module):
    """Does in its forward what a forward should not: writes a parameter, swaps a buffer, flips flags."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(2, 2)
        self.register_buffer("seen", torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.fc.weight.mul_(2.0)
        self.seen = self.seen + 1
        self.fc.eval()
        self.fc.bias.requires_grad_(False)
        return F.dropout(self.fc(x), p=0.5, training=True)


def snapshot(model: nn.Module) -> dict:
    return {
        "tensors": {k: (v, v.detach().clone()) for k, v in model.state_dict(keep_vars=True).items()},
        "training": [m.training for m in model.modules()],
        "requires_grad": [p.requires_grad for p in model.parameters()],
        "grads": [p.grad for p in model.parameters()],
        "rng": torch.get_rng_state(),
    }


def assert_unchanged(model: nn.Module, before: dict) -> None:
    after = model.state_dict(keep_vars=True)
    for name, (obj, value) in before["tensors"].items():
        assert after[name] is obj, name
        assert torch.equal(after[name], value), name
    assert [m.training for m in model.modules()] == before["training"]
    assert [p.requires_grad for p in model.parameters()] == before["requires_grad"]
    assert all(p.grad is g for p, g in zip(model.parameters(), before["grads"]))
    assert torch.equal(torch.get_rng_state(), before["rng"])


@pytest.mark.parametrize("training", [True, False])
def test_state_is_unchanged_including_batch_norm_running_stats(training):
    model = TinyResNet().train(training)
    model.stem.weight.requires_grad_(False)
    model.fc.weight.grad = torch.ones_like(model.fc.weight)
    x = torch.randn(2, 3, 8, 8) + 3.0
    before = snapshot(model)
    profile_ops(model, x)
    assert_unchanged(model, before)
    if training:  # the same forward outside the analyzer does move the statistics
        model(x)
        assert not torch.equal(model.blocks[0].bn1.running_mean, before["tensors"]["blocks.0.bn1.running_mean"][1])


def test_state_is_restored_after_a_meddling_forward():
    model, x = Meddler(), torch.randn(3, 2)
    before = snapshot(model)
    report = profile_ops(model, x)
    assert_unchanged(model, before)
    assert "mul_" in [op.name for op in report.ops]


def test_state_and_hooks_are_restored_when_the_forward_raises():
    class Broken(Meddler):
        def forward(self, x):
            super().forward(x)
            raise RuntimeError("boom")

    model, x = Broken(), torch.randn(3, 2)
    before = snapshot(model)
    def global_hooks():
        module = nn.modules.module
        return dict(module._global_forward_pre_hooks), dict(module._global_forward_hooks)

    hooks = global_hooks()
    with pytest.raises(RuntimeError, match="boom"):
        profile_ops(model, x)
    assert_unchanged(model, before)
    assert global_hooks() == hooks


def test_a_model_on_the_meta_device_is_analyzed_without_memory():
    x = torch.randn(2, 3, 8, 8)
    on_cpu = profile_ops(TinyResNet(), x)
    on_meta = profile_ops(TinyResNet().to("meta"), x.to("meta"))
    assert (on_meta.total_flops, on_meta.total_size) == (on_cpu.total_flops, on_cpu.total_size)


def test_forward_kwargs_are_passed_through():
    class Scaled(nn.Module):
        def forward(self, x, *, scale):
            return x * scale

    assert [op.type for op in profile_ops(Scaled(), torch.ones(2), scale=3.0).ops] == ["aten.mul"]


@pytest.mark.parametrize("fn", [analyze_ops, profile_ops])
def test_ops_reject_a_non_module(fn):
    with pytest.raises(TypeError, match=rf"{fn.__name__}\(model\) takes a torch.nn.Module, got function"):
        fn(lambda x: x, torch.ones(1))


# --------------------------------------------------------------------- the CLI


FACTORY_FILE = """
import torch
from torch import nn

class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.fc = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Linear(10, 4)

    def forward(self, image, vector):
        return self.bn(self.conv(image)).mean(dim=(2, 3)) + self.fc(vector)

def make():
    return TwoInputs()

def not_a_model():
    return 3
"""


@pytest.fixture
def factory_file(tmp_path):
    path = tmp_path / "analyze_models.py"
    path.write_text(FACTORY_FILE)
    return path


def test_cli_prints_both_reports_for_a_file_factory(factory_file, capsys):
    argv = ["analyze", f"{factory_file}:make", "--input-shape", "2,3,8,8", "--input-shape", "2,10"]
    argv += ["--dtype", "float32"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "conv.weight (float32 4x3x3x3) [108, bytes: 432]\n" in out
    assert "bn.running_mean (float32 4) [4, bytes: 16] (buffer)\n" in out
    assert "Total size of variables: 173\n" in out  # 112 + 8 + 44 params, 9 buffer elements
    assert "conv/convolution -> (float32 2x4x6x6) [288]\n" in out
    assert "fc/addmm -> (float32 2x4) [8]\n" in out
    assert "bn/_native_batch_norm_legit_no_training" in out  # eval mode by default
    assert "(root)  TwoInputs" in out


def test_cli_imports_a_module_path_and_keeps_training_mode_on_request(factory_file, capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(factory_file.parent))
    argv = ["analyze", "analyze_models:make", "--input-shape", "2,3,8,8", "--input-shape", "2,10", "--train-mode"]
    assert cli.main(argv) == 0
    assert "bn/_native_batch_norm_legit " in capsys.readouterr().out


@pytest.mark.parametrize(
    "target, extra, message",
    [
        ("{file}:missing", [], "FACTORY 'missing' is not a callable"),
        ("{file}:not_a_model", [], "FACTORY 'not_a_model' must return a torch.nn.Module, got int"),
        ("{file}", [], "MODULE:FACTORY must name a module and a callable"),
        ("no_such_module_xyz:make", [], "MODULE 'no_such_module_xyz' cannot be imported"),
        ("{file}:make", ["--dtype", "floot32"], "--dtype takes torch dtype names"),
        ("{file}:make", ["--dtype", "float32", "--dtype", "int64", "--dtype", "int64"], "once per --input-shape"),
        ("nowhere.py:make", [], "MODULE 'nowhere.py' is not a file"),
    ],
)
def test_cli_reports_bad_input(factory_file, capsys, target, extra, message):
    shapes = ["--input-shape", "1,3,8,8", "--input-shape", "1,10"]
    argv = ["analyze", target.format(file=factory_file), *shapes, *extra]
    assert cli.main(argv) == 2
    assert message in capsys.readouterr().err


def test_cli_rejects_a_bad_shape(factory_file, capsys):
    with pytest.raises(SystemExit):
        cli.main(["analyze", f"{factory_file}:make", "--input-shape", "1,x"])
    assert "expected non-negative integers separated by commas, got '1,x'" in capsys.readouterr().err
