"""The README's claims that a user would copy: its example runs as shown."""

from __future__ import annotations

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
