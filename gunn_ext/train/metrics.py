"""The metrics log (JSON lines) and the progress bar.

Each line of ``metrics.jsonl`` is one record: ``{"kind": "train", ...}`` every
``log_every`` steps, ``{"kind": "epoch", ...}`` after each evaluation, and
``{"kind": "stopped", ...}`` when a signal ends the run early. Every record
has ``global_step``; a resumed run first drops the records written after the
step its checkpoint was taken at, so the log never holds a step twice.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

from tqdm.auto import tqdm

FILENAME = "metrics.jsonl"


def read_records(path: str | Path) -> list[dict]:
    path = Path(path)
    if path.is_dir():
        path = path / FILENAME
    if not path.is_file():
        raise FileNotFoundError(f"no metrics log at {path}")
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


class MetricsLog:
    """Appends records to ``<run>/metrics.jsonl`` (the main process only writes)."""

    def __init__(self, run_dir: str | Path, enabled: bool):
        self.path = Path(run_dir) / FILENAME
        self.enabled = enabled

    def start(self, copy_from: Path | None = None) -> None:
        """A new log: empty, or a copy of ``copy_from`` where that exists."""
        if not self.enabled:
            return
        if copy_from is not None and copy_from.is_file():
            shutil.copyfile(copy_from, self.path)
        else:
            self.path.unlink(missing_ok=True)

    def truncate_after(self, global_step: int, epochs_done: int) -> None:
        """Keep only what a run resumed at ``global_step`` with ``epochs_done``
        epochs ended wrote (it rewrites the rest): records up to that step,
        but not an epoch's record from after its checkpoint was taken."""
        if not self.enabled or not self.path.is_file():
            return
        kept = [r for r in read_records(self.path)
                if (r["global_step"] < global_step
                    or (r["global_step"] == global_step and r["kind"] != "stopped"))
                and not (r["kind"] == "epoch" and r["epoch"] > epochs_done)]
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
        os.replace(tmp, self.path)

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


class Progress:
    """A tqdm bar over an epoch's images: loss, accuracy, lr; tqdm adds img/s and ETA."""

    def __init__(self, enabled: bool, epoch: int, epochs: int, total_images: int, done_images: int):
        self.bar = tqdm(total=total_images, initial=done_images, unit="img", unit_scale=True,
                        desc=f"epoch {epoch + 1}/{epochs}", disable=not enabled, file=sys.stderr,
                        dynamic_ncols=True, leave=True)

    def update(self, images: int, **postfix) -> None:
        if postfix:
            self.bar.set_postfix(postfix, refresh=False)
        self.bar.update(images)

    def close(self) -> None:
        self.bar.close()
