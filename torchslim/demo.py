"""The main job: a small CNN on scikit-learn's bundled 8x8 digits, trained as a supervised run.

``torchslim demo`` (or ``python -m torchslim demo``) trains with a fixed
train/held-out split, checkpoints into ``runs/digits``, evaluates the held-out
digits at each checkpoint as it is saved (``validation.Validation``), keeps the
best checkpoint by held-out accuracy beside the newest (``validation.Watch``),
and prints the final and the best accuracy and the step of the best. The
evaluations go to ``runs/digits/eval``, so TensorBoard shows them as run
``eval`` beside the training curves, under the same tags. Run it again and it
continues from its latest checkpoint; give it a larger ``--steps`` to train
further. It is written the way a user would write their own script, with the
public API only.
"""

from __future__ import annotations

import logging
import os
import time

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from torchslim import checkpoint, evaluation, learning, losses, summaries
from torchslim.validation import Validation, Watch

HELD_OUT = 360  # of the 1797 digits; the split is fixed, whatever the seed
LABEL_SMOOTHING = 0.05


def load_digits() -> tuple[TensorDataset, TensorDataset]:
    """The digits as (train, held-out) datasets of [N, 1, 8, 8] float images in [0, 1] and int labels."""
    try:
        from sklearn.datasets import load_digits as sklearn_digits
    except ImportError as e:
        raise SystemExit("the demo needs scikit-learn: pip install 'torchslim[demo]'") from e
    digits = sklearn_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(digits.target, dtype=torch.long)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(1234))
    train, held_out = order[HELD_OUT:], order[:HELD_OUT]
    return TensorDataset(images[train], labels[train]), TensorDataset(images[held_out], labels[held_out])


def make_model() -> nn.Module:
    """conv(32) - conv(64) - pool - dropout - fc(128) - fc(10), about 300k parameters."""
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
        nn.MaxPool2d(2), nn.Flatten(), nn.Dropout(0.25),
        nn.Linear(64 * 4 * 4, 128), nn.ReLU(), nn.Linear(128, 10),
    )


def held_out_data(batch_size: int = 120) -> DataLoader:
    """The 360 held-out digits as (images, labels) batches, in a fixed order."""
    return DataLoader(load_digits()[1], batch_size=batch_size)


def accuracy(predictions: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The fraction of ``predictions`` (logits) whose argmax is the label."""
    return (predictions.argmax(dim=1) == labels).float().mean()


def eval_metrics() -> dict[str, object]:
    """The held-out metrics: accuracy, and the training loss under its training tag (``total_loss``)."""
    return {"accuracy": accuracy,
            "total_loss": lambda logits, labels: nn.functional.cross_entropy(logits, labels,
                                                                              label_smoothing=LABEL_SMOOTHING)}


def main(logdir: str = "runs/digits", number_of_steps: int = 1500, seed: int = 0) -> float:
    """Train (or resume) the digits CNN up to ``number_of_steps``; print and return the held-out accuracy.

    Every 25 steps it writes summaries (total loss, the loss by name, learning
    rate, steps per second, a histogram of each weight); every 250 steps a
    checkpoint, whose weights are evaluated on the held-out digits as it is saved
    (into ``<logdir>/eval`` and the checkpoint's metadata). The newest 3 and the
    best by held-out accuracy are kept.
    """
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    torch.manual_seed(seed)
    train_set, held_out = load_digits()
    loader = DataLoader(train_set, batch_size=64, shuffle=True, drop_last=True)
    model = make_model()

    def total_loss(batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        images, labels = batch
        losses.sparse_softmax_cross_entropy(model(images), labels, label_smoothing=LABEL_SMOOTHING)
        return losses.get_total_loss()

    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    # Decays without an end point, so a resumed run may be given a larger --steps.
    scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=0.998)
    train_op = learning.create_train_op(total_loss, optimizer, lr_scheduler=scheduler)
    summaries.add_histogram_summaries(model.parameters())
    started = time.monotonic()
    loss = learning.train(train_op, logdir, loader, number_of_steps=number_of_steps, log_every_n_steps=250,
                          save_summaries_steps=25, save_interval_steps=250, saver=checkpoint.Saver(max_to_keep=3),
                          validation=Validation(held_out_data(), eval_metrics(), at_checkpoints=True),
                          watch=Watch("accuracy", mode="max", keep_best=1))
    held_out_accuracy = final_accuracy(logdir, model, train_op.step)
    best = checkpoint.best_checkpoint(logdir)
    best_text = "" if best is None else (f"; best: global step {checkpoint.step_of(best)}, "
                                         f"{checkpoint.read_metrics(logdir)[checkpoint.step_of(best)]['accuracy']:.2%}"
                                         f" ({best})")
    shown = "nothing left to train" if loss is None else f"final loss {loss:.4f}"
    print(f"global step {train_op.step}: {shown}; held-out accuracy {held_out_accuracy:.2%} "
          f"({len(held_out)} digits), {time.monotonic() - started:.1f} s{best_text}")
    return held_out_accuracy


def final_accuracy(logdir: str, model: nn.Module, step: int) -> float:
    """The held-out accuracy of the checkpoint at ``step``: measured when it was saved, or now (an older run's)."""
    measured = checkpoint.read_metrics(logdir).get(step, {})
    if "accuracy" in measured:
        return measured["accuracy"]
    eval_dir = os.path.join(logdir, "eval")
    results = evaluation.evaluate_once(checkpoint.checkpoint_path(logdir, step), eval_dir, model, held_out_data(),
                                       metrics=eval_metrics())
    return results["accuracy"]
