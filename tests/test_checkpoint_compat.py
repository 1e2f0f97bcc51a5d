"""Checkpoints written by earlier releases still load: a small one of each past format is kept as a fixture."""

from __future__ import annotations

import os
import shutil

import torch

from torchslim import checkpoint

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")


def format1_state() -> dict:
    """The state tests/fixtures/format1/model.ckpt-3 was written from (by torchslim 0.1's checkpoint.save)."""
    model = torch.nn.Linear(3, 2)
    with torch.no_grad():
        model.weight.copy_(torch.arange(6, dtype=torch.float32).reshape(2, 3) / 4)
        model.bias.copy_(torch.tensor([0.5, -1.5]))
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    return {"model": model.state_dict(), "optimizer": opt.state_dict(), "global_step": 3,
            "extra": {"half": torch.arange(4, dtype=torch.bfloat16), "pair": (1, "two"),
                      "by_int": {1: torch.tensor([7])}, "none": None}}


def assert_same(a, b):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, dict):
        assert isinstance(b, dict) and list(a) == list(b)
        for k in a:
            assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b)
        for x, y in zip(a, b):
            assert_same(x, y)
    else:
        assert a == b


def test_a_format1_checkpoint_still_loads_as_written(tmp_path):
    path = shutil.copytree(os.path.join(FIXTURES, "format1", "model.ckpt-3"), tmp_path / "model.ckpt-3")
    assert_same(checkpoint.load(path), format1_state())
    assert checkpoint.read_metadata(path)["global_step"] == 3


def test_a_format1_checkpoint_resumes_a_model_and_its_optimizer(tmp_path):
    path = shutil.copytree(os.path.join(FIXTURES, "format1", "model.ckpt-3"), tmp_path / "model.ckpt-3")
    expected = format1_state()
    state = checkpoint.load(path)
    model = torch.nn.Linear(3, 2)
    model.load_state_dict(state["model"])
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    opt.load_state_dict(state["optimizer"])
    assert torch.equal(opt.state_dict()["state"][0]["exp_avg"], expected["optimizer"]["state"][0]["exp_avg"])
    assert checkpoint.latest_checkpoint(tmp_path) == os.fspath(path)


def test_inspect_shows_the_format_and_the_checksum_kind(tmp_path, capsys):
    from torchslim import cli

    assert cli.main(["inspect", os.path.join(FIXTURES, "format1", "model.ckpt-3")]) == 0
    out = capsys.readouterr().out
    assert "format: torchslim.checkpoint/1 (version 1)" in out and "checksum: sha256 per file" in out
    checkpoint.save(format1_state(), tmp_path / "model.ckpt-3")
    assert cli.main(["inspect", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "format: torchslim.checkpoint/2 (version 2)" in out and "checksum: xxh3_64 per 64 MiB chunk" in out
