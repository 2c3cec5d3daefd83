"""Writing the benchmarks' JSON reports: one format for every script."""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch


def finite(value):
    """``value`` with every NaN or infinity as None: JSON has no such numbers,
    and strict parsers reject the ``NaN`` that ``json`` writes by default."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


def options(args: argparse.Namespace) -> dict:
    """A script's parsed options as JSON values (paths and devices as text)."""
    return {k: str(v) if isinstance(v, (Path, torch.device)) else v for k, v in vars(args).items()}


def dumps(report) -> str:
    return json.dumps(finite(report), indent=1, allow_nan=False)


def write(path: str | Path, report) -> Path:
    """``report`` as JSON at ``path``, its folder made first."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(dumps(report) + "\n")
    return path
