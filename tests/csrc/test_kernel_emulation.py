"""The real CUDA kernel source, run on the CPU: tests/csrc/kernel_emulator.cpp compiles
csrc/adapter_branch.cuh (through the real launch code of multi_adapter.cu and bottleneck.cu) with
a host shim for the CUDA built-ins, and these tests hold its output to the fp64 reference with the
house rule -- odd sizes, every popularity pattern, base rows, rank 0 and padded ranks, all six
activations, fp16 / bf16 / fp32, misaligned rows (scalar fallback of the 16-byte loads), several
K chunks and N tiles. What it cannot show (concurrent CTAs, the memory model) the GPU tests do.

Skipped, saying so, without a C++20 compiler or the CUDA headers (cuda_fp16.h).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from adapter_cases import PATTERNS, make_row_slot, make_store
from fastadapters.ops import cuda_ops as co

ROOT = Path(__file__).resolve().parents[2]
CSRC = ROOT / "csrc"
DT = {torch.float16: "f16", torch.bfloat16: "bf16", torch.float32: "f32"}


def _cuda_include() -> Path | None:
    cands = [Path(os.environ[e]) / "include" for e in ("CUDA_HOME", "CUDA_PATH") if os.environ.get(e)]
    nvcc = shutil.which("nvcc")
    if nvcc:
        cands.append(Path(nvcc).resolve().parent.parent / "include")
    cands += [Path("/usr/local/cuda/include")]
    return next((c for c in cands if (c / "cuda_fp16.h").is_file()), None)


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    cxx = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")
    inc = _cuda_include()
    if cxx is None or inc is None:
        pytest.skip("kernel emulation needs a C++20 compiler and the CUDA headers (cuda_fp16.h)")
    exe = tmp_path_factory.mktemp("emu") / "kernel_emulator"
    proc = subprocess.run([cxx, "-std=c++20", "-O1", "-pthread", "-I", str(CSRC), "-I", str(inc),
                           str(Path(__file__).with_name("kernel_emulator.cpp")), "-o", str(exe)],
                          capture_output=True, text=True, timeout=600)
    if proc.returncode != 0 and "barrier" in proc.stderr and "No such file" in proc.stderr:
        pytest.skip("the C++ compiler lacks <barrier> (C++20): kernel emulation skipped")
    assert proc.returncode == 0, proc.stderr[-4000:]
    return exe


def _dump(path: Path, t: torch.Tensor) -> str:
    path.write_bytes(t.contiguous().view(torch.uint8).numpy().tobytes())
    return str(path)


def run_multi(exe, tmp, y0, x_buf, ldx, xoff, K, down, up, sizes, scales, acts, meta):
    M, N = y0.shape
    S, R = down.shape[0], down.shape[1]
    G = meta.seg_slots.shape[0]
    files = [_dump(tmp / f"{n}.bin", t) for n, t in
             zip(("y0", "x", "down", "up", "sizes", "scales", "acts", "rows", "starts", "slots"),
                 (y0, x_buf, down, up, sizes, scales, acts, *meta))]
    out = tmp / "y.bin"
    proc = subprocess.run([str(exe), "multi", DT[y0.dtype], *map(str, (M, N, K, S, R, G, ldx, xoff)),
                           *files, str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    plan = json.loads(proc.stdout)
    y = torch.frombuffer(bytearray(out.read_bytes()), dtype=y0.dtype).reshape(M, N)
    return y, plan


def house_rule(got, ref_t, exact, what):
    err = (got.double() - exact).abs().max().item()
    err_ref = (ref_t.double() - exact).abs().max().item()
    scale = exact.abs().max().item() + 1e-30
    floor = 1e-5 * scale if got.dtype == torch.float32 else 1e-6 * scale
    assert err <= 2 * err_ref + floor, f"{what}: error {err:.3e} > 2 x {err_ref:.3e} + {floor:.1e}"


def multi_case(exe, tmp, M, K, N, S, R, sizes, acts, pattern, dtype, seed, xoff=0):
    gen = torch.Generator().manual_seed(seed)
    down, up, sizes_t, scales, acts_t = make_store(S, R, K, N, dtype, gen, sizes=sizes, acts=acts)
    ldx = K + 3 if xoff else K
    x_buf = torch.randn(M * ldx + xoff, generator=gen).to(dtype)
    x = x_buf[xoff:].reshape(M, ldx)[:, :K]
    y0 = torch.randn(M, N, generator=gen).to(dtype)
    row_slot = make_row_slot(pattern, M, S, 0.2, gen)
    meta = co.multi_adapter_meta(row_slot, S)
    y, plan = run_multi(exe, tmp, y0, x_buf, ldx, xoff, K, down, up, sizes_t, scales, acts_t, meta)
    exact = co.multi_adapter_ref(y0.double(), x.double(), row_slot, down.double(), up.double(),
                                 sizes_t, scales, acts_t)
    ref_t = co.multi_adapter_ref(y0, x, row_slot, down, up, sizes_t, scales, acts_t)
    base = row_slot < 0
    assert torch.equal(y[base], y0[base]), "base rows must be copied exactly"
    house_rule(y, ref_t, exact, f"{dtype} {pattern} M={M} K={K} N={N} xoff={xoff}")
    return plan


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("pattern", PATTERNS)
def test_emulated_multi_adapter_odd_sizes(emulator, tmp_path, dtype, pattern):
    # "identical" puts every active row (~30) on slot 3: one segment larger than a producer task
    multi_case(emulator, tmp_path, 37, 100, 77, S=6, R=8, sizes=[1, 5, 8, 7, 0, 3],
               acts=[0, 1, 2, 3, 4, 5], pattern=pattern, dtype=dtype, seed=len(pattern))


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_emulated_multi_adapter_misaligned_rows(emulator, tmp_path, dtype):
    multi_case(emulator, tmp_path, 9, 264, 40, S=3, R=16, sizes=[16, 5, 9], acts=[0, 3, 5],
               pattern="uniform", dtype=dtype, seed=3, xoff=1)


def test_emulated_multi_adapter_many_chunks_tiles_and_rank_passes(emulator, tmp_path):
    # K over 3 chunks, N over 2 tiles, rank 70 > one 64-wide h pass, all ~19 active rows on
    # slot 1 (> one 16-row producer task, > two 8-row consumer passes)
    plan = multi_case(emulator, tmp_path, 24, 1100, 300, S=2, R=72, sizes=[2, 70], acts=[0, 4],
                      pattern="identical", dtype=torch.bfloat16, seed=5)
    assert plan["num_k_chunks"] == 3 and plan["num_n_tiles"] == 2


def test_emulated_single_row_and_all_base(emulator, tmp_path):
    multi_case(emulator, tmp_path, 1, 100, 77, S=2, R=5, sizes=[5, 1], acts=[0, 1],
               pattern="identical", dtype=torch.float16, seed=9)
    gen = torch.Generator().manual_seed(0)
    down, up, sizes, scales, acts = make_store(2, 4, 16, 8, torch.float16, gen)
    y0 = torch.randn(5, 8, generator=gen).half()
    x = torch.randn(5, 16, generator=gen).half()
    meta = co.multi_adapter_meta(torch.full((5,), -1, dtype=torch.int32), 2)
    y, _ = run_multi(emulator, tmp_path, y0, x.reshape(-1), 16, 0, 16, down, up, sizes, scales, acts, meta)
    assert torch.equal(y, y0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("placement", ["parallel", "output"])
def test_emulated_bottleneck(emulator, tmp_path, dtype, placement):
    gen = torch.Generator().manual_seed(7)
    M, b = 5, 12
    K = 100 if placement == "parallel" else 96
    N = 77 if placement == "parallel" else K
    x = torch.randn(M, K, generator=gen).to(dtype)
    down = (torch.randn(b, K, generator=gen) / K ** 0.5).to(dtype)
    up = (torch.randn(N, b, generator=gen) / b ** 0.5).to(dtype)
    y0 = torch.randn(M, N, generator=gen).to(dtype)
    base = x if placement == "output" else y0
    scale = torch.tensor([0.6])
    for act in (range(6) if dtype == torch.float16 else (1, 3)):  # every activation once
        files = [_dump(tmp_path / f"{n}.bin", t) for n, t in
                 zip(("y0", "x", "down", "up", "scale"), (y0, x, down, up, scale))]
        out = tmp_path / "y.bin"
        proc = subprocess.run([str(emulator), "bottleneck", DT[dtype], *map(str, (M, N, K, b, act, K, 0)),
                               "1" if placement == "output" else "0", *files, str(out)],
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr
        y = torch.frombuffer(bytearray(out.read_bytes()), dtype=dtype).reshape(M, N)
        exact = co.bottleneck_fwd_ref(x.double(), base.double(), down.double(), up.double(), scale, act)
        ref_t = co.bottleneck_fwd_ref(x, base, down, up, scale, act)
        house_rule(y, ref_t, exact, f"bottleneck {placement} act {act} {dtype}")


@pytest.mark.parametrize("pattern,rows_per_slot", [("distinct", 3), ("identical", 20)])
def test_emulated_weights_read_once_per_call(emulator, tmp_path, pattern, rows_per_slot):
    """Counts the bytes the kernel's loads take from down and up. Each used adapter's rows up to
    its rank are read exactly once per call when its segment fits one producer task (16 rows) and
    one consumer pass (8 rows) -- the decode case; a larger segment re-reads the down slice once
    per 16 rows and the up tile once per 8 rows (L1 hits on the GPU, not DRAM traffic)."""
    gen = torch.Generator().manual_seed(17)
    S, R, K, N = 8, 32, 256, 200
    M = S * rows_per_slot if pattern == "distinct" else rows_per_slot
    sizes = [8, 16, 24, 8, 32, 0, 8, 16]  # "identical" puts every row on slot 4 (rank 32)
    down, up, sizes_t, scales, acts = make_store(S, R, K, N, torch.float16, gen, sizes=sizes)
    x = torch.randn(M, K, generator=gen).half()
    y0 = torch.randn(M, N, generator=gen).half()
    row_slot = make_row_slot(pattern, M, S, 0.0, gen)
    meta = co.multi_adapter_meta(row_slot, S)
    y, plan = run_multi(emulator, tmp_path, y0, x.reshape(-1), K, 0, K, down, up, sizes_t, scales,
                        acts, meta)
    want_down = want_up = 0
    for s in set(row_slot.tolist()):
        rows = int((row_slot == s).sum())
        want_down += -(-rows // 16) * sizes[s] * K * 2
        want_up += -(-rows // 8) * sizes[s] * N * 2
    assert (plan["down_bytes_read"], plan["up_bytes_read"]) == (want_down, want_up)
    if pattern == "distinct":  # the decode case: exactly the used adapters' bytes, once
        assert want_down == sum(sizes) * K * 2 and want_up == sum(sizes) * N * 2
    else:
        assert (want_down, want_up) == (2 * 32 * K * 2, 3 * 32 * N * 2)
    exact = co.multi_adapter_ref(y0.double(), x.double(), row_slot, down.double(), up.double(),
                                 sizes_t, scales, acts)
    house_rule(y, co.multi_adapter_ref(y0, x, row_slot, down, up, sizes_t, scales, acts), exact,
               f"read-count case {pattern}")
