"""Builds gunn_ext._C against the torch that is installed (and will run it).

Environment switches:
  GUNN_EXT_CUDA=1 / 0    force / skip the CUDA kernels (default: build them when
                         torch has CUDA and nvcc is found, even with no GPU)
  TORCH_CUDA_ARCH_LIST   GPU architectures (default with no GPU visible: 8.0;9.0)
  GUNN_EXT_DEBUG=1       -O0 -g
"""
import glob
import os
import shutil
import sys
from pathlib import Path

import torch
from setuptools import setup
from torch.utils import cpp_extension

ROOT = Path(__file__).parent
DEFAULT_ARCHS = "8.0;9.0"


def find_cuda_home():
    """The CUDA toolkit root: CUDA_HOME, else the folder of the real nvcc."""
    if os.environ.get("CUDA_HOME"):
        return os.environ["CUDA_HOME"]
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return cpp_extension.CUDA_HOME
    candidates = [Path(nvcc).resolve().parent.parent]
    text = Path(nvcc).read_text(errors="ignore") if Path(nvcc).stat().st_size < 4096 else ""
    candidates += [Path(tok).parent.parent for tok in text.split() if tok.endswith("/bin/nvcc")]
    for root in candidates:
        if (root / "bin" / "nvcc").exists() and list(root.glob("lib*/libcudart.so*")):
            return str(root)
    return cpp_extension.CUDA_HOME


def want_cuda():
    switch = os.environ.get("GUNN_EXT_CUDA", "auto").lower()
    if switch in ("0", "false", "off", "no"):
        return False, "skipped (GUNN_EXT_CUDA=0)"
    if torch.version.cuda is None:
        if switch in ("1", "true", "on", "yes"):
            raise RuntimeError("GUNN_EXT_CUDA=1 but this torch has no CUDA support")
        return False, "torch has no CUDA support"
    cuda_home = find_cuda_home()
    if cuda_home is None or not Path(cuda_home, "bin", "nvcc").exists():
        if switch in ("1", "true", "on", "yes"):
            raise RuntimeError("GUNN_EXT_CUDA=1 but nvcc was not found (set CUDA_HOME)")
        return False, "nvcc not found (set CUDA_HOME)"
    os.environ["CUDA_HOME"] = cuda_home
    cpp_extension.CUDA_HOME = cuda_home
    return True, f"CUDA {torch.version.cuda}, toolkit {cuda_home}"


def openmp_flags():
    """-fopenmp where torch itself runs on OpenMP (Linux): at::parallel_for
    runs its tasks on torch's threads only in code compiled with OpenMP, and
    compiled without it runs every kernel on the calling thread."""
    if sys.platform != "linux" or not torch.backends.openmp.is_available():
        return []
    return ["-fopenmp"]


def extension():
    with_cuda, why = want_cuda()
    debug = os.environ.get("GUNN_EXT_DEBUG") == "1"
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    openmp = openmp_flags()
    cxx = (["-O0", "-g"] if debug else ["-O3"]) + openmp
    extra = {"cxx": cxx}
    if with_cuda:
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_ARCHS
        sources += sorted(glob.glob("csrc/cuda/*.cu") + glob.glob("csrc/cuda/*.cpp"))
        extra["cxx"] += ["-DGUNN_WITH_CUDA"]
        # -lineinfo: compute-sanitizer and profilers name the source line (no run-time cost).
        extra["nvcc"] = (["-O0", "-g", "-G"] if debug else ["-O3", "--use_fast_math", "-lineinfo"]) + [
            "-DGUNN_WITH_CUDA", "--expt-relaxed-constexpr"]
        ext_cls = cpp_extension.CUDAExtension
    else:
        ext_cls = cpp_extension.CppExtension
    archs = os.environ.get("TORCH_CUDA_ARCH_LIST", "") if with_cuda else ""
    print(f"gunn_ext: building against torch {torch.__version__}; CUDA kernels: "
          f"{'yes' if with_cuda else 'no'} ({why}){'; archs ' + archs if archs else ''}")
    write_build_info(with_cuda, archs)
    return ext_cls("gunn_ext._C", sources, extra_compile_args=extra,
                   extra_link_args=openmp)


def write_build_info(with_cuda, archs):
    (ROOT / "gunn_ext" / "_build_info.py").write_text(
        '"""Written by setup.py: what gunn_ext._C was built against."""\n'
        f"TORCH_VERSION = {torch.__version__!r}\n"
        f"WITH_CUDA = {with_cuda!r}\n"
        f"CUDA_ARCH_LIST = {archs!r}\n")


class BuildExtension(cpp_extension.BuildExtension.with_options(use_ninja=True)):
    """Also puts the library in the checkout's package, as ``--inplace`` does.

    Python started in the checkout imports the checkout's ``gunn_ext`` before the
    installed one; with the library beside it, both run the same build.
    """

    def run(self):
        super().run()
        if self.inplace:
            return
        for ext in self.extensions:
            target = ROOT / self.get_ext_filename(ext.name)
            staged = target.with_name(target.name + ".new")
            shutil.copy2(self.get_ext_fullpath(ext.name), staged)
            os.replace(staged, target)  # a new file: a process that has the old one loaded keeps it
            print(f"gunn_ext: copied the library to {target}")


setup(
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension},
)
