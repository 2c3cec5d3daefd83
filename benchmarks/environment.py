"""The environment of a benchmark run, as JSON: versions, GPU, commit, what gunn_ext loaded.

    python benchmarks/environment.py RESULTS_DIR/environment.json

Prints the same JSON. A gunn_ext that fails to import is recorded, not fatal:
the tests that follow say more.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

REPOSITORY = Path(__file__).resolve().parent.parent


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                             cwd=REPOSITORY, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def collect() -> dict:
    info = {"date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "cuda_arch_list": os.environ.get("TORCH_CUDA_ARCH_LIST"), "git_commit": git_commit()}
    try:
        import triton
        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    try:
        from gunn_ext import cuda_graphs, ops
        info["gunn_ext_load_error"] = ops.load_error()
        info["gunn_ext_cuda_kernels"] = ops.has_cuda_kernels()
        info["cuda_graphs"] = cuda_graphs.enabled()
    except Exception as exc:  # recorded, not fatal
        info["gunn_ext_load_error"] = repr(exc)
    return info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("output", type=Path, help="JSON file to write")
    args = parser.parse_args(argv)
    text = json.dumps(collect(), indent=1)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
