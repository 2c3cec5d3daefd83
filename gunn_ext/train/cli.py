"""``python -m gunn_ext.train``: train a model, or ``... plot RUN [RUN ...]``."""
from __future__ import annotations

import argparse
import signal
import sys

from .. import backends
from ..extras import MissingExtra
from ..models import MODELS
from . import checkpoint
from .config import ADDED_OPTIONS, AMP_MODES, DATASETS, RECIPES, RUNTIME_OPTIONS, TrainConfig, default_out
from .trainer import SetupError, fit

EPILOG = """\
defaults follow the paper (section 6.2): SGD, momentum 0.9 without dampening, weight decay 1e-4,
lr 0.1 divided by 10 at 50% and 75% of the epochs (ImageNet: 1/3 and 2/3 of 90), global batch 64
(ImageNet 256), random crop + flip, per-channel normalisation.

examples:
  python -m gunn_ext.train --model gunn15 --dataset digits --width 0.25 --epochs 6
  python -m gunn_ext.train --model gunn15 --dataset cifar10 --data ~/data --out runs/gunn15_c10 --plot
  torchrun --nproc_per_node 4 -m gunn_ext.train --model gunn24 --dataset cifar100 --data ~/data --amp bf16
  python -m gunn_ext.train --resume runs/gunn15_c10
  python -m gunn_ext.train plot runs/sunn15_c10 runs/gunn15_c10 --output figure3.png

SIGTERM / Ctrl-C finish the current step, save the checkpoint and exit with 128 + the signal
number; a second Ctrl-C aborts without saving."""


def train_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m gunn_ext.train", epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                description="Train a GUNN/SUNN network (one process, or many under torchrun).")
    what = p.add_argument_group("what to train")
    what.add_argument("--model", choices=sorted(MODELS), help="network (default gunn15)")
    what.add_argument("--dataset", choices=DATASETS, help="default digits")
    what.add_argument("--data", help="dataset folder: CIFAR's unpacked python archive parent, or an "
                                     "ImageFolder root with train/ and val/")
    what.add_argument("--backend", choices=["auto", *backends.NAMES], help="GUNN layer backend (default auto)")
    what.add_argument("--width", type=float, help="channel multiplier (default 1.0 = the paper's)")
    what.add_argument("--segment-channels", type=int, metavar="N",
                      help="channels per segment in every GUNN/SUNN layer (default: the paper's "
                           "segments; 1 = one channel per segment, P = N)")
    recipe = p.add_argument_group("recipe (defaults: the paper's, per dataset)")
    recipe.add_argument("--epochs", type=int, help=", ".join(f"{k} {v['epochs']}" for k, v in RECIPES.items()))
    recipe.add_argument("--batch-size", type=int, help="global batch, split over the processes")
    recipe.add_argument("--lr", type=float, help="initial learning rate (0.1)")
    recipe.add_argument("--momentum", type=float, help="SGD momentum, no dampening (0.9)")
    recipe.add_argument("--weight-decay", type=float, help="(1e-4)")
    recipe.add_argument("--milestones", type=float, nargs="+", metavar="FRACTION",
                        help="fractions of the epochs where lr *= --lr-gamma (0.5 0.75)")
    recipe.add_argument("--lr-gamma", type=float, help="(0.1)")
    recipe.add_argument("--augment", action=argparse.BooleanOptionalAction, help="crop (+flip) (on)")
    recipe.add_argument("--flip", action=argparse.BooleanOptionalAction,
                        help="random horizontal flips (on; off for digits)")
    recipe.add_argument("--seed", type=int, help="(0)")
    recipe.add_argument("--train-samples", type=int, metavar="N",
                        help="train on a fixed random subset of N samples (quick smoke runs)")
    run = p.add_argument_group("running")
    run.add_argument("--out", help="run folder: checkpoint.pt, metrics.jsonl, config.json, curves.png "
                                   "(default runs/<model>_<dataset>)")
    run.add_argument("--resume", nargs="?", const="", metavar="RUN",
                     help="continue the run in RUN (folder or checkpoint file; default --out) exactly "
                          "where it stopped, with its own recipe")
    run.add_argument("--device", help="auto (default), cpu, cuda, cuda:N")
    run.add_argument("--workers", type=int, help="data-loading processes per rank")
    run.add_argument("--threads", type=int, help="CPU threads for torch (torch.set_num_threads)")
    run.add_argument("--amp", choices=AMP_MODES, help="autocast dtype (none)")
    run.add_argument("--channels-last", action=argparse.BooleanOptionalAction, help="NHWC memory format")
    run.add_argument("--tf32", action=argparse.BooleanOptionalAction,
                     help="every float32 product on the GPU in TF32, the GUNN layers' GEMMs as cuDNN's "
                          "convolutions (on; --no-tf32: IEEE float32 everywhere)")
    run.add_argument("--compile", action=argparse.BooleanOptionalAction, help="torch.compile the model")
    run.add_argument("--sync-bn", action=argparse.BooleanOptionalAction,
                     help="SyncBatchNorm for the stem/transition/head BatchNorms (CUDA; GUNN layers keep "
                          "per-rank statistics)")
    run.add_argument("--deterministic", action=argparse.BooleanOptionalAction,
                     help="torch.use_deterministic_algorithms")
    run.add_argument("--progress", action=argparse.BooleanOptionalAction, help="progress bar (on)")
    run.add_argument("--plot", action=argparse.BooleanOptionalAction, help="write curves.png every epoch")
    run.add_argument("--log-every", type=int, help="steps between 'train' records in metrics.jsonl (50)")
    run.add_argument("--checkpoint-every", type=int, help="also checkpoint every N steps (0: epochs only)")
    return p


def plot_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m gunn_ext.train plot",
                                description="Training curves of one run, or several runs compared.")
    p.add_argument("runs", nargs="+", metavar="RUN", help="run folders (holding metrics.jsonl)")
    p.add_argument("--output", "-o", help="PNG path (default RUN/curves.png, or comparison.png)")
    p.add_argument("--labels", nargs="+", help="legend labels, one per run")
    return p


def config_from_args(args: argparse.Namespace) -> tuple[TrainConfig, set[str]]:
    """The configuration and the names of the options given on the command line."""
    given = {k: v for k, v in vars(args).items() if v is not None}
    if "milestones" in given:
        given["milestones"] = tuple(given["milestones"])
    return TrainConfig(**given), set(given)


def check_resume_conflicts(config: TrainConfig, given: set[str]) -> None:
    """A resumed run keeps its recipe: options that would change it are errors."""
    try:
        stored = checkpoint.stored_config(config.resume)
    except (OSError, ValueError) as exc:
        raise SetupError(str(exc)) from exc
    for name in sorted(given - RUNTIME_OPTIONS):
        value, before = getattr(config, name), stored.get(name, ADDED_OPTIONS.get(name))
        if isinstance(before, list):
            before = tuple(before)
        if value != before:
            flag = "--" + name.replace("_", "-")
            raise SetupError(f"{flag}={value!r} differs from the resumed run's {before!r}; a resumed run "
                             f"keeps its recipe (start a new run with another --out to change it)")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["plot"]:
        return plot_main(argv[1:])
    parser = train_parser()
    config, given = config_from_args(parser.parse_args(argv))
    try:
        if config.resume == "":
            config.resume = config.out or default_out(config.model, config.dataset)
        if config.resume is not None:
            check_resume_conflicts(config, given)
        result = fit(config)
    except SetupError as exc:
        parser.error(str(exc))
    except MissingExtra as exc:
        return missing_extra(parser, exc)
    if result.stopped_by is None:
        return 0
    return 128 + getattr(signal.Signals, result.stopped_by, signal.SIGTERM)


def plot_main(argv: list[str]) -> int:
    from .plot import plot_comparison, plot_run

    parser = plot_parser()
    args = parser.parse_args(argv)
    try:
        if len(args.runs) == 1 and not args.labels:
            output = plot_run(args.runs[0], args.output)
        else:
            output = plot_comparison(args.runs, args.output or "comparison.png", args.labels)
    except (FileNotFoundError, ValueError) as exc:
        parser.error(str(exc))
    except MissingExtra as exc:
        return missing_extra(parser, exc)
    print(output)
    return 0


def missing_extra(parser: argparse.ArgumentParser, exc: MissingExtra) -> int:
    """One line, not a usage message: the options were right, a package is missing."""
    print(f"{parser.prog}: error: {exc}", file=sys.stderr)
    return 2
