"""The README's claims that a user would copy: its example runs as shown."""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch

from torchslim import checkpoint

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_the_seed_example_in_torchslim_trains_and_resumes(tmp_path, monkeypatch):
    [example] = [b for b in python_blocks() if "learning.train(train_op" in b and "import torch" in b]
    monkeypatch.chdir(tmp_path)
    g = torch.Generator().manual_seed(0)
    inputs = torch.randn(512, 8, generator=g)
    labels = (inputs.sum(1) > 0).float()
    namespace = {"MyModel": lambda: torch.nn.Linear(8, 1),
                 "dataset": torch.utils.data.TensorDataset(inputs, labels)}
    exec(compile(example.replace("10_000", "200"), "README.md", "exec"), namespace)
    assert checkpoint.step_of(checkpoint.latest_checkpoint(tmp_path / "runs" / "my_model")) == 200
    assert namespace["train_op"].step == 200
    state = checkpoint.load(checkpoint.latest_checkpoint(tmp_path / "runs" / "my_model"))
    assert state["global_step"] == 200 and "optimizer" in state and "rng" in state


def test_the_validation_example_keeps_the_best_and_finds_it(tmp_path, monkeypatch):
    [seed] = [b for b in python_blocks() if "learning.train(train_op" in b and "import torch" in b]
    [example] = [b for b in python_blocks() if "validation.Validation(" in b and "best_checkpoint" in b]
    monkeypatch.chdir(tmp_path)
    g = torch.Generator().manual_seed(0)
    inputs = torch.randn(640, 8, generator=g)
    labels = (inputs.sum(1) > 0).float()
    dataset = torch.utils.data.TensorDataset(inputs[:512], labels[:512])
    namespace = {"MyModel": lambda: torch.nn.Linear(8, 1), "dataset": dataset,
                 "held_out_loader": torch.utils.data.DataLoader(
                     torch.utils.data.TensorDataset(inputs[512:], labels[512:]), batch_size=64)}
    without_training = seed.replace("learning.train(", "None and learning.train(")
    exec(compile(without_training, "README.md", "exec"), namespace)
    exec(compile(example.replace("10_000", "60").replace("every_n_steps=500", "every_n_steps=10"), "README.md",
                 "exec"), namespace)
    metrics = checkpoint.read_metrics(tmp_path / "runs" / "my_model")
    assert set(metrics) >= {20, 30, 40, 50, 60} and set(metrics) <= {10, 20, 30, 40, 50, 60}  # newest 5 + best 3
    best = max(metrics, key=lambda s: (metrics[s]["accuracy"], -s))
    assert os.path.abspath(namespace["best"]) == checkpoint.checkpoint_path(tmp_path / "runs" / "my_model", best)
