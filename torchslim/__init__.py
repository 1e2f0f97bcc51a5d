"""torchslim: TF-Slim's training system for PyTorch.

The modules keep the original's names: :mod:`~torchslim.learning` (train ops and
the supervised train loop), :mod:`~torchslim.evaluation`,
:mod:`~torchslim.summaries`, :mod:`~torchslim.queues` and
:mod:`~torchslim.model_analyzer`; beside them :mod:`~torchslim.losses`,
:mod:`~torchslim.checkpoint`, :mod:`~torchslim.variables`,
:mod:`~torchslim.gradients`, :mod:`~torchslim.policies`,
:mod:`~torchslim.distributed` and :mod:`~torchslim.validation` (evaluation during
training, best checkpoints, early stopping). The most used names are also here at the top level.
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
    validation,
    variables,
)
from torchslim.checkpoint import Saver, best_checkpoint, latest_checkpoint
from torchslim.evaluation import evaluate_once, evaluation_loop
from torchslim.learning import GlobalStep, NonFiniteError, TrainOp, create_train_op, register_update_op, train
from torchslim.validation import Validation, Watch

__version__ = "0.1.0"

__all__ = [
    "GlobalStep",
    "NonFiniteError",
    "Saver",
    "TrainOp",
    "Validation",
    "Watch",
    "best_checkpoint",
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
    "validation",
    "variables",
]
