"""Shared fixtures: the tests' small logistic problem, as in TF-Slim's learning tests."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import pytest
import torch

from torchslim import losses


def logistic_data(n: int = 64, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Linearly separable points in 4-d with 0/1 labels."""
    g = torch.Generator().manual_seed(seed)
    inputs = torch.randn(n, 4, generator=g)
    labels = (inputs @ torch.tensor([1.0, -2.0, 0.5, 1.5]) > 0).float()
    return inputs, labels


def batches(n_batches: int = 8, batch_size: int = 16, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    inputs, labels = logistic_data(n_batches * batch_size, seed)
    return [(inputs[i:i + batch_size], labels[i:i + batch_size]) for i in range(0, len(labels), batch_size)]


class Logistic:
    """A model, an optimizer and a loss function over (inputs, labels) batches."""

    def __init__(self, seed: int = 0, lr: float = 0.5) -> None:
        torch.manual_seed(seed)
        self.model = torch.nn.Linear(4, 1)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=lr, momentum=0.9)

    def loss(self, batch):
        inputs, labels = batch
        losses.sigmoid_cross_entropy(self.model(inputs).squeeze(1), labels)
        return losses.get_total_loss()


@pytest.fixture
def problem() -> Logistic:
    return Logistic()


@pytest.fixture
def info_logs(caplog):
    caplog.set_level(logging.INFO, logger="torchslim")
    return caplog


def wait_until(condition: Callable[[], object], what: str, timeout: float = 60.0, poll: float = 0.005) -> None:
    """Poll ``condition`` until it holds; fail with ``what`` after ``timeout`` seconds (a loaded machine's margin)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {timeout} s: {what}"
        time.sleep(poll)
