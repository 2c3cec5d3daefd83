"""Checkpoints that survive a crash mid-write and resume a run exactly.

A checkpoint holds the model, optimizer, LR scheduler and gradient scaler
states, every rank's random-number-generator states, and the position in the
run: ``epoch``, ``step`` (optimizer steps done in that epoch; the sampler
restarts ``step * per_rank_batch`` samples into the epoch), ``global_step`` and
the epoch's running loss/accuracy sums.

It is written to a temporary file in the same folder, flushed to disk, then
moved over the old one with ``os.replace``, which is atomic: a reader sees the
old checkpoint or the new one, never half of one.
"""
from __future__ import annotations

import os
import pickle
import random
import tempfile
from pathlib import Path

import numpy as np
import torch

FORMAT = 1
FILENAME = "checkpoint.pt"


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_atomic(payload: dict, path: str | Path) -> None:
    """``torch.save`` to ``path`` through a temporary file and ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    umask = os.umask(0)
    os.umask(umask)
    os.fchmod(fd, 0o666 & ~umask)  # as open() would create it (mkstemp's is 0600)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_directory(path.parent)


def _fsync_directory(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def resolve(path: str | Path) -> Path:
    """A checkpoint file, given the file or the run folder holding it."""
    path = Path(path).expanduser()
    candidate = path / FILENAME if path.is_dir() else path
    if not candidate.is_file():
        raise FileNotFoundError(f"--resume {str(path)!r}: no checkpoint there "
                                f"(expected a checkpoint file or a run folder holding {FILENAME})")
    return candidate


def load(path: str | Path, map_location="cpu", mmap: bool = False) -> dict:
    """The checkpoint at ``path`` (a file or a run folder); a ValueError where it
    is not one (another file, or one cut short)."""
    path = resolve(path)
    try:
        payload = torch.load(path, map_location=map_location, weights_only=False, mmap=mmap)
    except (RuntimeError, EOFError, pickle.UnpicklingError) as exc:
        raise ValueError(f"{path} is not a readable gunn_ext training checkpoint ({exc})") from exc
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"{path} is not a gunn_ext training checkpoint (format {FORMAT})")
    return payload


def stored_config(path: str | Path) -> dict:
    """The configuration a checkpoint was trained with (memory-mapped: tensors stay on disk)."""
    return load(path, mmap=True)["config"]
