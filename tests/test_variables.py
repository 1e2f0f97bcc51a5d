"""variables: names (wrapper prefixes, scopes), reading every supported source,
and warm starts that restore exactly what was asked and nothing else."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import safetensors.torch
import torch
from torch import nn

from torchslim import checkpoint
from torchslim.learning import create_train_op
from torchslim.variables import (
    assign_from_checkpoint_fn,
    assign_from_values_fn,
    canonical_name,
    get_model_variables,
    get_variables_to_restore,
    load_variables,
)


class Net(nn.Module):
    """A body (Linear + BatchNorm), a head `fc`, a second head `fc2` whose name extends `fc`."""

    def __init__(self, seed: int, fc_out: int = 3) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.body = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8))
        self.fc = nn.Linear(8, fc_out)
        self.fc2 = nn.Linear(fc_out, 2)
        self.register_buffer("scratch", torch.zeros(2), persistent=False)
        with torch.no_grad():  # give BatchNorm's running stats values that differ between seeds
            self.body[1].running_mean.normal_()
            self.body[1].running_var.uniform_(0.5, 2.0)
            self.body[1].num_batches_tracked.fill_(seed + 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc(self.body(x))))


BODY = ["body.0.weight", "body.0.bias", "body.1.weight", "body.1.bias",
        "body.1.running_mean", "body.1.running_var", "body.1.num_batches_tracked"]
HEADS = ["fc.weight", "fc.bias", "fc2.weight", "fc2.bias"]
ALL = BODY + HEADS


class Wrapper(nn.Module):
    """Stands in for DDP (attribute `module`) or torch.compile (attribute `_orig_mod`)."""

    def __init__(self, attr: str, inner: nn.Module) -> None:
        super().__init__()
        setattr(self, attr, inner)


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], names) -> bool:
    return all(torch.equal(a[n], b[n]) for n in names)


@pytest.fixture
def source() -> Net:
    return Net(seed=0)


@pytest.fixture
def ckpt_dir(source, tmp_path):
    """A torchslim checkpoint of `source` with its optimizer state, as the train loop writes one."""
    opt = torch.optim.SGD(source.parameters(), lr=0.1, momentum=0.9)
    source(torch.randn(5, 4)).sum().backward()
    opt.step()
    return checkpoint.save({"model": source.state_dict(), "optimizer": opt.state_dict()}, tmp_path / "model.ckpt-7")


# --------------------------------------------------------------------- names


@pytest.mark.parametrize(
    "name, expected",
    [
        ("module.fc.weight", "fc.weight"),
        ("_orig_mod.fc.weight", "fc.weight"),
        ("module._orig_mod.conv0.weight", "conv0.weight"),
        ("_orig_mod.module.conv0.weight", "conv0.weight"),
        ("module.module.fc.bias", "fc.bias"),
        ("fc.weight", "fc.weight"),
        ("encoder.module.weight", "encoder.module.weight"),  # only a leading prefix is a wrapper's
        ("modules.0.weight", "modules.0.weight"),
        ("module_a.weight", "module_a.weight"),
        ("orig_mod.weight", "orig_mod.weight"),
        ("module", "module"),
    ],
)
def test_canonical_name(name, expected):
    assert canonical_name(name) == expected


def test_get_model_variables_parameters_and_persistent_buffers():
    model = Net(seed=0)
    variables = get_model_variables(model)
    assert sorted(variables) == sorted(ALL)  # running stats in, the non-persistent `scratch` out
    assert variables["fc.weight"] is model.fc.weight  # live tensors: writing them writes the model
    assert variables["body.1.running_mean"] is model.body[1].running_mean


@pytest.mark.parametrize("attr", ["module", "_orig_mod"])
def test_get_model_variables_of_a_wrapped_model(attr):
    inner = Net(seed=0)
    variables = get_model_variables(Wrapper("module", Wrapper(attr, inner)))
    assert sorted(variables) == sorted(ALL)
    assert variables["fc2.bias"] is inner.fc2.bias


@pytest.mark.parametrize(
    "scope, suffix, expected",
    [
        ("body", None, BODY),
        ("body.1", None, BODY[2:]),
        ("fc", None, ["fc.weight", "fc.bias"]),  # whole components: not fc2.*
        ("fc.", None, ["fc.weight", "fc.bias"]),
        ("f", None, []),
        (None, "weight", ["body.0.weight", "body.1.weight", "fc.weight", "fc2.weight"]),
        ("body", "bias", ["body.0.bias", "body.1.bias"]),
    ],
)
def test_get_model_variables_scope_and_suffix(scope, suffix, expected):
    assert sorted(get_model_variables(Net(seed=0), scope=scope, suffix=suffix)) == sorted(expected)


@pytest.mark.parametrize(
    "include, exclude, expected",
    [
        (None, None, ALL),
        (None, ["fc"], BODY + ["fc2.weight", "fc2.bias"]),  # "fc" does not match fc2.weight
        (["fc"], None, ["fc.weight", "fc.bias"]),
        (["body", "fc2"], ["body.1"], BODY[:2] + ["fc2.weight", "fc2.bias"]),
        (("body.0",), (), BODY[:2]),
        (None, ["fc", "fc2", "body"], []),
    ],
)
def test_get_variables_to_restore(include, exclude, expected):
    assert sorted(get_variables_to_restore(Net(seed=0), include=include, exclude=exclude)) == sorted(expected)


@pytest.mark.parametrize("arg", ["include", "exclude"])
@pytest.mark.parametrize("bad", ["fc", ["fc", 2]])
def test_get_variables_to_restore_bad_scopes(arg, bad):
    with pytest.raises(TypeError, match=rf"`{arg}` must be a list of name prefixes, got {bad!r}".replace("[", r"\[")):
        get_variables_to_restore(Net(seed=0), **{arg: bad})


def test_get_variables_to_restore_takes_an_iterable():
    restored = get_variables_to_restore(Net(seed=0), exclude=(s for s in ["fc", "fc2"]))
    assert sorted(restored) == sorted(BODY)


def test_get_model_variables_rejects_a_non_module():
    with pytest.raises(TypeError, match="`model` must be a torch.nn.Module, got dict"):
        get_model_variables({"w": torch.zeros(1)})


# --------------------------------------------------------------------- reading sources


def test_load_variables_from_a_checkpoint_dir(source, ckpt_dir):
    values = load_variables(ckpt_dir)
    assert sorted(values) == sorted(ALL)  # the model only: no optimizer tensors
    assert same(values, snapshot(source), ALL)


def test_load_variables_from_a_logdir_reads_the_latest(source, ckpt_dir, tmp_path):
    newer = Net(seed=5)
    checkpoint.save({"model": newer.state_dict()}, tmp_path / "model.ckpt-12")
    values = load_variables(tmp_path)
    assert same(values, snapshot(newer), ALL)


def test_load_variables_from_a_bare_state_checkpoint(tmp_path):
    checkpoint.save({"w": torch.ones(2), "note": "hi"}, tmp_path / "model.ckpt-1")
    values = load_variables(tmp_path / "model.ckpt-1")
    assert list(values) == ["w"] and torch.equal(values["w"], torch.ones(2))


def test_load_variables_from_safetensors(source, tmp_path):
    path = tmp_path / "weights.safetensors"
    safetensors.torch.save_file(source.state_dict(), str(path))
    assert same(load_variables(path), snapshot(source), ALL)


@pytest.mark.parametrize(
    "wrap",
    [
        lambda sd: sd,
        lambda sd: {"model": sd, "optimizer": {"lr": 0.1}, "step": 3},
        lambda sd: {"state_dict": sd, "epoch": 2},
        lambda sd: {"module." + k: v for k, v in sd.items()},  # saved from a DDP model
        lambda sd: {"model": {"_orig_mod." + k: v for k, v in sd.items()}},  # saved from a compiled model
    ],
    ids=["state_dict", "model_wrapper", "state_dict_wrapper", "ddp_prefix", "compile_prefix"],
)
def test_load_variables_from_a_torch_save_file(source, tmp_path, wrap):
    path = tmp_path / "weights.pt"
    torch.save(wrap(source.state_dict()), path)
    values = load_variables(path)
    assert sorted(values) == sorted(ALL)
    assert same(values, snapshot(source), ALL)


UNPICKLED: list[str] = []


def _record(tag: str) -> str:
    UNPICKLED.append(tag)
    return tag


class Payload:
    """Unpickling this runs code: what weights_only loading must refuse."""

    def __reduce__(self):
        return (_record, ("code ran",))


def test_load_variables_refuses_a_pickled_object(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"model": {"w": torch.ones(1)}, "extra": Payload()}, path)
    UNPICKLED.clear()
    with pytest.raises(ValueError, match="not a safetensors file nor a state_dict readable with weights_only=True"):
        load_variables(path)
    assert UNPICKLED == []


def test_load_variables_bad_sources(tmp_path):
    with pytest.raises(ValueError, match="no checkpoint at"):
        load_variables(tmp_path / "missing.pt")
    with pytest.raises(ValueError, match="neither a torchslim checkpoint nor a logdir holding one"):
        load_variables(tmp_path)
    torch.save(torch.ones(3), tmp_path / "tensor.pt")
    with pytest.raises(ValueError, match="holds a Tensor, not a dict of tensors"):
        load_variables(tmp_path / "tensor.pt")
    (tmp_path / "junk.bin").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="weights_only=True"):
        load_variables(tmp_path / "junk.bin")


# --------------------------------------------------------------------- assign_from_checkpoint_fn


def test_warm_start_restores_the_body_and_leaves_the_head(source, ckpt_dir):
    target = Net(seed=1)
    before, wanted = snapshot(target), snapshot(source)
    heads = ["fc2.weight", "fc2.bias"]
    init_fn = assign_from_checkpoint_fn(ckpt_dir, get_variables_to_restore(target, exclude=["fc2"]))
    init_fn()
    after = snapshot(target)
    restored = [n for n in ALL if n not in heads]
    assert same(after, wanted, restored)  # BatchNorm running stats included
    assert same(after, before, heads)
    assert not same(after, wanted, ["fc2.weight"])  # really different seeds


def test_rename_map_from_checkpoint_names(tmp_path):
    torch.manual_seed(3)
    encoder = nn.Linear(4, 8)
    path = tmp_path / "encoder.safetensors"
    safetensors.torch.save_file(encoder.state_dict(), str(path))
    target = Net(seed=1)
    assign_from_checkpoint_fn(path, {"weight": target.body[0].weight, "bias": target.body[0].bias})()
    assert torch.equal(target.body[0].weight, encoder.weight) and torch.equal(target.body[0].bias, encoder.bias)


def test_missing_names_are_all_listed_and_nothing_is_assigned(tmp_path, source):
    path = tmp_path / "body.pt"
    torch.save({k: v for k, v in source.state_dict().items() if k.startswith("body.")}, path)
    target = Net(seed=1)
    before = snapshot(target)
    init_fn = assign_from_checkpoint_fn(path, target)
    with pytest.raises(ValueError, match="has no value for: fc.weight, fc.bias, fc2.weight, fc2.bias") as info:
        init_fn()
    assert "ignore_missing_vars=True" in str(info.value)
    assert same(snapshot(target), before, ALL)


def test_ignore_missing_vars_warns_and_skips(tmp_path, source, caplog):
    path = tmp_path / "body.pt"
    torch.save({k: v for k, v in source.state_dict().items() if k.startswith("body.")}, path)
    target = Net(seed=1)
    before = snapshot(target)
    with caplog.at_level(logging.WARNING, logger="torchslim"):
        assign_from_checkpoint_fn(path, target, ignore_missing_vars=True)()
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == len(HEADS)
    for name in HEADS:
        assert any(name in m and "leaving it as it is" in m for m in warned)
    assert same(snapshot(target), snapshot(source), BODY)
    assert same(snapshot(target), before, HEADS)


def test_shape_mismatch_lists_names_and_both_shapes(tmp_path):
    wide = Net(seed=0, fc_out=5)
    path = tmp_path / "wide.safetensors"
    safetensors.torch.save_file(wide.state_dict(), str(path))
    target = Net(seed=1)
    before = snapshot(target)
    with pytest.raises(ValueError) as info:
        assign_from_checkpoint_fn(path, target)()
    message = str(info.value)
    for part in ["fc.weight (model (3, 8), checkpoint (5, 8))", "fc.bias (model (3,), checkpoint (5,))",
                 "fc2.weight (model (2, 3), checkpoint (2, 5))"]:
        assert part in message
    assert "body.0.weight" not in message
    assert same(snapshot(target), before, ALL)  # the fitting variables were not half-restored either


def test_shape_mismatch_is_not_ignored_by_ignore_missing_vars(tmp_path):
    path = tmp_path / "wide.safetensors"
    safetensors.torch.save_file(Net(seed=0, fc_out=5).state_dict(), str(path))
    with pytest.raises(ValueError, match=r"shape mismatch .*fc\.weight"):
        assign_from_checkpoint_fn(path, Net(seed=1), ignore_missing_vars=True)()


def test_nonexistent_path_raises_at_creation(tmp_path):
    with pytest.raises(ValueError, match=r"`model_path` .*nowhere.* does not exist"):
        assign_from_checkpoint_fn(tmp_path / "nowhere", Net(seed=0))


def test_a_module_as_var_list(source, ckpt_dir):
    target = Net(seed=1)
    assign_from_checkpoint_fn(ckpt_dir, target)()
    assert same(snapshot(target), snapshot(source), ALL)


def test_a_wrapped_module_reads_a_plain_checkpoint(source, ckpt_dir):
    target = Net(seed=1)
    assign_from_checkpoint_fn(ckpt_dir, Wrapper("_orig_mod", target))()
    assert same(snapshot(target), snapshot(source), ALL)


def make_op(model: nn.Module):
    return create_train_op(lambda b: model(b).sum(), torch.optim.SGD(model.parameters(), lr=0.1))


def test_var_list_none_restores_every_train_op_variable(source, ckpt_dir):
    target = Net(seed=1)
    op = make_op(target)
    assign_from_checkpoint_fn(ckpt_dir)(op)
    assert same(snapshot(target), snapshot(source), ALL)


def test_var_list_of_names_restores_only_those(source, ckpt_dir):
    target = Net(seed=1)
    before = snapshot(target)
    op = make_op(target)
    assign_from_checkpoint_fn(ckpt_dir, ["fc.weight", "body.1.running_var"])(op)
    after = snapshot(target)
    assert same(after, snapshot(source), ["fc.weight", "body.1.running_var"])
    assert same(after, before, [n for n in ALL if n not in ("fc.weight", "body.1.running_var")])


def test_var_list_of_names_errors(ckpt_dir):
    with pytest.raises(ValueError, match="needs the train op"):
        assign_from_checkpoint_fn(ckpt_dir, ["fc.weight"])()
    with pytest.raises(ValueError, match="needs the train op"):
        assign_from_checkpoint_fn(ckpt_dir)()
    op = make_op(Net(seed=1))
    with pytest.raises(ValueError, match="the model has no variables named: nope, fc3.bias"):
        assign_from_checkpoint_fn(ckpt_dir, ["fc.weight", "nope", "fc3.bias"])(op)


@pytest.mark.parametrize(
    "var_list, message",
    [
        ({"fc.weight": "not a tensor"}, r"map checkpoint names to tensors; bad entries: \['fc.weight'\]"),
        ([torch.zeros(1)], "`var_list` must be None .*got list"),
        ("fc.weight", "`var_list` must be None .*got str"),
    ],
)
def test_bad_var_list(ckpt_dir, var_list, message):
    with pytest.raises(TypeError, match=message):
        assign_from_checkpoint_fn(ckpt_dir, var_list)


def test_warm_start_log_counts_the_restored_variables(ckpt_dir, caplog):
    target = Net(seed=1)
    with caplog.at_level(logging.INFO, logger="torchslim"):
        assign_from_checkpoint_fn(ckpt_dir, get_variables_to_restore(target, include=["fc"]))()
    assert any("Warm-started 2 variables" in r.getMessage() for r in caplog.records)


# --------------------------------------------------------------------- assign_from_values_fn


def test_assign_from_values_with_a_module(source):
    target = Net(seed=1)
    before = snapshot(target)
    init_fn = assign_from_values_fn(
        {"fc.bias": [1.0, 2.0, 3.0], "body.0.weight": np.ones((8, 4)), "body.1.running_mean": torch.full((8,), 7.0)},
        target,
    )
    init_fn()
    assert torch.equal(target.fc.bias, torch.tensor([1.0, 2.0, 3.0]))
    assert torch.equal(target.body[0].weight, torch.ones(8, 4)) and target.body[0].weight.dtype == torch.float32
    assert torch.equal(target.body[1].running_mean, torch.full((8,), 7.0))
    untouched = [n for n in ALL if n not in ("fc.bias", "body.0.weight", "body.1.running_mean")]
    assert same(snapshot(target), before, untouched)


def test_assign_from_values_with_a_train_op():
    target = Net(seed=1)
    assign_from_values_fn({"fc2.bias": torch.tensor([5.0, 6.0])})(make_op(target))
    assert torch.equal(target.fc2.bias, torch.tensor([5.0, 6.0]))


def test_assign_from_values_unknown_names():
    target = Net(seed=1)
    before = snapshot(target)
    with pytest.raises(ValueError, match=r"no variables named: nope, fc3\.bias; known: body\.0\.bias"):
        assign_from_values_fn({"fc.bias": torch.zeros(3), "nope": 1.0, "fc3.bias": torch.zeros(2)}, target)()
    assert same(snapshot(target), before, ALL)


def test_assign_from_values_wrong_shape():
    target = Net(seed=1)
    with pytest.raises(ValueError, match=r"fc\.bias \(model \(3,\), value \(2,\)\)"):
        assign_from_values_fn({"fc.bias": [1.0, 2.0]}, target)()


def test_assign_from_values_name_to_value_must_be_a_dict():
    with pytest.raises(TypeError, match="`name_to_value` must be a dict of variable name -> value, got list"):
        assign_from_values_fn([("fc.bias", 1.0)])


def test_include_empty_list_restores_nothing_as_in_tf_slim():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
    assert get_variables_to_restore(model, include=[]) == {}
    assert len(get_variables_to_restore(model, include=None)) == 4
