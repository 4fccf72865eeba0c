"""Shared pieces of the Triton adapter kernels: activations, seeded dropout, launch configs.

Everything here is either a `@triton.jit` helper inlined into the kernels of `lora.py` and
`bottleneck.py`, or a small host-side helper those modules' launch functions share (argument
checks that name the bad value, block-size choice, the offline-compile description of a kernel).

Activations are chosen by a constexpr integer id (see `ACTIVATIONS`); gelu is the exact erf form,
matching `torch.nn.functional.gelu` with its default `approximate="none"`.

Dropout is Philox-based: element (m, k) of an (M, K) input is kept iff
`tl.rand(seed, m * K + k) >= p`, so forward and backward regenerate the same mask from
`(seed, p)` and no mask tensor is ever stored. Kept elements are scaled by 1 / (1 - p).
"""

from __future__ import annotations

import contextlib
import os
import re
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

# ----------------------------------------------------------------------------------------------
# activations
# ----------------------------------------------------------------------------------------------

# same ids as fastadapters.ops.bottleneck.ACT_IDS (the multi-adapter store uses them too)
ACT_IDENTITY = 0
ACT_TANH = 1
ACT_RELU = 2
ACT_GELU = 3  # exact: 0.5 * x * (1 + erf(x / sqrt(2)))
ACT_SILU = 4
ACT_SIGMOID = 5

#: activation name (as configs spell it) -> constexpr id used by the kernels
ACTIVATIONS = {
    "identity": ACT_IDENTITY,
    "linear": ACT_IDENTITY,
    "none": ACT_IDENTITY,
    "relu": ACT_RELU,
    "tanh": ACT_TANH,
    "gelu": ACT_GELU,
    "silu": ACT_SILU,
    "swish": ACT_SILU,
    "sigmoid": ACT_SIGMOID,
}


def activation_id(name) -> int:
    """Map an activation name (case-insensitive) or id to the kernels' constexpr id."""
    if isinstance(name, int) and name in ACTIVATIONS.values():
        return name
    key = str(name).lower()
    if key not in ACTIVATIONS:
        raise ValueError(
            f"expected activation in {sorted(ACTIVATIONS)}, got {name!r}"
        )
    return ACTIVATIONS[key]


@triton.jit
def _sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def _tanh(x):
    # tanh(x) = 2 * sigmoid(2x) - 1; saturates correctly for |x| large (exp -> 0 or inf)
    return 2.0 / (1.0 + tl.exp(-2.0 * x)) - 1.0


@triton.jit
def apply_act(x, ACT: tl.constexpr):
    """act(x) for fp32 x; ACT is one of the ACT_* ids."""
    if ACT == 1:
        y = _tanh(x)
    elif ACT == 2:
        y = tl.maximum(x, 0.0)
    elif ACT == 3:
        y = 0.5 * x * (1.0 + tl.erf(x * 0.7071067811865476))
    elif ACT == 4:
        y = x * _sigmoid(x)
    elif ACT == 5:
        y = _sigmoid(x)
    else:
        y = x
    return y


@triton.jit
def apply_act_grad(x, ACT: tl.constexpr):
    """d act(x) / dx for fp32 x (relu'(0) = 0, as torch)."""
    if ACT == 1:
        t = _tanh(x)
        g = 1.0 - t * t
    elif ACT == 2:
        g = tl.where(x > 0.0, 1.0, 0.0)
    elif ACT == 3:
        cdf = 0.5 * (1.0 + tl.erf(x * 0.7071067811865476))
        pdf = 0.3989422804014327 * tl.exp(-0.5 * x * x)
        g = cdf + x * pdf
    elif ACT == 4:
        sg = _sigmoid(x)
        g = sg * (1.0 + x * (1.0 - sg))
    elif ACT == 5:
        sg = _sigmoid(x)
        g = sg * (1.0 - sg)
    else:
        g = tl.full(x.shape, 1.0, tl.float32)
    return g


# ----------------------------------------------------------------------------------------------
# tensor-core dot
# ----------------------------------------------------------------------------------------------

# The CPU interpreter (TRITON_INTERPRET=1, read when this module is imported) keeps bf16 as raw
# uint16 and feeds it to np.matmul as integers (triton 3.6 - 3.9), so there bf16 operands are
# widened to fp32 first: exact, since bf16 products are exact in fp32, as on the tensor cores.
_INTERPRETING = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") == "1")


@triton.jit
def mma(a, b, acc, DOT_PREC: tl.constexpr):
    """acc + a · b with fp32 accumulation (tl.dot), interpreter-safe for bf16."""
    if _INTERPRETING:
        if a.dtype == tl.bfloat16:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=DOT_PREC)


# ----------------------------------------------------------------------------------------------
# dropout
# ----------------------------------------------------------------------------------------------


@triton.jit
def dropout_keep(seed, rows, cols, n_cols, p):
    """Boolean keep-mask for elements (rows[:, None], cols[None, :]) of an (M, n_cols) input.

    The Philox offset of element (m, k) is m * n_cols + k, so any tiling regenerates the same mask.
    """
    offs = rows[:, None] * n_cols + cols[None, :]
    return tl.rand(seed, offs) >= p


@triton.jit
def load_scale(scale_ptr, scale_val, SCALE_IS_PTR: tl.constexpr):
    """The adapter scaling as fp32: read from a 1-element tensor, or the float argument."""
    if SCALE_IS_PTR:
        s = tl.load(scale_ptr).to(tl.float32)
    else:
        s = scale_val
    return s


# ----------------------------------------------------------------------------------------------
# host-side helpers
# ----------------------------------------------------------------------------------------------

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

TRITON_DTYPE_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


@dataclass(frozen=True)
class BlockConfig:
    """Tile sizes and launch options of one kernel launch (BM rows x BN cols, BK reduction)."""

    BM: int
    BN: int
    BK: int
    num_warps: int
    num_stages: int


def check_tensor(name, t, shape, dtype=None, device=None):
    """Raise a ValueError naming `name` if `t` does not have `shape` (None = any size there)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"expected {name} to be a torch.Tensor, got {type(t).__name__}")
    exp = tuple("*" if s is None else s for s in shape)
    if t.dim() != len(shape) or any(s is not None and s != d for s, d in zip(shape, t.shape)):
        raise ValueError(f"expected {name} of shape {exp}, got {tuple(t.shape)}")
    if dtype is not None and t.dtype != dtype:
        raise ValueError(f"expected {name} of dtype {dtype}, got {t.dtype}")
    if device is not None and t.device != device:
        raise ValueError(f"expected {name} on device {device}, got {t.device}")


def check_dtype(name, t):
    if t.dtype not in SUPPORTED_DTYPES:
        raise ValueError(
            f"expected {name} of dtype float16, bfloat16 or float32, got {t.dtype}"
        )


def check_dropout(dropout_p, seed):
    if not (0.0 <= float(dropout_p) < 1.0):
        raise ValueError(f"expected dropout_p in [0, 1), got {dropout_p}")
    if not (0 <= int(seed) < 2**31):
        raise ValueError(f"expected seed in [0, 2**31), got {seed}")


def check_index_range(name, t):
    """The kernels index with int32 element offsets: every tensor must hold fewer than 2**31."""
    if t is not None and t.numel() >= 2**31:
        raise ValueError(
            f"{name} has {t.numel()} elements (shape {tuple(t.shape)}); the kernels support fewer than 2**31"
        )


def check_philox_range(name, m, k):
    # Philox offsets are m * K + k in int32 inside the kernels
    if m * k >= 2**31:
        raise ValueError(
            f"{name} has {m} x {k} = {m * k} elements; seeded dropout supports fewer than 2**31"
        )


#: widest LoRA rank / bottleneck size the kernels take (they work in rank slices of at most 64;
#: the series adapter's forward keeps the whole (BM, r) pre-activation on chip: checked for sm_80
#: and sm_90 by the offline compile test)
MAX_RANK = 256


def check_rank(name, r):
    if r > MAX_RANK:
        raise ValueError(f"expected {name} <= {MAX_RANK} for the Triton kernels, got {r}")


def rank_block(r: int) -> int:
    """Padded rank / bottleneck width used as a tile dimension (>= 16 for tl.dot)."""
    return max(16, triton.next_power_of_2(int(r)))


def dot_precision(dtype) -> str:
    """tl.dot input precision: fp32 inputs follow torch's TF32 switch (IEEE fp32 by default)."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def scale_args(scaling, like: torch.Tensor):
    """(scale_ptr, scale_val, SCALE_IS_PTR) for a float or a 1-element tensor scaling."""
    if isinstance(scaling, torch.Tensor):
        if scaling.numel() != 1:
            raise ValueError(
                f"expected scaling to be a float or a 1-element tensor, got shape {tuple(scaling.shape)}"
            )
        if scaling.device != like.device:
            raise ValueError(f"expected scaling on device {like.device}, got {scaling.device}")
        return scaling.reshape(1), 0.0, True
    return like, float(scaling), False


def device_guard(t: torch.Tensor):
    """Context in which Triton launches on ``t``'s device: Triton launches on the *current* CUDA
    device, and a model spread with ``device_map="auto"`` has tensors on cuda:1 while cuda:0 is
    current. A no-op for CPU tensors (the interpreter)."""
    if t.device.type == "cuda":
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device; a small number on CPU (interpreter)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 2


def compile_for(fn, signature: dict, constexprs: dict, cc: int, num_warps: int, num_stages: int,
                attrs: dict | None = None):
    """Compile `fn` offline for CUDA compute capability `cc` (no GPU needed); returns the kernel.

    Works on triton 3.6 - 3.9: ASTSource(fn, signature, constexprs, attrs) + GPUTarget("cuda", cc, 32).
    `signature` maps every argument name to a type string ("*bf16", "i32", "fp32", "constexpr");
    `attrs` maps (arg index,) to [["tt.divisibility", 16]] as the JIT's runtime specialisation does.
    """
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs or {})
    return triton.compile(
        src,
        target=GPUTarget("cuda", cc, 32),
        options={"num_warps": num_warps, "num_stages": num_stages},
    )


_FLOAT_ARGS = ("scale_val", "p", "inv_keep")
_UNALIGNED_INTS = ("seed", "seed0", "seed1", "seed2", "R")


def make_signature(fn, ptr_dtypes: dict, constexprs: dict, default_ptr: str, unit_strides=()):
    """(signature, constexprs, attrs) for offline compilation, mimicking the JIT's specialisation.

    Pointers (args ending in `_ptr`) get `ptr_dtypes[name]` (else `default_ptr`) and 16-byte
    alignment; `scale_val`/`p`/`inv_keep` are fp32; the strides in `unit_strides` become the
    constant 1 (as the JIT specialises ints equal to 1); other ints are i32, sizes and strides
    marked divisible by 16 (model dimensions are), the seed and the rank not.
    """
    sig, attrs = {}, {}
    constexprs = dict(constexprs)
    for name in unit_strides:
        constexprs[name] = 1
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = "*" + ptr_dtypes.get(name, default_ptr)
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in _FLOAT_ARGS:
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
            if name not in _UNALIGNED_INTS:
                attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, constexprs, attrs


#: shared memory one block may opt in to (cudaDevAttrMaxSharedMemoryPerBlockOptin), bytes: 163 KiB
#: on A100 (sm_80), 227 KiB on H100 / H200 (sm_90); the SM's 164 / 228 KiB include 1 KiB per block
#: the runtime reserves
SMEM_LIMIT = {80: 163 * 1024, 90: 227 * 1024}

_PTXAS_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_REGS = re.compile(r"Used (\d+) registers")


def _parse_ptxas(log: str):
    """(registers, spill store bytes, spill load bytes) from a `ptxas -v` log (one kernel)."""
    spill = _PTXAS_SPILL.search(log)
    regs = _PTXAS_REGS.search(log)
    if spill is None or regs is None:
        return None
    return int(regs.group(1)), int(spill.group(1)), int(spill.group(2))


def _ptxas_cache_path() -> str:
    try:
        from triton import knobs

        root = knobs.cache.dir
    except Exception:  # older triton: the default cache location
        root = os.path.join(os.path.expanduser("~"), ".triton", "cache")
    return os.path.join(root, "fastadapters_ptxas_v.json")


def _ptxas_path(cc: int) -> str | None:
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        return get_ptxas(cc).path
    except Exception:  # another triton's helper: the ptxas on PATH
        import shutil

        return shutil.which("ptxas")


def ptxas_usage(kernel, cc: int, captured_log: str = ""):
    """(registers, spill store bytes, spill load bytes) of an offline-compiled kernel.

    Taken from the `ptxas -v` log triton printed while compiling it (``captured_log``, present when
    the compile was not a triton cache hit), else from a small JSON cache next to triton's keyed by
    the PTX's hash, else by running ptxas -v on the PTX once more (what triton ran). None if
    unknown.
    """
    import hashlib
    import json
    import subprocess
    import tempfile

    ptx = kernel.asm["ptx"]
    key = f"sm_{cc}:" + hashlib.sha256(ptx.encode()).hexdigest()
    path = _ptxas_cache_path()
    try:
        with open(path) as f:
            cache = json.load(f)
    except (OSError, ValueError):
        cache = {}
    usage = _parse_ptxas(captured_log) if captured_log else None
    if usage is None and key in cache:
        return tuple(cache[key])
    ptxas = _ptxas_path(cc) if usage is None else None
    if usage is None and ptxas is not None:
        arch = f"sm_{cc}a" if cc >= 90 else f"sm_{cc}"
        with tempfile.TemporaryDirectory() as d:
            src = os.path.join(d, "k.ptx")
            with open(src, "w") as f:
                f.write(ptx)
            proc = subprocess.run([ptxas, "-v", "--regAllocOptLevel=2", f"--gpu-name={arch}", src,
                                   "-o", os.path.join(d, "k.cubin")], capture_output=True, text=True)
        usage = _parse_ptxas(proc.stderr + proc.stdout)
    if usage is not None:
        cache[key] = list(usage)
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tmp = path + f".{os.getpid()}"
            with open(tmp, "w") as f:
                json.dump(cache, f)
            os.replace(tmp, path)
        except OSError:
            pass
    return usage


def compile_report(module_names, dtype_name: str, cc: int, names=None):
    """Compile every shipped spec of the given kernel modules for `cc`; one dict per spec.

    Run without TRITON_INTERPRET (the interpreter's functions cannot be compiled). Each dict has
    name, cc, dtype, ok, error, mma (sm_80-style mma.sync in the PTX), wgmma, shared (bytes),
    smem_limit, regs, spill (bytes of spill stores or loads; -1 unknown), spill_bound (the spec's
    justified bound, bytes; 0 unless the spec sets one), gemm (the kernel is a tl.dot GEMM),
    prec (its DOT_PREC), atomics / acq_rel_atomics (global atomic instructions in the PTX, all /
    those with acquire-release ordering). `names` restricts to specs whose name is
    listed.
    """
    import contextlib
    import importlib
    import io

    from triton import knobs

    # triton prints the ptxas -v log of every fresh compile when this knob is on (3.4+)
    if hasattr(knobs.nvidia, "dump_ptxas_log"):
        knobs.nvidia.dump_ptxas_log = True
    dtype = getattr(torch, dtype_name)
    out = []
    for mod_name in module_names:
        mod = importlib.import_module(mod_name)
        for spec in mod.shipped_kernel_specs(dtype):
            if names is not None and spec["name"] not in names:
                continue
            rec = dict(name=f"{mod_name.rsplit('.', 1)[-1]}:{spec['name']}", cc=cc, dtype=dtype_name,
                       smem_limit=SMEM_LIMIT[cc], mma_sync_ok=bool(spec.get("mma_sync_ok", False)),
                       spill_bound=int(spec.get("spill_bound", 0)), gemm=bool(spec.get("gemm", True)),
                       prec=spec["constexprs"].get("DOT_PREC"))
            try:
                log = io.StringIO()
                with contextlib.redirect_stdout(log):
                    k = compile_for(spec["fn"], spec["signature"], spec["constexprs"], cc,
                                    spec["num_warps"], spec["num_stages"], spec["attrs"])
                ptx = k.asm["ptx"]
                usage = ptxas_usage(k, cc, log.getvalue())
                rec.update(ok=True, error=None, mma="mma.sync" in ptx, wgmma="wgmma.mma_async" in ptx,
                           acq_rel_atomics=len(re.findall(r"atom\.[^\n;]*acq_rel", ptx)),
                           atomics=len(re.findall(r"\b(?:atom|red)\.[^\n;]*global", ptx)),
                           shared=int(k.metadata.shared), regs=usage[0] if usage else -1,
                           spill=max(usage[1], usage[2]) if usage else -1)
            except Exception as e:  # reported per spec by the test
                rec.update(ok=False, error=f"{type(e).__name__}: {e}"[:2000], mma=False, wgmma=False,
                           shared=-1, regs=-1, spill=-1, acq_rel_atomics=0, atomics=0)
            out.append(rec)
    return out
