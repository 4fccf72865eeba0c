"""Loader of the CUDA C++ extension (csrc/ -> ``fastadapters._C``).

``load_extension()`` returns the extension, in this order:

1. ``fastadapters._C`` built at install time (``pip install --no-build-isolation -e .`` with a CUDA
   build of torch and nvcc, see setup.py);
2. else, where torch is a CUDA build and nvcc exists, a JIT build of the same sources with
   ``torch.utils.cpp_extension.load`` (ninja), cached under ``$TORCH_EXTENSIONS_DIR`` (default
   ``~/.cache/torch_extensions``) per torch / CUDA version, with one message while it compiles;
3. else an ``ExtensionUnavailable`` error that says what to install.

Loading registers the CUDA kernels of the ``fastadapters::cuda_*`` ops (their schemas, fakes and
CPU reference kernels live in ``fastadapters/ops/cuda_ops.py``). Importing this module touches
neither CUDA nor the compiler; only ``load_extension()`` does.
"""
from __future__ import annotations

import glob
import os
import re
import shutil
import sys
import threading
from pathlib import Path

SOURCES = ("ops.cpp", "multi_adapter.cu", "bottleneck.cu")
# Always built: Ampere and Hopper (sm_90a), plus compute_80 PTX so newer GPUs can JIT it.
# Same list as setup.py (which cannot import this package under build isolation).
BASE_GENCODE = ("arch=compute_80,code=sm_80", "arch=compute_90a,code=sm_90a",
                "arch=compute_80,code=compute_80")
JIT_NAME = "fastadapters_cuda_ext"

_LOCK = threading.Lock()
_LOADED: object | None = None


class ExtensionUnavailable(RuntimeError):
    """The CUDA extension is neither built nor buildable here; the message says what is missing."""


def csrc_dir() -> Path:
    """The directory holding the C++/CUDA sources: shipped inside the package (wheel installs) or
    the repository's top-level csrc/ (source tree, editable installs)."""
    here = Path(__file__).resolve().parent
    for cand in (here / "csrc", here.parent / "csrc"):
        if all((cand / s).is_file() for s in SOURCES):
            return cand
    raise ExtensionUnavailable(
        f"fastadapters: the CUDA sources ({', '.join(SOURCES)}) are not in {here / 'csrc'} or "
        f"{here.parent / 'csrc'}; reinstall fastadapters from a source checkout")


def arch_gencode_flags(arch_list: str | None = None) -> list[str]:
    """nvcc ``-gencode`` flags: the fixed sm_80 / sm_90a set plus each entry of
    ``TORCH_CUDA_ARCH_LIST`` (e.g. ``"8.6;8.9;10.0+PTX"``; ``9.0a`` style suffixes kept)."""
    flags: list[str] = []
    for g in BASE_GENCODE:
        flags += ["-gencode", g]
    arch_list = os.environ.get("TORCH_CUDA_ARCH_LIST", "") if arch_list is None else arch_list
    for entry in re.split(r"[;\s]+", arch_list.strip()):
        if not entry:
            continue
        m = re.fullmatch(r"(\d+)\.(\d+)([af]?)(\+PTX)?", entry)
        if m is None:
            raise ValueError(f"TORCH_CUDA_ARCH_LIST: cannot parse {entry!r}; expected entries like "
                             f"'8.6', '9.0a' or '10.0+PTX' separated by ';'")
        cc = f"{m.group(1)}{m.group(2)}{m.group(3)}"
        for g in (f"arch=compute_{cc},code=sm_{cc}",) + ((f"arch=compute_{cc},code=compute_{cc}",)
                                                          if m.group(4) else ()):
            if g not in flags:
                flags += ["-gencode", g]
    return flags


def nvcc_flags(arch_list: str | None = None) -> list[str]:
    return ["-O3", "-lineinfo"] + arch_gencode_flags(arch_list)


def find_nvcc() -> str | None:
    """Path of nvcc from CUDA_HOME / CUDA_PATH, torch's guess, or PATH; None when absent."""
    for env in ("CUDA_HOME", "CUDA_PATH"):
        root = os.environ.get(env)
        if root and (Path(root) / "bin" / "nvcc").is_file():
            return str(Path(root) / "bin" / "nvcc")
    found = shutil.which("nvcc")
    if found:
        return found
    for root in ("/usr/local/cuda",):
        if (Path(root) / "bin" / "nvcc").is_file():
            return str(Path(root) / "bin" / "nvcc")
    return None


def find_cuda_home(roots: list[str] | None = None) -> str | None:
    """The CUDA toolkit root (with ``bin/nvcc`` and ``include/cuda_runtime_api.h``), or None.

    Looked for in CUDA_HOME / CUDA_PATH, then beside the nvcc on PATH, then /usr/local/cuda and
    /usr/local/cuda-*. torch guesses the root from the nvcc on PATH alone, which is wrong where that
    nvcc is a wrapper script outside the toolkit (e.g. /usr/local/bin/nvcc -> /usr/local, no headers).
    """
    if roots is None:
        roots = [os.environ.get(e) for e in ("CUDA_HOME", "CUDA_PATH")]
        found = shutil.which("nvcc")
        if found:
            roots += [str(Path(found).parent.parent), str(Path(found).resolve().parent.parent)]
        roots += ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    for root in roots:
        if root and (Path(root) / "bin" / "nvcc").is_file() and \
                (Path(root) / "include" / "cuda_runtime_api.h").is_file():
            return str(root)
    return None


def _build_directory() -> Path:
    import torch

    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR",
                               Path.home() / ".cache" / "torch_extensions"))
    tag = f"{JIT_NAME}_torch{torch.__version__}_cu{torch.version.cuda}".replace("+", "_")
    path = root / tag
    path.mkdir(parents=True, exist_ok=True)
    return path


def _jit_build(verbose: bool):
    import torch
    import torch.utils.cpp_extension as cpp

    home = find_cuda_home()
    if home is not None and cpp.CUDA_HOME != home and not os.environ.get("CUDA_HOME"):
        cpp.CUDA_HOME = home  # torch's guess from PATH can be a wrapper's directory without headers
    src = csrc_dir()
    build_dir = _build_directory()
    if not any(build_dir.glob(f"{JIT_NAME}*.so")):
        print(f"fastadapters: compiling the CUDA extension from {src} with nvcc/ninja "
              f"(first use only, about a minute; cached in {build_dir})", file=sys.stderr, flush=True)
    cpp.load(
        name=JIT_NAME,
        sources=[str(src / s) for s in SOURCES],
        extra_cflags=["-O3"],
        extra_cuda_cflags=nvcc_flags(),
        extra_include_paths=[str(src)],
        build_directory=str(build_dir),
        is_python_module=False,
        verbose=verbose,
    )
    return torch.ops.fastadapters


def extension_status() -> str:
    """'built', 'jit' (buildable on first use) or the reason it is unavailable. No compile, no CUDA."""
    try:
        import torch
    except ImportError:
        return "torch is not installed"
    if torch.version.cuda is None:  # checked first: a _C left by a CUDA torch install cannot load here
        return (f"torch {torch.__version__} is a CPU-only build; install a CUDA build of torch "
                f"(https://pytorch.org/get-started/locally/)")
    try:
        import importlib.util

        if importlib.util.find_spec("fastadapters._C") is not None:
            return "built"
    except (ImportError, ValueError):
        pass
    if find_nvcc() is None:
        return ("nvcc was not found (set CUDA_HOME or put nvcc on PATH), so the extension cannot be "
                "JIT-built; or reinstall with `pip install --no-build-isolation -e .` on a machine "
                "with the CUDA toolkit")
    return "jit"


def load_extension(verbose: bool = False):
    """The loaded extension (``fastadapters._C`` or the JIT-built library); builds it if needed.
    Raises ExtensionUnavailable with the reason and the remedy when neither is possible."""
    global _LOADED
    if _LOADED is not None:
        return _LOADED
    with _LOCK:
        if _LOADED is not None:
            return _LOADED
        status = extension_status()
        if status == "built":
            try:
                from fastadapters import _C  # noqa: F401  (loading registers the CUDA kernels)

                _LOADED = _C
                return _LOADED
            except ImportError as e:  # e.g. built against another torch: try the JIT path
                built_error = e
                status = extension_status_without_built()
                if status != "jit":
                    raise ExtensionUnavailable(
                        f"fastadapters._C exists but does not load ({e}); rebuild it with "
                        f"`pip install --no-build-isolation -e .` ({status})") from e
        else:
            built_error = None
        if status != "jit":
            raise ExtensionUnavailable(f"fastadapters: the CUDA extension is unavailable: {status}")
        try:
            _LOADED = _jit_build(verbose)
        except Exception as e:  # compiler errors: surface them with the context
            extra = f" (the prebuilt fastadapters._C failed too: {built_error})" if built_error else ""
            raise ExtensionUnavailable(f"fastadapters: JIT build of the CUDA extension failed: {e}"
                                       f"{extra}; rerun with load_extension(verbose=True) to see "
                                       f"the compiler output") from e
        return _LOADED


def extension_status_without_built() -> str:
    """extension_status() ignoring a prebuilt fastadapters._C (used when it fails to load)."""
    import torch

    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU-only build"
    return "jit" if find_nvcc() is not None else "nvcc was not found (set CUDA_HOME)"
