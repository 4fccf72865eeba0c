"""Build script: metadata lives in pyproject.toml.

The CUDA extension ``fastadapters._C`` (csrc/ops.cpp + csrc/*.cu, torch CUDAExtension built with
ninja) is added only where a CUDA build of torch is importable and nvcc exists: install with
``pip install --no-build-isolation -e .`` so the build sees that torch. Everywhere else -- a
CPU-only torch, no nvcc, or a build-isolated install where torch is not importable -- the install
succeeds without it, and the package runs through its Triton and torch paths (and JIT-builds the
extension on first use where CUDA appears later, see fastadapters/_ext.py).

Architectures: sm_80 and sm_90a always (plus compute_80 PTX), others from TORCH_CUDA_ARCH_LIST.
``FASTADAPTERS_NO_CUDA_EXT=1`` skips the extension. The csrc/ sources are also copied into the
package (fastadapters/csrc/) by build_py, so a wheel install can JIT-build them.
"""
import glob
import os
import re
import shutil
import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
CSRC = ROOT / "csrc"
EXT_SOURCES = ["csrc/ops.cpp", "csrc/multi_adapter.cu", "csrc/bottleneck.cu"]
# Same list as fastadapters/_ext.py (not importable here under build isolation).
BASE_GENCODE = ["arch=compute_80,code=sm_80", "arch=compute_90a,code=sm_90a",
                "arch=compute_80,code=compute_80"]


def _log(msg):
    print(f"fastadapters setup: {msg}", file=sys.stderr)


def _gencode_flags():
    flags = []
    for g in BASE_GENCODE:
        flags += ["-gencode", g]
    for entry in re.split(r"[;\s]+", os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip()):
        m = re.fullmatch(r"(\d+)\.(\d+)([af]?)(\+PTX)?", entry)
        if not entry:
            continue
        if m is None:
            raise SystemExit(f"TORCH_CUDA_ARCH_LIST: cannot parse {entry!r}; expected entries like "
                             f"'8.6', '9.0a' or '10.0+PTX' separated by ';'")
        cc = m.group(1) + m.group(2) + m.group(3)
        gens = [f"arch=compute_{cc},code=sm_{cc}"]
        if m.group(4):
            gens.append(f"arch=compute_{cc},code=compute_{cc}")
        for g in gens:
            if g not in flags:
                flags += ["-gencode", g]
    return flags


def _find_cuda_home():
    """Toolkit root with bin/nvcc and include/cuda_runtime_api.h (same search as
    fastadapters._ext.find_cuda_home, which is not importable here under build isolation)."""
    roots = [os.environ.get(e) for e in ("CUDA_HOME", "CUDA_PATH")]
    found = shutil.which("nvcc")
    if found:
        roots += [str(Path(found).parent.parent), str(Path(found).resolve().parent.parent)]
    roots += ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    for root in roots:
        if root and (Path(root) / "bin" / "nvcc").is_file() and \
                (Path(root) / "include" / "cuda_runtime_api.h").is_file():
            return root
    return None


def _cuda_extension():
    """(ext_modules, cmdclass) for the CUDA extension, or ([], {}) with the reason logged."""
    if os.environ.get("FASTADAPTERS_NO_CUDA_EXT") == "1":
        _log("FASTADAPTERS_NO_CUDA_EXT=1: building without the CUDA extension")
        return [], {}
    home = _find_cuda_home()
    if home and not os.environ.get("CUDA_HOME"):
        # torch guesses CUDA_HOME from the nvcc on PATH, which may be a wrapper outside the toolkit
        os.environ["CUDA_HOME"] = home
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except Exception as e:  # build isolation (torch not installed in the build env), or broken torch
        _log(f"torch is not importable in the build environment ({type(e).__name__}); building "
             f"without the CUDA extension (use --no-build-isolation with a CUDA torch to build it)")
        return [], {}
    if torch.version.cuda is None:
        _log(f"torch {torch.__version__} is a CPU-only build; building without the CUDA extension")
        return [], {}
    nvcc = None
    if CUDA_HOME and (Path(CUDA_HOME) / "bin" / "nvcc").is_file():
        nvcc = str(Path(CUDA_HOME) / "bin" / "nvcc")
    nvcc = nvcc or shutil.which("nvcc")
    if nvcc is None:
        _log("nvcc not found (set CUDA_HOME); building without the CUDA extension")
        return [], {}
    _log(f"building fastadapters._C with {nvcc} for torch {torch.__version__} "
         f"(CUDA {torch.version.cuda})")
    ext = CUDAExtension(
        name="fastadapters._C",
        sources=EXT_SOURCES,
        include_dirs=[str(CSRC)],
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "-lineinfo"] + _gencode_flags()},
    )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


class BuildPyWithCsrc(build_py):
    """build_py that also ships csrc/ inside the package (fastadapters/csrc/) for JIT builds."""

    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            return  # editable installs read the sources from the checkout
        dest = Path(self.build_lib) / "fastadapters" / "csrc"
        dest.mkdir(parents=True, exist_ok=True)
        for pattern in ("*.cu", "*.cuh", "*.cpp"):
            for f in CSRC.glob(pattern):
                shutil.copy2(f, dest / f.name)


ext_modules, cmdclass = _cuda_extension()
cmdclass["build_py"] = BuildPyWithCsrc
setup(ext_modules=ext_modules, cmdclass=cmdclass)
