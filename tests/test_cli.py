"""The `torchslim` command: the demo (the main job) and `inspect`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from torchslim import checkpoint, cli

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_demo_trains_resumes_and_reports_held_out_accuracy(tmp_path, capsys):
    logdir = tmp_path / "digits"
    assert cli.main(["demo", "--logdir", str(logdir), "--steps", "150"]) == 0
    out = capsys.readouterr().out
    assert "global step 150" in out and "held-out accuracy" in out
    accuracy = float(out.split("held-out accuracy ")[1].split("%")[0])
    assert accuracy > 85.0  # 150 steps only; the full demo reaches 97%+
    assert checkpoint.step_of(checkpoint.latest_checkpoint(logdir)) == 150
    assert cli.main(["demo", "--logdir", str(logdir), "--steps", "170"]) == 0
    assert "global step 170" in capsys.readouterr().out
    assert checkpoint.step_of(checkpoint.latest_checkpoint(logdir)) == 170


@pytest.mark.slow
def test_python_dash_m_runs_the_cli(tmp_path):
    checkpoint.Saver().save({"model": {"w": torch.ones(3)}, "global_step": 3}, tmp_path, 3)
    result = subprocess.run([sys.executable, "-m", "torchslim", "inspect", str(tmp_path)], capture_output=True,
                            text=True, cwd=ROOT, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "global_step: 3" in result.stdout and "model/w" in result.stdout


def test_inspect_folds_bookkeeping_unless_all(tmp_path, capsys):
    checkpoint.Saver().save({"model": {"w": torch.ones(3)}, "rng": {"torch": torch.zeros(2)}, "global_step": 3},
                            tmp_path, 3)
    assert cli.main(["inspect", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "model: 1 tensor, 3 values" in out and "rng/torch" not in out and "--all" in out
    assert cli.main(["inspect", "--all", str(tmp_path)]) == 0
    assert "rng/torch" in capsys.readouterr().out


def test_inspect_reports_a_bad_path_without_a_traceback(tmp_path, capsys):
    assert cli.main(["inspect", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert "no checkpoint or logdir" in err and "Traceback" not in err


@pytest.mark.parametrize("argv, message", [
    (["demo", "--steps", "0"], "--steps must be a positive number of steps"),
    (["analyze", "torchslim.demo:make_model", "--input-shape", "1,3,8,8"],
     "cannot run on random inputs of --input-shape 1,3,8,8: RuntimeError"),
    (["eval", "{logdir}", "--model", "torchslim.demo:make_model"], "--model torchslim.demo:make_model needs --data"),
    (["inspect", "{truncated}"], "is corrupt: tensors.safetensors has 100 bytes"),
    (["eval", "{truncated}"], "is corrupt"),
])
def test_every_command_reports_a_mistake_in_one_line_with_status_2(tmp_path, capsys, argv, message):
    checkpoint.Saver().save({"model": {"w": torch.ones(64, 64)}, "global_step": 3}, tmp_path / "run", 3)
    tensors = tmp_path / "run" / "model.ckpt-3" / "tensors.safetensors"
    tensors.write_bytes(tensors.read_bytes()[:100])
    argv = [a.format(logdir=tmp_path / "run", truncated=tmp_path / "run") for a in argv]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err


def test_help_says_what_the_command_does(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "TF-Slim's training system for PyTorch" in out and "``" not in out


def test_export_writes_the_latest_checkpoint_s_weights_for_the_plain_model(tmp_path, capsys):
    from safetensors.torch import load_file

    from torchslim.learning import create_train_op, train

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 2))
    model[2].weight = torch.nn.Parameter(model[2].weight)
    data = [(torch.randn(16, 4),) for _ in range(3)]
    op = create_train_op(lambda b: model(b[0]).square().mean(), torch.optim.SGD(model.parameters(), lr=0.1))
    train(op, tmp_path / "run", data, number_of_steps=3, progress_bar=False)
    out = tmp_path / "weights.safetensors"
    assert cli.main(["export", str(tmp_path / "run"), str(out)]) == 0
    assert "global step 3" in capsys.readouterr().out
    fresh = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 2))
    fresh.load_state_dict(load_file(str(out)))  # strict: every name of the model, nothing else
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), model.state_dict().values()))


@pytest.mark.parametrize("args, message", [
    (["{tmp}/run", "{tmp}/out.pt"], "OUT must be a file name ending in .safetensors, got '.*out.pt'"),
    (["{tmp}/nothing", "{tmp}/out.safetensors"], "no checkpoint or logdir at '.*nothing'"),
    (["{tmp}", "{tmp}/out.safetensors"], "neither a torchslim checkpoint nor a logdir holding one"),
])
def test_export_rejects_what_it_cannot_export_and_writes_nothing(tmp_path, capsys, args, message):
    import re

    (tmp_path / "empty").mkdir()
    assert cli.main(["export", *(a.format(tmp=tmp_path) for a in args)]) == 2
    assert re.search(message, capsys.readouterr().err)
    assert not list(tmp_path.glob("out*"))
