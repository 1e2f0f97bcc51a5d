"""torchslim: TF-Slim's training system for PyTorch.

The modules keep the original's names: :mod:`~torchslim.learning` (train ops and
the supervised train loop), :mod:`~torchslim.model_analyzer`, plus
:mod:`~torchslim.losses`, :mod:`~torchslim.checkpoint`, :mod:`~torchslim.variables`,
:mod:`~torchslim.gradients` and :mod:`~torchslim.policies`. The most used names
are also here at the top level.
"""

from torchslim import (
    checkpoint,
    gradients,
    learning,
    losses,
    model_analyzer,
    policies,
    variables,
)
from torchslim.checkpoint import Saver, latest_checkpoint
from torchslim.learning import (
    GlobalStep,
    NonFiniteError,
    TrainOp,
    create_train_op,
    register_update_op,
    train,
)

__version__ = "0.1.0"

__all__ = [
    "GlobalStep",
    "NonFiniteError",
    "Saver",
    "TrainOp",
    "checkpoint",
    "create_train_op",
    "gradients",
    "latest_checkpoint",
    "learning",
    "losses",
    "model_analyzer",
    "policies",
    "register_update_op",
    "train",
    "variables",
]
