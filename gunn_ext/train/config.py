"""What a training run is: its options and the paper's recipe as their defaults."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

from ..models import MODELS

DATASETS = ("cifar10", "cifar100", "imagenet", "digits")
AMP_MODES = ("none", "bf16", "fp16")

# Section 6.2 of the paper. CIFAR: 300 epochs, lr / 10 at epochs 150 and 225.
# ImageNet follows DenseNet: 90 epochs, lr / 10 at epochs 30 and 60.
# digits is a small offline smoke test (no flips: a mirrored digit is another digit).
RECIPES: dict[str, dict] = {
    "cifar10": dict(epochs=300, batch_size=64, milestones=(0.5, 0.75), flip=True, workers=2),
    "cifar100": dict(epochs=300, batch_size=64, milestones=(0.5, 0.75), flip=True, workers=2),
    "imagenet": dict(epochs=90, batch_size=256, milestones=(1 / 3, 2 / 3), flip=True, workers=8),
    "digits": dict(epochs=15, batch_size=32, milestones=(0.5, 0.75), flip=False, workers=0),
}

# Options that change no arithmetic: a resumed run keeps its own unless they are given anew.
RUNTIME_OPTIONS = frozenset({"data", "out", "workers", "threads", "progress", "plot", "log_every",
                             "checkpoint_every", "compile", "resume"})
RUNTIME_DEFAULTS = dict(progress=True, plot=False, log_every=50, checkpoint_every=0, compile=False)
# Recipe options added after runs were stored: what a stored run without one did.
ADDED_OPTIONS = dict(tf32=None)


@dataclass
class TrainConfig:
    """One training run. ``None`` fields take the dataset's recipe (:data:`RECIPES`)
    or :data:`RUNTIME_DEFAULTS`.

    ``batch_size`` is the global batch: with ``W`` processes each takes
    ``batch_size / W`` samples per step, so the recipe does not depend on ``W``.
    ``milestones`` are fractions of ``epochs`` where the learning rate is
    multiplied by ``lr_gamma``. ``train_samples`` trains on a fixed random
    subset of that size (quick smoke runs). ``tf32`` puts every float32
    product on the GPU in TF32 (:func:`gunn_ext.conventions.float32_products`),
    as PyTorch's convolutions are by default; False, all in IEEE float32;
    None leaves torch's switches as they are (runs stored before the option).
    """

    model: str = "gunn15"
    dataset: str = "digits"
    data: str | None = None
    out: str | None = None
    resume: str | None = None
    backend: str = "auto"
    width: float = 1.0
    segment_channels: int | None = None
    epochs: int | None = None
    batch_size: int | None = None
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-4
    milestones: tuple[float, ...] | None = None
    lr_gamma: float = 0.1
    augment: bool = True
    flip: bool | None = None
    seed: int = 0
    train_samples: int | None = None
    workers: int | None = None
    threads: int | None = None
    device: str = "auto"
    amp: str = "none"
    channels_last: bool = False
    tf32: bool | None = True
    compile: bool | None = None
    sync_bn: bool = False
    deterministic: bool = False
    progress: bool | None = None
    plot: bool | None = None
    log_every: int | None = None
    checkpoint_every: int | None = None

    def resolved(self) -> TrainConfig:
        """A copy with the recipe's defaults filled in and every value checked."""
        _check_choice("dataset", self.dataset, DATASETS)
        _check_choice("model", self.model, sorted(MODELS))
        _check_choice("amp", self.amp, AMP_MODES)
        defaults = {**RECIPES[self.dataset], **RUNTIME_DEFAULTS}
        filled = dataclasses.replace(self, **{k: v for k, v in defaults.items()
                                              if getattr(self, k) is None})
        filled.milestones = tuple(float(m) for m in filled.milestones)
        filled.out = str(Path(filled.out or default_out(filled.model, filled.dataset)).expanduser())
        filled.check()
        return filled

    def check(self) -> None:
        _check_int("epochs", self.epochs, minimum=1)
        _check_int("batch_size", self.batch_size, minimum=1)
        _check_int("workers", self.workers, minimum=0)
        _check_int("log_every", self.log_every, minimum=0)
        _check_int("checkpoint_every", self.checkpoint_every, minimum=0)
        _check_int("seed", self.seed, minimum=0)
        if self.threads is not None:
            _check_int("threads", self.threads, minimum=1)
        if self.train_samples is not None:
            _check_int("train_samples", self.train_samples, minimum=1)
        if self.segment_channels is not None:
            _check_int("segment_channels", self.segment_channels, minimum=1)
        for name in ("lr", "width"):
            if not 0 < getattr(self, name) < math.inf:
                raise ValueError(f"{name} must be a finite number > 0, got {getattr(self, name)!r}")
        for name in ("momentum", "weight_decay", "lr_gamma"):
            if not 0 <= getattr(self, name) < math.inf:
                raise ValueError(f"{name} must be a finite number >= 0, got {getattr(self, name)!r}")
        if not all(0 < m <= 1 for m in self.milestones):
            raise ValueError(f"milestones must be fractions of the epochs in (0, 1], "
                             f"got {list(self.milestones)}")
        if self.dataset in ("imagenet",) and self.data is None:
            raise ValueError(f"dataset {self.dataset!r} needs --data (an ImageFolder root)")
        if self.dataset.startswith("cifar") and self.data is None:
            raise ValueError(f"dataset {self.dataset!r} needs --data (the folder holding "
                             f"the unpacked python-version archive)")

    def milestone_epochs(self) -> list[int]:
        """Epochs (0-based, at whose start) the learning rate drops; never before
        the first epoch, which trains at ``lr`` (a milestone of a short run
        that rounds to epoch 0 moves to epoch 1)."""
        return [max(1, round(m * self.epochs)) for m in self.milestones]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        config = cls(**{k: v for k, v in {**ADDED_OPTIONS, **values}.items() if k in known})
        if config.milestones is not None:
            config.milestones = tuple(config.milestones)
        return config


def default_out(model: str, dataset: str) -> str:
    return str(Path("runs") / f"{model}_{dataset}")


def _check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")


def _check_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
