"""The training loop: SGD over epochs, evaluation, checkpoints, graceful stops.

A run is a sequence of optimizer steps whose data depends only on
``(seed, epoch, position in the epoch)`` (see :mod:`.data`), and whose state
after any step is what a checkpoint holds (see :mod:`.checkpoint`). Stopping
after a step and resuming from its checkpoint therefore repeats, bit for bit,
what an uninterrupted run computes.

SIGTERM and SIGINT do not kill the run: the current step finishes, every
rank agrees to stop there, the checkpoint is written, and :func:`fit` returns
with ``stopped_by`` set. A second SIGINT aborts at once.
"""
from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import threading
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from .. import backends, conventions
from ..extras import require
from ..models import build_model
from . import checkpoint, distributed
from .config import RUNTIME_OPTIONS, TrainConfig
from .data import ResumableSampler, ShardSampler, load_data, make_loader
from .metrics import MetricsLog, Progress
from .plot import PLOT_FEATURE

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Position:
    """Where a run is: ``step`` optimizer steps into ``epoch`` (both 0-based),
    and the epoch's training sums so far (over all ranks)."""

    epoch: int = 0
    step: int = 0
    global_step: int = 0
    loss_sum: float = 0.0
    correct: int = 0
    seen: int = 0
    train_seconds: float = 0.0


@dataclass
class FitResult:
    model: nn.Module
    config: TrainConfig
    position: Position
    history: list[dict] = field(default_factory=list)
    stopped_by: str | None = None

    @property
    def final_test_accuracy(self) -> float | None:
        return self.history[-1]["test_acc"] if self.history else None


class StopRequest:
    """Turns SIGTERM/SIGINT into a flag the loop checks after every step."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.signal_name: str | None = None
        self._previous: dict = {}

    def _handle(self, signum, _frame) -> None:
        if self.signal_name is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal_name = signal.Signals(signum).name

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    @property
    def requested(self) -> bool:
        return self.signal_name is not None


def merge_resumed(stored: dict, given: TrainConfig) -> TrainConfig:
    """The stored run's configuration with the runtime options of ``given``."""
    config = TrainConfig.from_dict(stored)
    for name in RUNTIME_OPTIONS:
        value = getattr(given, name)
        if value is not None:
            setattr(config, name, value)
    return config


class SetupError(ValueError):
    """The run cannot start: a bad option, or data or a checkpoint that is not there."""


def fit(config: TrainConfig, on_step: Callable[[Position], None] | None = None) -> FitResult:
    """Train as ``config`` says; resume first if ``config.resume`` is set.

    On resume the checkpoint's configuration is used, except the options in
    :data:`~gunn_ext.train.config.RUNTIME_OPTIONS`. ``on_step`` is called after
    every optimizer step with the current :class:`Position`.
    """
    try:
        context = distributed.setup(config.device)
    except (ValueError, RuntimeError) as exc:
        raise SetupError(f"device {config.device!r}: {exc}") from exc
    try:
        try:
            run = _Run(config, context, on_step)
        except (ValueError, OSError) as exc:
            raise SetupError(str(exc)) from exc
        with conventions.float32_products(run.config.tf32):
            return run.fit()
    finally:
        distributed.teardown(context)


class _Run:
    def __init__(self, config: TrainConfig, context: distributed.Context, on_step):
        self.context, self.on_step = context, on_step
        self.resumed = checkpoint.load(config.resume) if config.resume else None
        # A resumed run goes on in its checkpoint's folder unless --out names another.
        self.resumed_file = checkpoint.resolve(config.resume) if self.resumed is not None else None
        if self.resumed is not None:
            out = config.out
            config = merge_resumed(self.resumed["config"], config)
            config.out = out if out is not None else str(self.resumed_file.parent)
        self.config = config = config.resolved()
        self.run_dir = Path(config.out)
        if self.run_dir.exists() and not self.run_dir.is_dir():
            raise NotADirectoryError(f"--out {str(self.run_dir)!r} is a file, not a folder")
        if (self.run_dir / checkpoint.FILENAME).exists() and not self._continues(self.run_dir):
            raise FileExistsError(f"--out {str(self.run_dir)!r} already holds a checkpoint; continue it "
                                  f"with --resume {self.run_dir} or choose another --out")
        if config.batch_size % context.world_size:
            raise ValueError(f"batch_size={config.batch_size} (the global batch) must be divisible by "
                             f"the number of processes, {context.world_size}")
        if config.sync_bn and context.device.type != "cuda":
            raise ValueError("--sync-bn needs CUDA devices (nn.SyncBatchNorm has no CPU kernel)")
        if config.amp == "fp16" and context.device.type != "cuda":
            raise ValueError("--amp fp16 needs a CUDA device; use --amp bf16 on the CPU")
        if config.plot and context.is_main:
            require("matplotlib", "train", PLOT_FEATURE)
        backends.resolve(config.backend, context.device.type)
        self.batch = config.batch_size // context.world_size
        if config.threads is not None:
            torch.set_num_threads(config.threads)
        self._seed_everything(config.seed)
        self.data = load_data(config)
        self._build_model()
        self.position = Position()
        if self.resumed is not None:
            self._restore(self.resumed)
        self.train_sampler = ResumableSampler(self.data.train, context.world_size, context.rank, config.seed)
        self.steps_per_epoch = self.train_sampler.num_samples // self.batch
        if self.steps_per_epoch < 1:
            raise ValueError(f"batch_size={config.batch_size} is larger than the training set "
                             f"({len(self.data.train)} samples)")
        self.test_loader = make_loader(self.data.test, ShardSampler(len(self.data.test), context.world_size,
                                                                    context.rank),
                                       self.batch, config.workers, self.pin_memory, drop_last=False)
        self.log = MetricsLog(self.run_dir, context.is_main)
        self.history: list[dict] = []
        if context.is_main:  # last: a run that cannot start leaves no folder behind
            self.run_dir.mkdir(parents=True, exist_ok=True)

    def _continues(self, folder: Path) -> bool:
        """Whether this run resumes the run of ``folder``: from its checkpoint,
        or from another file there when it holds none."""
        if self.resumed_file is None:
            return False
        own = folder / checkpoint.FILENAME
        if own.exists():
            return os.path.samefile(own, self.resumed_file)
        return folder.resolve() == self.resumed_file.parent.resolve()

    # --- setup -------------------------------------------------------------------------------

    @staticmethod
    def _seed_everything(seed: int) -> None:
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)

    @property
    def pin_memory(self) -> bool:
        return self.context.device.type == "cuda"

    def _build_model(self) -> None:
        config, context = self.config, self.context
        if config.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
            torch.backends.cudnn.benchmark = False
        model = build_model(config.model, num_classes=self.data.num_classes, backend=config.backend,
                            width=config.width, in_channels=self.data.channels,
                            segment_channels=config.segment_channels)
        self.sync_bn_layers = distributed.convert_sync_batchnorm(model) if config.sync_bn else []
        model.to(context.device)
        if config.channels_last:
            model.to(memory_format=torch.channels_last)
        self.model = model
        self.optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                                         dampening=0.0, weight_decay=config.weight_decay, nesterov=False)
        self.scheduler = torch.optim.lr_scheduler.MultiStepLR(
            self.optimizer, milestones=config.milestone_epochs(), gamma=config.lr_gamma)
        self.scaler = torch.amp.GradScaler(context.device.type, enabled=config.amp == "fp16")
        train_model = model
        if context.distributed:
            device_ids = [context.device.index] if context.device.type == "cuda" else None
            train_model = DistributedDataParallel(model, device_ids=device_ids)
        self.train_model = torch.compile(train_model) if config.compile else train_model
        self.eval_model = torch.compile(model) if config.compile else model

    def _restore(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        saved = Position(**state["position"])
        rngs, rank = state["rng"], self.context.rank
        if saved.step and len(rngs) != self.context.world_size:
            raise ValueError(f"the checkpoint was taken mid-epoch with {len(rngs)} processes; resume it "
                             f"with the same number (now {self.context.world_size}), or from an epoch's end")
        checkpoint.set_rng_state(rngs[min(rank, len(rngs) - 1)])
        if not self.context.is_main:  # the epoch's sums so far are counted once, on rank 0
            saved.loss_sum, saved.correct, saved.seen = 0.0, 0, 0
        self.position = saved

    # --- the loop ----------------------------------------------------------------------------

    def autocast(self):
        if self.config.amp == "none":
            return contextlib.nullcontext()
        return torch.autocast(self.context.device.type, dtype=AMP_DTYPES[self.config.amp])

    def _to_device(self, images: torch.Tensor, labels: torch.Tensor):
        images = images.to(self.context.device, non_blocking=True)
        if self.config.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return images, labels.to(self.context.device, non_blocking=True)

    def fit(self) -> FitResult:
        config, position = self.config, self.position
        if self.context.is_main:
            (self.run_dir / "config.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n")
            if self.resumed is None:  # a new log, not one left by a run without a checkpoint
                self.log.start()
            else:
                if not self._continues(self.run_dir):  # into another folder: a run's log so far comes along
                    source = self.resumed_file.parent / self.log.path.name
                    self.log.start(copy_from=source if self.resumed_file.name == checkpoint.FILENAME else None)
                self.log.truncate_after(position.global_step, position.epoch)
            self._announce()
        with StopRequest() as stop:
            while self.position.epoch < config.epochs:
                if self._train_epoch(stop):
                    return self._stop(stop)
                self._end_epoch()
                if distributed.any_rank(self.context, stop.requested):
                    return self._stop(stop)
        return FitResult(self.model, config, self.position, self.history)

    def _train_epoch(self, stop: StopRequest) -> bool:
        """Train the rest of the current epoch; True if a stop was requested."""
        config, position, context = self.config, self.position, self.context
        self.train_sampler.set_epoch(position.epoch)
        self.train_sampler.set_start(position.step * self.batch)
        loader = make_loader(self.data.train, self.train_sampler, self.batch, config.workers,
                             self.pin_memory, drop_last=True, seed=config.seed + position.epoch)
        sums = torch.tensor([position.loss_sum, position.correct, position.seen],
                            dtype=torch.float64, device=context.device)
        global_batch = self.batch * context.world_size
        progress = Progress(context.is_main and config.progress, position.epoch, config.epochs,
                            self.steps_per_epoch * global_batch, position.step * global_batch)
        self.train_model.train()
        lr = self.optimizer.param_groups[0]["lr"]
        started = time.perf_counter()
        try:
            for images, labels in loader:
                images, labels = self._to_device(images, labels)
                loss, correct = self._step(images, labels)
                sums[0] += loss.detach().double() * len(labels)
                sums[1] += correct
                sums[2] += len(labels)
                position.step += 1
                position.global_step += 1
                if self.on_step is not None:
                    self.on_step(position)
                report = position.step % 10 == 0 or position.step == self.steps_per_epoch
                if report or (config.log_every and position.global_step % config.log_every == 0):
                    loss_sum, correct_sum, seen = distributed.all_reduce_sum(context, sums).tolist()
                    postfix = dict(loss=f"{loss_sum / seen:.4f}", acc=f"{correct_sum / seen:.4f}",
                                   lr=f"{lr:.3g}")
                    if config.log_every and position.global_step % config.log_every == 0:
                        self.log.write(dict(kind="train", epoch=position.epoch + 1, step=position.step,
                                            global_step=position.global_step, lr=lr,
                                            loss=loss_sum / seen, acc=correct_sum / seen))
                else:
                    postfix = {}
                progress.update(global_batch, **postfix)
                stopping = distributed.any_rank(context, stop.requested)
                interval = config.checkpoint_every and position.global_step % config.checkpoint_every == 0
                if stopping or interval:
                    self._record_sums(sums, time.perf_counter() - started)
                    started = time.perf_counter()
                    self._save("signal" if stopping else "interval")
                if stopping:
                    return True
        finally:
            progress.close()
        self._record_sums(sums, time.perf_counter() - started)
        return False

    def _step(self, images: torch.Tensor, labels: torch.Tensor):
        with self.autocast():
            logits = self.train_model(images)
            loss = F.cross_entropy(logits, labels)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return loss, (logits.argmax(1) == labels).sum()

    def _record_sums(self, local_sums: torch.Tensor, seconds: float) -> None:
        """Put the epoch's sums over all ranks in the position (rank 0's local sums
        carry what a resumed checkpoint held, the other ranks' start from zero)."""
        total = distributed.all_reduce_sum(self.context, local_sums).tolist()
        self.position.loss_sum, self.position.correct, self.position.seen = total[0], int(total[1]), int(total[2])
        self.position.train_seconds += seconds

    @torch.no_grad()
    def evaluate(self) -> tuple[float, float]:
        """Test loss and accuracy over the whole test set (all ranks)."""
        self.eval_model.eval()
        sums = torch.zeros(3, dtype=torch.float64, device=self.context.device)
        for images, labels in self.test_loader:
            images, labels = self._to_device(images, labels)
            with self.autocast():
                logits = self.eval_model(images)
            sums[0] += F.cross_entropy(logits.float(), labels, reduction="sum").double()
            sums[1] += (logits.argmax(1) == labels).sum()
            sums[2] += len(labels)
        loss_sum, correct, count = distributed.all_reduce_sum(self.context, sums).tolist()
        return loss_sum / count, correct / count

    def _end_epoch(self) -> None:
        position = self.position
        test_loss, test_acc = self.evaluate()
        lr = self.optimizer.param_groups[0]["lr"]
        record = dict(kind="epoch", epoch=position.epoch + 1, global_step=position.global_step, lr=lr,
                      train_loss=position.loss_sum / position.seen, train_acc=position.correct / position.seen,
                      test_loss=test_loss, test_acc=test_acc, train_seconds=position.train_seconds,
                      images_per_s=position.seen / max(position.train_seconds, 1e-9))
        self.history.append(record)
        self.log.write(record)
        if self.context.is_main:
            print(f"epoch {record['epoch']}/{self.config.epochs}: train loss {record['train_loss']:.4f} "
                  f"acc {record['train_acc']:.4f} | test loss {test_loss:.4f} acc {test_acc:.4f} | "
                  f"{record['images_per_s']:.0f} img/s", flush=True)
        with warnings.catch_warnings():
            # Resumed after an epoch's last step, this process has taken no
            # optimizer step yet: the epoch's steps ran before the checkpoint.
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)` before")
            self.scheduler.step()
        self.position = Position(epoch=position.epoch + 1, global_step=position.global_step)
        self._save("epoch")
        if self.config.plot and self.context.is_main:
            from .plot import plot_run
            plot_run(self.run_dir)

    def _save(self, reason: str) -> None:
        rngs = distributed.all_gather_objects(self.context, checkpoint.rng_state())
        if self.context.is_main:
            checkpoint.save_atomic(dict(
                format=checkpoint.FORMAT, reason=reason, config=self.config.to_dict(),
                model=self.model.state_dict(), optimizer=self.optimizer.state_dict(),
                scheduler=self.scheduler.state_dict(), scaler=self.scaler.state_dict(),
                rng=rngs, position=asdict(self.position), world_size=self.context.world_size,
            ), self.run_dir / checkpoint.FILENAME)
        distributed.barrier(self.context)

    def _stop(self, stop: StopRequest) -> FitResult:
        position = self.position
        name = stop.signal_name or "a signal on another rank"
        self.log.write(dict(kind="stopped", signal=name, epoch=position.epoch + 1, step=position.step,
                            global_step=position.global_step))
        if self.context.is_main:
            print(f"stopped by {name} after step {position.step} of epoch {position.epoch + 1}; "
                  f"checkpoint saved: resume with --resume {self.run_dir}", flush=True)
        return FitResult(self.model, self.config, position, self.history, stopped_by=name)

    def _announce(self) -> None:
        config, context = self.config, self.context
        params = sum(p.numel() for p in self.model.parameters())
        where = f"{context.world_size} process(es) on {context.device.type}"
        resumed = (f", resumed at epoch {self.position.epoch + 1} step {self.position.step}"
                   if self.resumed is not None else "")
        segments = "" if config.segment_channels is None else f", {config.segment_channels}-channel segments"
        print(f"{config.model} (width {config.width}{segments}, {params:,} parameters, "
              f"backend {config.backend}) on "
              f"{config.dataset}: {len(self.data.train)} train / {len(self.data.test)} test images, "
              f"{config.epochs} epochs of {self.steps_per_epoch} steps, global batch {config.batch_size}, "
              f"{where}{resumed}; run folder {self.run_dir}", flush=True)
        if self.sync_bn_layers:
            print(f"SyncBatchNorm: {', '.join(self.sync_bn_layers)} (GUNN/SUNN layers keep per-rank "
                  f"statistics)", flush=True)
