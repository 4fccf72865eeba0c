"""Loader of the CPU C++ kernel of the multi-adapter op (csrc/cpu_multi_adapter.cpp).

``load_cpu_extension()`` compiles it on first use with ``torch.utils.cpp_extension.load`` (a C++
compiler and ninja; no CUDA) into ``$TORCH_EXTENSIONS_DIR`` (default ``~/.cache/torch_extensions``),
one build per torch version and instruction set, then imports the cached module. It is the ``cpp``
backend of ``fastadapters.ops.multi`` (what ``auto`` takes for CPU tensors); when it cannot be
built, ``auto`` warns once with the reason and runs the torch path. Importing this module compiles
nothing.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import sys
import threading
from pathlib import Path

SOURCE = "cpu_multi_adapter.cpp"
NAME = "fastadapters_cpu_ext"

_LOCK = threading.Lock()
_LOADED = None
_FAILED: str | None = None


class CpuExtensionUnavailable(RuntimeError):
    """The CPU kernel cannot be built or loaded here; the message says why and what to install."""


def _source() -> Path:
    here = Path(__file__).resolve().parent.parent
    for cand in (here / "csrc" / SOURCE, here.parent / "csrc" / SOURCE):
        if cand.is_file():
            return cand
    raise CpuExtensionUnavailable(f"fastadapters: {SOURCE} is not in {here / 'csrc'} or {here.parent / 'csrc'}; "
                                  "reinstall fastadapters from a source checkout")


ISA_ENV = "FASTADAPTERS_CPU_ISA"  # "auto" (default): the widest of AVX-512 / AVX2+FMA the CPU has; "avx2"; "generic"
ISA_CHOICES = ("auto", "avx2", "generic")
ISA_FLAGS = {"avx512": ["-mavx2", "-mfma", "-mavx512f"], "avx2": ["-mavx2", "-mfma"], "generic": []}

#: the instruction set of the loaded build ("avx512" | "avx2" | "generic"); None before it is loaded
LOADED_ISA: str | None = None


def cpu_flags() -> set[str]:
    """This CPU's feature flags (``/proc/cpuinfo``; empty where it cannot be read)."""
    try:
        with open("/proc/cpuinfo") as f:
            return set(next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), []))
    except OSError:
        return set()


def _isa() -> str:
    """The instruction set to build for: AVX-512F (16-float vectors) when this CPU has it, else
    AVX2/FMA when it has them, else none; ``FASTADAPTERS_CPU_ISA=avx2`` caps it at AVX2/FMA (a CPU
    that slows its clock for 512-bit code), ``generic`` builds without (a portable build, e.g. for
    a cache older CPUs share). The build directory is per flag set, so a cache shared by machines
    with different CPUs never loads code a CPU cannot run."""
    isa = os.environ.get(ISA_ENV, "auto")
    if isa not in ISA_CHOICES:
        raise CpuExtensionUnavailable(f"fastadapters: {ISA_ENV}={isa!r}; valid: 'auto' (AVX-512 or AVX2/FMA, the "
                                      "widest this CPU has), 'avx2' (AVX2/FMA at most) or 'generic' (no "
                                      "instruction-set flags)")
    if isa == "generic":
        return "generic"
    flags = cpu_flags()
    if not {"avx2", "fma"} <= flags:
        return "generic"
    return "avx512" if isa == "auto" and "avx512f" in flags else "avx2"


def _isa_flags() -> list[str]:
    return list(ISA_FLAGS[_isa()])


def status() -> str:
    """'ok' if the kernel can be built or is loaded, else the reason it cannot. Compiles nothing."""
    if _LOADED is not None:
        return "ok"
    if _FAILED is not None:
        return _FAILED
    if sys.platform != "linux":
        return f"the CPU kernel is built only on Linux (this is {sys.platform})"
    if os.environ.get(ISA_ENV, "auto") not in ISA_CHOICES:
        return f"{ISA_ENV}={os.environ[ISA_ENV]!r}; valid: 'auto', 'avx2' or 'generic'"
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        return f"no C++ compiler ({cxx!r} is not on PATH; install g++ or set CXX)"
    try:
        import ninja  # noqa: F401
    except ImportError:
        if shutil.which("ninja") is None:
            return "ninja is not installed (pip install ninja)"
    return "ok"


FLAGS = ["-O3", "-fopenmp"]  # plus _isa_flags(); -fopenmp: at::parallel_for's pragmas


def _build_path(flags: list[str]) -> Path:
    import torch

    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR", Path.home() / ".cache" / "torch_extensions"))
    tag = hashlib.sha1(" ".join(flags).encode()).hexdigest()[:8]
    return root / f"{NAME}_torch{torch.__version__}_{tag}".replace("+", "_")


def is_built() -> bool:
    """Whether a build of the kernel for this torch and CPU is cached (loading it compiles nothing)."""
    if _LOADED is not None:
        return True
    try:
        return any(_build_path(FLAGS + _isa_flags()).glob(f"{NAME}*.so"))
    except Exception:
        return False


def load_cpu_extension(verbose: bool = False):
    """The compiled module (``cpu_multi_adapter_``, and ``TableCalls`` / ``cpu_multi_adapter_calls_``
    for the serving router's one call per layer phase); builds it on first use.
    Raises CpuExtensionUnavailable with the reason (and remembers it: no second attempt)."""
    global _LOADED, _FAILED, LOADED_ISA
    if _LOADED is not None:
        return _LOADED
    with _LOCK:
        if _LOADED is not None:
            return _LOADED
        if _FAILED is not None:
            raise CpuExtensionUnavailable(_FAILED)
        why = status()
        if why != "ok":
            _FAILED = f"fastadapters: the CPU kernel is unavailable: {why}"
            raise CpuExtensionUnavailable(_FAILED)
        import torch.utils.cpp_extension as cpp

        try:
            src = _source()
            isa = _isa()
            flags = FLAGS + ISA_FLAGS[isa]
            build_dir = _build_path(flags)
            build_dir.mkdir(parents=True, exist_ok=True)
            if not any(build_dir.glob(f"{NAME}*.so")):
                print(f"fastadapters: compiling the CPU multi-adapter kernel ({src.name}; first use only, about a "
                      f"minute; cached in {build_dir})", file=sys.stderr, flush=True)
            # -fopenmp: at::parallel_for's pragmas; the library links libgomp.so.1 by soname, which
            # resolves to the one torch already loaded (one thread pool, torch.set_num_threads)
            _LOADED = cpp.load(name=NAME, sources=[str(src)], extra_cflags=flags, extra_ldflags=["-fopenmp"],
                               build_directory=str(build_dir), verbose=verbose)
            LOADED_ISA = isa
        except Exception as e:  # compiler or loader errors: remembered, reported once by the caller
            _FAILED = (f"fastadapters: building the CPU kernel failed ({type(e).__name__}: {str(e)[:400]}); "
                       "load_cpu_extension(verbose=True) shows the compiler output")
            raise CpuExtensionUnavailable(_FAILED) from e
        return _LOADED
