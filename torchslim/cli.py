"""The ``torchslim`` command.

Subcommands:

* ``torchslim demo``: train a small CNN on scikit-learn's digits (the main job).
* ``torchslim inspect PATH``: print a checkpoint's tensors and metadata.
* ``torchslim export CKPT OUT.safetensors``: a checkpoint's model weights as one
  safetensors file, loadable into the plain model.
* ``torchslim analyze MODULE:FACTORY --input-shape 1,3,224,224``: print a model's
  variables, the ops of one forward pass, and parameters and FLOPs per module.
* ``torchslim eval LOGDIR [--watch]``: evaluate a logdir's latest checkpoint (or,
  with ``--watch``, each new one until training ends) on held-out data, printing
  the metrics and writing them as summaries into ``LOGDIR/eval``.

Each subcommand is a ``_add_<name>(subparsers)`` function that registers its
parser and sets ``run``; ``main`` only dispatches. The CLI uses the public API
only.
"""

from __future__ import annotations

import argparse
import os
import sys
import types
from collections.abc import Callable, Sequence
from typing import Any


def _load_module(name: str) -> types.ModuleType:
    import importlib
    import importlib.util
    import os

    if name.endswith(".py"):
        if not os.path.isfile(name):
            raise FileNotFoundError(f"MODULE {name!r} is not a file")
        spec = importlib.util.spec_from_file_location(os.path.basename(name)[:-3], name)
        if spec is None or spec.loader is None:
            raise ValueError(f"MODULE {name!r} cannot be loaded as a Python file")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    if os.getcwd() not in sys.path:  # as `python -m` would, so that ./models.py is found
        sys.path.insert(0, os.getcwd())
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        raise ValueError(f"MODULE {name!r} cannot be imported: {e}") from e


def _load_factory(spec: str) -> Callable[..., Any]:
    """The callable named by ``MODULE:FACTORY``."""
    module_name, _, factory_name = spec.rpartition(":")
    if not module_name or not factory_name:
        raise ValueError(f"MODULE:FACTORY must name a module and a callable in it, e.g. 'pkg.models:make', "
                         f"got {spec!r}")
    factory = getattr(_load_module(module_name), factory_name, None)
    if not callable(factory):
        raise ValueError(f"FACTORY {factory_name!r} is not a callable in {module_name!r}, got {factory!r:.80}")
    return factory


def _add_demo(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "demo",
        help="train a small CNN on scikit-learn's digits, resumable",
        description="Train a small CNN on scikit-learn's bundled 8x8 digits with a "
        "fixed train/held-out split, checkpointing into --logdir. Run it again "
        "and it continues from its latest checkpoint.",
    )
    p.add_argument("--logdir", default="runs/digits", help="where checkpoints go (default: %(default)s)")
    p.add_argument("--steps", type=int, default=1500, help="target global step (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")

    def run(args: argparse.Namespace) -> int:
        from torchslim import demo

        if args.steps < 1:
            raise ValueError(f"--steps must be a positive number of steps (the global step to train to), got {args.steps}")
        demo.main(logdir=args.logdir, number_of_steps=args.steps, seed=args.seed)
        return 0

    p.set_defaults(run=run)


def _add_inspect(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "inspect",
        help="print a checkpoint's tensors and metadata",
        description="Print the tensors (name, dtype, shape) and the metadata of a "
        "torchslim checkpoint, its format and checksum kind. PATH is a checkpoint, or a logdir (its latest "
        "checkpoint that reads back). The model's tensors are listed with their total; optimizer state, RNG "
        "states and the data position are folded into one line per group unless --all.",
    )
    p.add_argument("path")
    p.add_argument("--all", action="store_true", dest="show_all",
                   help="list every tensor and value, the optimizer's and RNG states' too")

    def run(args: argparse.Namespace) -> int:
        from torchslim import checkpoint

        # A corrupt file: CorruptCheckpointError, one line from main().
        print(checkpoint.describe(args.path, show_all=args.show_all))
        return 0

    p.set_defaults(run=run)


def _add_export(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "export",
        help="write a checkpoint's model weights as one safetensors file",
        description="Write the model weights of a torchslim checkpoint (written by one process, by DDP or by "
        "FSDP) into one safetensors file, under the model's state_dict names: "
        "model.load_state_dict(safetensors.torch.load_file(OUT)) loads it into the plain model. CKPT is a "
        "checkpoint, or a logdir (its latest checkpoint). OUT is written aside and renamed into place.",
    )
    p.add_argument("checkpoint", metavar="CKPT")
    p.add_argument("out", metavar="OUT.safetensors")
    p.add_argument("--best", action="store_true",
                   help="CKPT is a logdir: export its best checkpoint by the metric its run watched, not the latest")

    def run(args: argparse.Namespace) -> int:
        from torchslim import checkpoint

        if not args.out.endswith(".safetensors"):
            raise ValueError(f"OUT must be a file name ending in .safetensors, got {args.out!r}")
        source = args.checkpoint
        if args.best:
            if not os.path.isdir(source):
                raise ValueError(f"--best takes a logdir, got {source!r}")
            source = checkpoint.best_checkpoint(source)
            if source is None:
                raise ValueError(f"no checkpoint in {args.checkpoint!r} has a value of the metric its run watched")
        found = checkpoint.restore(source)  # a logdir: its newest checkpoint that reads back
        if found is None:
            raise ValueError(f"{args.checkpoint!r} is neither a torchslim checkpoint nor a logdir holding one")
        path, state = found
        step = checkpoint.read_metadata(path)["global_step"]
        weights = state["model"]
        _write_safetensors(weights, args.out)
        print(f"wrote {len(weights)} tensors ({sum(t.numel() for t in weights.values()):,} values) of {path} "
              f"(global step {step}) to {args.out}")
        return 0

    p.set_defaults(run=run)


def _write_safetensors(tensors: dict[str, Any], out: str) -> None:
    """``tensors`` into ``out`` by a rename (a crash leaves no half file); tied tensors are stored once each."""
    from safetensors.torch import save_file

    seen: set[int] = set()
    plain = {}
    for name, t in tensors.items():
        shared = t.untyped_storage().data_ptr() in seen
        seen.add(t.untyped_storage().data_ptr())
        plain[name] = t.clone() if shared or not t.is_contiguous() else t
    tmp = f"{out}.tmp-{os.getpid()}"
    try:
        save_file(plain, tmp)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _add_analyze(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "analyze",
        help="print a model's variables, the ops of one forward pass, and FLOPs per module",
        description="Build a model by calling FACTORY from MODULE (an importable module path, looked "
        "up from the current directory too, or a .py file), run one forward pass on random inputs of the "
        "given shapes, and print its variables, every op it ran, and a per-module table of parameters, "
        "output elements and FLOPs.",
    )

    def shape(text: str) -> tuple[int, ...]:
        try:
            dims = tuple(int(d) for d in text.split(","))
        except ValueError:
            dims = (-1,)
        if min(dims) < 0:
            raise argparse.ArgumentTypeError(f"expected non-negative integers separated by commas, got {text!r}")
        return dims

    p.add_argument("factory", metavar="MODULE:FACTORY", help="e.g. mypkg.models:resnet50 or models.py:make_model")
    p.add_argument("--input-shape", type=shape, action="append", required=True, metavar="N,C,H,W",
                   help="shape of one forward input; repeat it for a forward that takes several")
    p.add_argument("--dtype", action="append", metavar="DTYPE",
                   help="torch dtype of the inputs, once for all or once per input (default: float32)")
    p.add_argument("--train-mode", action="store_true", help="analyze in training mode (default: eval mode)")

    def run(args: argparse.Namespace) -> int:
        import torch

        from torchslim import model_analyzer

        model = _load_factory(args.factory)()
        if not isinstance(model, torch.nn.Module):
            raise ValueError(f"FACTORY {args.factory.rpartition(':')[2]!r} must return a torch.nn.Module, "
                             f"got {type(model).__name__}")
        shapes, names = args.input_shape, args.dtype or ["float32"]
        found = [getattr(torch, n, None) for n in (names * len(shapes) if len(names) == 1 else names)]
        dtypes = [d for d in found if isinstance(d, torch.dtype)]
        if len(dtypes) != len(shapes) or len(dtypes) != len(found):
            raise ValueError(f"--dtype takes torch dtype names (float32, bfloat16, int64, ...), once or once per "
                             f"--input-shape ({len(shapes)} given), got {names}")
        gen = torch.Generator().manual_seed(0)
        inputs = [torch.randn(s, dtype=d, generator=gen) if d.is_floating_point or d.is_complex
                  else torch.zeros(s, dtype=d) for s, d in zip(shapes, dtypes)]
        model.train(args.train_mode)
        try:
            report = model_analyzer.profile_ops(model, *inputs)
        except (TypeError, ValueError, RuntimeError, IndexError) as e:  # the model's own forward rejected the inputs
            given = " ".join(f"--input-shape {','.join(map(str, s))}" for s in shapes)
            raise ValueError(f"the model from {args.factory} cannot run on random inputs of {given}: "
                             f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e
        model_analyzer.analyze_vars(model, print_info=True, include_buffers=True)
        print(report.listing(), report.table(), sep="\n\n")
        return 0

    p.set_defaults(run=run)


def _add_eval(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "eval",
        help="evaluate a logdir's checkpoints on held-out data",
        description="Evaluate the latest checkpoint in LOGDIR (or, with --watch, each new one as training "
        "commits it, until the run's final checkpoint) and print the metrics; they are also written as "
        "summaries into LOGDIR/eval, beside the training curves in TensorBoard. The model and data default "
        "to the digits demo's; --model/--data name factories (MODULE:FACTORY) for others, evaluated for "
        "accuracy over (inputs, labels) batches. With --record, each checkpoint's metrics are also recorded in "
        "LOGDIR/evaluations.json, where a trainer given a watch (learning.train(watch=Watch('accuracy', ...))) "
        "reads them to keep its best checkpoints and to stop early.",
    )
    p.add_argument("logdir", metavar="LOGDIR")
    p.add_argument("--watch", action="store_true", help="keep evaluating new checkpoints until training ends")
    p.add_argument("--every-checkpoint", action="store_true", help="with --watch: evaluate every checkpoint, in order")
    p.add_argument("--interval", type=float, default=0.0, metavar="SECS",
                   help="with --watch: at most one evaluation per SECS (default: %(default)s)")
    p.add_argument("--timeout", type=float, metavar="SECS",
                   help="with --watch: also stop after SECS without a new checkpoint")
    p.add_argument("--record", action="store_true",
                   help="with --watch: record each checkpoint's metrics for the trainer (one recording evaluator "
                   "per LOGDIR; a restarted one goes on at the first checkpoint it has not recorded)")
    p.add_argument("--best", action="store_true",
                   help="without --watch: evaluate the run's best checkpoint (by its watched metric), not the latest")
    p.add_argument("--model", metavar="MODULE:FACTORY", help="the model (default: the digits demo's CNN)")
    p.add_argument("--data", metavar="MODULE:FACTORY", help="the batches (default: the demo's held-out digits)")

    def run(args: argparse.Namespace) -> int:
        import os

        import torch

        from torchslim import checkpoint, demo, evaluation, summaries

        if not args.watch and checkpoint.latest_checkpoint(args.logdir) is None:
            raise ValueError(f"LOGDIR {args.logdir!r} holds no checkpoint (use --watch to wait for one)")
        if args.record and not args.watch:
            raise ValueError("--record goes with --watch: it records each checkpoint evaluated for a live trainer")
        if args.best and args.watch:
            raise ValueError("--best evaluates one checkpoint, the best so far; it does not go with --watch")
        # A logdir: evaluate_once takes its newest checkpoint that reads back (checkpoint.restore's fallback).
        target = checkpoint.best_checkpoint(args.logdir) if args.best else args.logdir
        if target is None and not args.watch:
            raise ValueError(f"no checkpoint in LOGDIR {args.logdir!r} has a value of the metric its run watched")
        if args.model and not args.data:
            raise ValueError(f"--model {args.model} needs --data MODULE:FACTORY, its held-out batches: the default data "
                             "are the digits demo's, for the demo's model only")
        model = _load_factory(args.model)() if args.model else demo.make_model()
        if not isinstance(model, torch.nn.Module):
            raise ValueError(f"--model {args.model!r} must return a torch.nn.Module, got {type(model).__name__}")
        data = _load_factory(args.data)() if args.data else demo.held_out_data()
        metrics = {"accuracy": demo.accuracy} if args.model or args.data else demo.eval_metrics()

        class Printer(summaries.NullWriter):  # one line per evaluation: the scalars of its global step
            def __init__(self) -> None:
                self.step: int | None = None
                self.scalars: dict[str, float] = {}

            def add_scalar(self, tag: str, value: float, step: int) -> None:
                self.step, self.scalars[tag] = step, value

            def flush(self) -> None:
                if self.scalars:
                    shown = ", ".join(f"{k} {v:.4f}" for k, v in self.scalars.items())
                    print(f"global step {self.step}: {shown}", flush=True)
                self.scalars = {}

        eval_dir = os.path.join(args.logdir, "eval")
        writer = summaries.MultiWriter(summaries.default_writer(eval_dir), Printer())
        try:
            if not args.watch:
                evaluation.evaluate_once(target, eval_dir, model, data,
                                         metrics=metrics, summary_writer=writer)
                return 0
            finished = evaluation.stop_when_training_ends(args.logdir)
            evaluation.evaluation_loop(
                args.logdir, eval_dir, model, data, metrics=metrics, summary_writer=writer,
                eval_interval_secs=args.interval, every_checkpoint=args.every_checkpoint,
                timeout=2.0 if args.timeout is None else args.timeout,
                timeout_fn=lambda: finished() or args.timeout is not None, record=args.record)
            return 0
        finally:
            writer.close()

    p.set_defaults(run=run)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``torchslim`` command with ``argv`` (default: the process's arguments); return its exit status.

    A mistake of the user's (a bad argument, a missing or corrupt checkpoint, a
    file that cannot be read) is printed as one line and returns 2.
    """
    parser = argparse.ArgumentParser(
        prog="torchslim",
        description="torchslim: TF-Slim's training system for PyTorch. Train the demo, inspect a checkpoint, "
        "analyze a model's ops and variables, or evaluate a run's checkpoints.",
        epilog="`torchslim COMMAND --help` describes each command.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_demo, _add_inspect, _add_export, _add_analyze, _add_eval):
        add(subparsers)
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except BrokenPipeError:  # `torchslim inspect ... | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit's flush
        return 0
    except (ValueError, TypeError, OSError, ArithmeticError) as e:  # torchslim's errors, and the file system's
        print(f"torchslim {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
