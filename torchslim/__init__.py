"""torchslim: TF-Slim's training system for PyTorch.

The modules keep the original's names: :mod:`~torchslim.learning` (train ops and
the supervised train loop), :mod:`~torchslim.evaluation`,
:mod:`~torchslim.summaries`, :mod:`~torchslim.queues` and
:mod:`~torchslim.model_analyzer`; beside them :mod:`~torchslim.losses`,
:mod:`~torchslim.checkpoint`, :mod:`~torchslim.variables`,
:mod:`~torchslim.gradients`, :mod:`~torchslim.policies` and
:mod:`~torchslim.distributed`. The most used names are also here at the top level.
"""

from torchslim import (
    checkpoint,
    distributed,
    evaluation,
    gradients,
    learning,
    losses,
    model_analyzer,
    policies,
    queues,
    summaries,
    variables,
)
from torchslim.checkpoint import Saver, latest_checkpoint
from torchslim.evaluation import evaluate_once, evaluation_loop
from torchslim.learning import GlobalStep, NonFiniteError, TrainOp, create_train_op, register_update_op, train

__version__ = "0.1.0"

__all__ = [
    "GlobalStep",
    "NonFiniteError",
    "Saver",
    "TrainOp",
    "checkpoint",
    "create_train_op",
    "distributed",
    "evaluate_once",
    "evaluation",
    "evaluation_loop",
    "gradients",
    "latest_checkpoint",
    "learning",
    "losses",
    "model_analyzer",
    "policies",
    "queues",
    "register_update_op",
    "summaries",
    "train",
    "variables",
]
