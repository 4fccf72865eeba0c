"""Host-side logic of the CUDA ops, on the CPU: the segment metadata and its contract, the
multi-adapter reference against an explicit per-row loop in fp64, the ops' CPU kernels, fakes and
opcheck, argument checks that name the bad value, and the extension loader's choices.
"""
from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F

from fastadapters import _ext
from fastadapters.ops import cuda_ops as co

from adapter_cases import PATTERNS, loop_reference, make_row_slot, make_store


# ------------------------------------------------------------------------------------------------
# metadata


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("M,S", [(1, 1), (1, 4), (37, 5), (64, 64), (37, 100)])
def test_meta_contract_and_round_trip(pattern, M, S):
    gen = torch.Generator().manual_seed(M * 1000 + S)
    row_slot = make_row_slot(pattern, M, S, 0.25, gen)
    meta = co.multi_adapter_meta(row_slot, S)
    co.check_multi_adapter_meta(meta, M, S)
    G = min(M, S + 1)
    assert meta.seg_slots.shape == (G,) and meta.seg_starts.shape == (G + 1,)
    assert all(t.dtype == torch.int32 for t in meta)
    # each segment holds the rows of exactly its slot, base rows form the last used segment
    st, sl, rows = meta.seg_starts.tolist(), meta.seg_slots.tolist(), meta.sorted_rows.tolist()
    for g in range(G):
        seg_rows = rows[st[g]:st[g + 1]]
        assert all(int(row_slot[r]) == sl[g] for r in seg_rows), (g, sl[g], seg_rows)
        assert seg_rows == sorted(seg_rows)  # stable
    used = [g for g in range(G) if st[g + 1] > st[g]]
    assert len(used) == len(set(row_slot.tolist()))
    assert used == list(range(len(used)))  # used segments first, empty ones at the tail
    assert torch.equal(co._row_slot_from_meta(meta, M, S), row_slot)


def test_meta_edge_cases():
    empty = co.multi_adapter_meta(torch.zeros(0, dtype=torch.int32), 4)
    assert empty.sorted_rows.shape == (0,) and empty.seg_starts.tolist() == [0]
    base = co.multi_adapter_meta(torch.full((5,), -1, dtype=torch.int32), 3)
    assert base.seg_slots.tolist() == [-1, -1, -1, -1] and base.seg_starts.tolist() == [0, 5, 5, 5, 5]
    # out-of-range slots are treated as base rows (memory safety in the kernel)
    oob = co.multi_adapter_meta(torch.tensor([0, 7, 1, -3], dtype=torch.int32), 2)
    assert co._row_slot_from_meta(oob, 4, 2).tolist() == [0, -1, 1, -1]
    # the segment count depends on the shapes only, not on the mix
    a = co.multi_adapter_meta(torch.tensor([0, 0, 0, 0], dtype=torch.int32), 8)
    b = co.multi_adapter_meta(torch.tensor([3, 1, 2, 0], dtype=torch.int32), 8)
    assert a.seg_slots.shape == b.seg_slots.shape == (4,)


def test_meta_refills_in_place():
    a = co.multi_adapter_meta(torch.tensor([2, 2, -1, 0, 1], dtype=torch.int32), 3)
    ptrs = [t.data_ptr() for t in a]
    mix = torch.tensor([1, -1, 0, 0, 2], dtype=torch.int32)
    b = co.multi_adapter_meta(mix, 3, out=a)
    assert b is a and [t.data_ptr() for t in b] == ptrs
    assert all(torch.equal(x, y) for x, y in zip(b, co.multi_adapter_meta(mix, 3)))
    with pytest.raises(ValueError, match="built for another"):
        co.multi_adapter_meta(torch.zeros(6, dtype=torch.int32), 3, out=a)


def test_meta_validator_rejects_broken_metadata():
    meta = co.multi_adapter_meta(torch.tensor([1, 0, 1, -1], dtype=torch.int32), 2)
    bad_perm = meta._replace(sorted_rows=torch.tensor([0, 0, 2, 3], dtype=torch.int32))
    with pytest.raises(ValueError, match="permutation"):
        co.check_multi_adapter_meta(bad_perm, 4, 2)
    bad_starts = meta._replace(seg_starts=torch.tensor([0, 3, 2, 4], dtype=torch.int32))
    with pytest.raises(ValueError, match="non-decreasing"):
        co.check_multi_adapter_meta(bad_starts, 4, 2)
    dup = meta._replace(seg_slots=torch.tensor([1, 1, -1], dtype=torch.int32))
    with pytest.raises(ValueError, match="more than one segment"):
        co.check_multi_adapter_meta(dup, 4, 2)


# ------------------------------------------------------------------------------------------------
# reference and CPU kernels


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("M,K,N", [(1, 100, 77), (37, 100, 77), (8, 64, 32)])
def test_ref_matches_per_row_loop_fp64(pattern, M, K, N):
    gen = torch.Generator().manual_seed(M + K + N)
    S, R = 6, 8
    down, up, sizes, scales, acts = make_store(S, R, K, N, torch.float64, gen,
                                               sizes=[1, 5, 8, 0, 3, 7], acts=[0, 1, 2, 3, 4, 5])
    x = torch.randn(M, K, generator=gen, dtype=torch.float64)
    y0 = torch.randn(M, N, generator=gen, dtype=torch.float64)
    row_slot = make_row_slot(pattern, M, S, 0.2, gen)
    got = co.multi_adapter_ref(y0, x, row_slot, down, up, sizes, scales, acts)
    want = loop_reference(y0, x, row_slot, down, up, sizes, scales, acts)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_ref_ignores_padding_and_base_rows():
    gen = torch.Generator().manual_seed(1)
    S, R, K, N, M = 3, 6, 20, 9, 7
    down, up, sizes, scales, acts = make_store(S, R, K, N, torch.float64, gen, sizes=[2, 0, 6],
                                               acts=[5, 3, 1])
    down[0, 2:] = float("nan")  # padding beyond sizes[s] must never be read into the result
    up[0, :, 2:] = float("inf")
    x = torch.randn(M, K, generator=gen, dtype=torch.float64)
    y0 = torch.randn(M, N, generator=gen, dtype=torch.float64)
    row_slot = torch.tensor([0, -1, 1, 2, 0, -1, 1], dtype=torch.int32)
    y = co.multi_adapter_ref(y0, x, row_slot, down, up, sizes, scales, acts)
    assert torch.isfinite(y).all()
    base = row_slot < 0
    assert torch.equal(y[base], y0[base])
    assert torch.equal(y[2], y0[2]) and torch.equal(y[6], y0[6])  # size 0 slot: no change
    torch.testing.assert_close(y, loop_reference(y0, x, row_slot, down.nan_to_num(0),
                                                 up.nan_to_num(0, 0, 0), sizes, scales, acts))


def test_mixed_batch_equals_each_adapter_alone():
    """Metamorphic: every row of a mixed batch equals that row run in a batch of its adapter only."""
    gen = torch.Generator().manual_seed(2)
    S, R, K, N, M = 5, 16, 48, 40, 23
    down, up, sizes, scales, acts = make_store(S, R, K, N, torch.float32, gen,
                                               sizes=[1, 4, 16, 5, 9], acts=[0, 0, 1, 3, 4])
    x = torch.randn(M, K, generator=gen)
    y0 = torch.randn(M, N, generator=gen)
    row_slot = make_row_slot("skewed", M, S, 0.2, gen)
    mixed = co.multi_adapter_cuda(y0, x, row_slot, down, up, sizes, scales, acts)
    for s in range(-1, S):
        rows = (row_slot == s).nonzero().flatten()
        if rows.numel() == 0:
            continue
        alone = co.multi_adapter_cuda(y0[rows], x[rows], row_slot[rows], down, up, sizes, scales, acts)
        torch.testing.assert_close(mixed[rows], alone, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cpu_op_matches_ref(dtype):
    gen = torch.Generator().manual_seed(3)
    S, R, K, N, M = 4, 5, 100, 77, 37
    down, up, sizes, scales, acts = make_store(S, R, K, N, dtype, gen, sizes=[1, 5, 0, 3])
    x = torch.randn(M, K, generator=gen).to(dtype)
    y0 = torch.randn(M, N, generator=gen).to(dtype)
    row_slot = make_row_slot("uniform", M, S, 0.3, gen)
    meta = co.multi_adapter_meta(row_slot, S)
    y = torch.ops.fastadapters.cuda_multi_adapter(y0, x, *meta, down, up, sizes, scales, acts)
    assert y.dtype == dtype and y.shape == (M, N)
    assert torch.equal(y, co.multi_adapter_ref(y0, x, row_slot, down, up, sizes, scales, acts))


def test_wrapper_accepts_column_strided_inputs():
    gen = torch.Generator().manual_seed(13)
    S, R, K, N, M = 3, 4, 12, 10, 5
    down, up, sizes, scales, acts = make_store(S, R, K, N, torch.float32, gen, sizes=[4, 1, 2])
    x = torch.randn(K, M, generator=gen).t()  # stride(1) == M
    y0 = torch.randn(N, M, generator=gen).t()
    row_slot = torch.tensor([0, 2, -1, 1, 0], dtype=torch.int32)
    got = co.multi_adapter_cuda(y0, x, row_slot, down, up, sizes, scales, acts)
    want = co.multi_adapter_ref(y0.contiguous(), x.contiguous(), row_slot, down, up, sizes, scales, acts)
    assert torch.equal(got, want)


def test_opcheck_cpu():
    gen = torch.Generator().manual_seed(4)
    S, R, K, N, M = 3, 5, 24, 10, 9
    down, up, sizes, scales, acts = make_store(S, R, K, N, torch.float32, gen, sizes=[1, 5, 2])
    x = torch.randn(M, K, generator=gen)
    y0 = torch.randn(M, N, generator=gen)
    meta = co.multi_adapter_meta(make_row_slot("uniform", M, S, 0.3, gen), S)
    torch.library.opcheck(torch.ops.fastadapters.cuda_multi_adapter,
                          (y0, x, *meta, down, up, sizes, scales, acts))
    scale = torch.tensor([0.7])
    torch.library.opcheck(torch.ops.fastadapters.cuda_bottleneck_fwd,
                          (x, y0, torch.randn(4, K), torch.randn(N, 4), scale, 3))


def test_fakes_give_shapes_without_data():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(37, 100, dtype=torch.bfloat16)
        y0 = torch.empty(37, 77, dtype=torch.bfloat16)
        down = torch.empty(6, 16, 100, dtype=torch.bfloat16)
        up = torch.empty(6, 77, 16, dtype=torch.bfloat16)
        ints = torch.empty(6, dtype=torch.int32)
        y = torch.ops.fastadapters.cuda_multi_adapter(
            y0, x, torch.empty(37, dtype=torch.int32), torch.empty(8, dtype=torch.int32),
            torch.empty(7, dtype=torch.int32), down, up, ints, torch.empty(6), ints)
        assert y.shape == (37, 77) and y.dtype == torch.bfloat16
        yb = torch.ops.fastadapters.cuda_bottleneck_fwd(x, y0, torch.empty(8, 100, dtype=torch.bfloat16),
                                                        torch.empty(77, 8, dtype=torch.bfloat16),
                                                        torch.empty(1), 1)
        assert yb.shape == (37, 77) and yb.dtype == torch.bfloat16
        with pytest.raises(ValueError, match=r"expected up of shape \(S, N, R\) = \(6, 77, 16\)"):
            torch.ops.fastadapters.cuda_multi_adapter(
                y0, x, torch.empty(37, dtype=torch.int32), torch.empty(8, dtype=torch.int32),
                torch.empty(7, dtype=torch.int32), down, up[:, :, :15], ints, torch.empty(6), ints)


def test_compile_fullgraph_cpu():
    gen = torch.Generator().manual_seed(5)
    S, R, K, N, M = 3, 4, 16, 12, 6
    down, up, sizes, scales, acts = make_store(S, R, K, N, torch.float32, gen, sizes=[4, 2, 1])
    x = torch.randn(M, K, generator=gen)
    y0 = torch.randn(M, N, generator=gen)
    row_slot = torch.tensor([2, -1, 0, 0, 1, 2], dtype=torch.int32)

    def f(y0, x, row_slot):
        return co.multi_adapter_cuda(y0, x, row_slot, down, up, sizes, scales, acts)

    got = torch.compile(f, fullgraph=True, backend="eager")(y0, x, row_slot)
    torch.testing.assert_close(got, f(y0, x, row_slot))


@pytest.mark.parametrize("placement", ["parallel", "output"])
@pytest.mark.parametrize("act", ["identity", "tanh", "relu", "gelu", "swish", "sigmoid"])
def test_bottleneck_fwd_cpu_matches_formula(placement, act):
    gen = torch.Generator().manual_seed(6)
    M, K, b = 5, 33, 7
    N = K if placement == "output" else 21
    x = torch.randn(2, M, K, generator=gen, dtype=torch.float64)
    down = torch.randn(b, K, generator=gen, dtype=torch.float64)
    up = torch.randn(N, b, generator=gen, dtype=torch.float64)
    y0 = torch.randn(2, M, N, generator=gen, dtype=torch.float64) if placement == "parallel" else None
    fn = {"identity": lambda t: t, "tanh": torch.tanh, "relu": torch.relu, "gelu": F.gelu,
          "swish": F.silu, "sigmoid": torch.sigmoid}[act]
    y = co.bottleneck_fwd_cuda(x, down, up, 0.3, act=act, placement=placement, y0=y0)
    base = x if placement == "output" else y0
    torch.testing.assert_close(y, base + 0.3 * fn(x @ down.t()) @ up.t())
    # a learned (tensor) scaling gives the same
    y_t = co.bottleneck_fwd_cuda(x, down, up, torch.tensor(0.3, dtype=torch.float64), act=act,
                                 placement=placement, y0=y0)
    torch.testing.assert_close(y_t, y)


def test_act_ids_agree_with_the_store_table():
    from fastadapters.ops.bottleneck import ACT_IDS

    for name, i in ACT_IDS.items():
        assert co.act_id_of(name) == i, name


# ------------------------------------------------------------------------------------------------
# argument checks


def _good_args(M=4, K=8, N=6, S=3, R=2):
    return dict(y0=torch.zeros(M, N), x=torch.zeros(M, K), row_slot=torch.zeros(M, dtype=torch.int32),
                down=torch.zeros(S, R, K), up=torch.zeros(S, N, R),
                sizes=torch.ones(S, dtype=torch.int32), scales=torch.ones(S),
                act_ids=torch.zeros(S, dtype=torch.int32))


@pytest.mark.parametrize("field,value,message", [
    ("x", torch.zeros(4, 9), r"expected down of shape \(S, R, K\) = \(3, 2, 9\), got \(3, 2, 8\)"),
    ("y0", torch.zeros(4, 5), r"expected y0 of shape \(M, N\) = \(4, 6\), got \(4, 5\)"),
    ("up", torch.zeros(3, 6, 3), r"expected up of shape \(S, N, R\) = \(3, 6, 2\), got \(3, 6, 3\)"),
    ("sizes", torch.ones(2, dtype=torch.int32), r"expected sizes of shape \(S,\) = \(3,\), got \(2,\)"),
    ("sizes", torch.ones(3, dtype=torch.int64), r"expected sizes of dtype torch.int32, got torch.int64"),
    ("scales", torch.ones(3, dtype=torch.float64), r"expected scales of dtype torch.float32"),
    ("down", torch.zeros(3, 2, 8, dtype=torch.float16), r"expected down of dtype torch.float32, got torch.float16"),
    ("x", torch.zeros(4, 8, dtype=torch.int32), r"expected x of dtype"),
    ("act_ids", torch.zeros(3, dtype=torch.int32, device="meta"), r"expected act_ids on cpu"),
    ("row_slot", torch.zeros(5, dtype=torch.int32), r"expected row_slot of shape \(M,\) = \(4,\), got \(5,\)"),
    ("x", torch.zeros(4, 8, 1), r"expected x with 2 dimensions \(M, K\), got shape \(4, 8, 1\)"),
])
def test_multi_adapter_checks_name_the_bad_value(field, value, message):
    args = _good_args()
    args[field] = value
    with pytest.raises(ValueError, match=message):
        co.multi_adapter_cuda(**args)


def test_ref_checks_values():
    args = _good_args()
    args["row_slot"] = torch.tensor([0, 3, 1, -1], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"row_slot\[1\] = 3, but the store has 3 slots"):
        co.multi_adapter_ref(**args)
    args = _good_args()
    args["sizes"] = torch.tensor([1, 3, 0], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"sizes: expected values in 0..R=2"):
        co.multi_adapter_ref(**args)
    args = _good_args()
    args["act_ids"] = torch.tensor([0, 6, 0], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"act_ids: expected values in 0..5"):
        co.multi_adapter_ref(**args)


def test_bottleneck_checks():
    x, down, up = torch.zeros(3, 8), torch.zeros(2, 8), torch.zeros(8, 2)
    with pytest.raises(ValueError, match="act: got 'elu'"):
        co.bottleneck_fwd_cuda(x, down, up, 1.0, act="elu", placement="output")
    with pytest.raises(ValueError, match="placement: got 'mh'"):
        co.bottleneck_fwd_cuda(x, down, up, 1.0, placement="mh")
    with pytest.raises(ValueError, match="needs y0"):
        co.bottleneck_fwd_cuda(x, down, up, 1.0, placement="parallel")
    with pytest.raises(ValueError, match=r"expected up of shape \(N, b\) = \(8, 2\), got \(8, 3\)"):
        co.bottleneck_fwd_cuda(x, down, torch.zeros(8, 3), 1.0, placement="output")
    with pytest.raises(ValueError, match=r"expected y0 of shape \(M, N\) = \(3, 5\), got \(3, 8\)"):
        co.bottleneck_fwd_cuda(x, down, torch.zeros(5, 2), 1.0, placement="output")
    with pytest.raises(ValueError, match="expected scale with 1 element"):
        co.bottleneck_fwd_cuda(x, down, up, torch.ones(2), placement="output")


# ------------------------------------------------------------------------------------------------
# the extension loader


def test_arch_flags():
    base = ["-gencode", "arch=compute_80,code=sm_80", "-gencode", "arch=compute_90a,code=sm_90a",
            "-gencode", "arch=compute_80,code=compute_80"]
    assert _ext.arch_gencode_flags("") == base
    assert _ext.arch_gencode_flags("8.0;8.6 9.0a;10.0+PTX") == base + [
        "-gencode", "arch=compute_86,code=sm_86", "-gencode", "arch=compute_100,code=sm_100",
        "-gencode", "arch=compute_100,code=compute_100"]
    with pytest.raises(ValueError, match="cannot parse 'Ampere'"):
        _ext.arch_gencode_flags("Ampere")


def test_setup_builds_the_same_archs_and_sources():
    """setup.py cannot import the package under build isolation, so it repeats the lists: keep
    them equal to the loader's."""
    import ast
    from pathlib import Path

    tree = ast.parse((Path(__file__).resolve().parents[2] / "setup.py").read_text())
    values = {t.id: ast.literal_eval(node.value) for node in tree.body if isinstance(node, ast.Assign)
              for t in node.targets if isinstance(t, ast.Name) and t.id in ("BASE_GENCODE", "EXT_SOURCES")}
    assert tuple(values["BASE_GENCODE"]) == _ext.BASE_GENCODE
    assert [s.split("/")[-1] for s in values["EXT_SOURCES"]] == list(_ext.SOURCES)


def _toolkit(root, headers=True):
    (root / "bin").mkdir(parents=True)
    (root / "bin" / "nvcc").write_text("#!/bin/sh\n")
    if headers:
        (root / "include").mkdir()
        (root / "include" / "cuda_runtime_api.h").write_text("")
    return str(root)


def test_cuda_home_skips_a_wrapper_without_headers(tmp_path):
    """nvcc on PATH may be a wrapper script (/usr/local/bin/nvcc) whose parent has no toolkit:
    the search goes on to a root with both nvcc and the runtime headers."""
    wrapper = _toolkit(tmp_path / "local", headers=False)
    real = _toolkit(tmp_path / "cuda-13.0")
    assert _ext.find_cuda_home([wrapper, real]) == real
    assert _ext.find_cuda_home([None, wrapper]) is None
    assert _ext.find_cuda_home([real, wrapper]) == real


def test_setup_searches_cuda_home_as_the_loader_does(tmp_path, monkeypatch):
    import ast
    from pathlib import Path

    src = (Path(__file__).resolve().parents[2] / "setup.py").read_text()
    fn = next(n for n in ast.parse(src).body if isinstance(n, ast.FunctionDef) and n.name == "_find_cuda_home")
    import glob
    import os
    import shutil

    ns = {"glob": glob, "os": os, "shutil": shutil, "Path": Path}
    exec(compile(ast.Module([fn], []), "setup.py", "exec"), ns)
    real = _toolkit(tmp_path / "real")
    wrapper_bin = tmp_path / "wrap" / "bin"
    _toolkit(tmp_path / "wrap", headers=False)
    monkeypatch.setenv("PATH", str(wrapper_bin))
    monkeypatch.delenv("CUDA_PATH", raising=False)
    monkeypatch.setenv("CUDA_HOME", real)
    assert ns["_find_cuda_home"]() == real == _ext.find_cuda_home()


def test_sources_found():
    src = _ext.csrc_dir()
    assert all((src / s).is_file() for s in _ext.SOURCES)


@pytest.mark.skipif(torch.version.cuda is not None, reason="checks the CPU-only torch message")
def test_load_extension_on_cpu_torch_says_what_to_do():
    assert "CPU-only build" in _ext.extension_status()
    with pytest.raises(_ext.ExtensionUnavailable, match="CPU-only build of|CPU-only build"):
        _ext.load_extension()


def test_import_touches_no_cuda():
    import subprocess
    import sys

    code = ("import torch, fastadapters._ext, fastadapters.ops.cuda_ops; "
            "assert not torch.cuda.is_initialized(); print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


# ------------------------------------------------------------------------------------------------
# agreement with the house ops built by others on the same semantics (fp64, CPU)


@pytest.mark.parametrize("placement", ["parallel", "output"])
@pytest.mark.parametrize("act", ["tanh", "gelu", "sigmoid"])
def test_bottleneck_fwd_agrees_with_ops_bottleneck(placement, act):
    from fastadapters.ops import bottleneck as ob

    gen = torch.Generator().manual_seed(14)
    M, K, b = 6, 24, 5
    N = K if placement == "output" else 18
    x = torch.randn(M, K, generator=gen, dtype=torch.float64)
    W = torch.randn(N, K, generator=gen, dtype=torch.float64)
    bias = torch.randn(N, generator=gen, dtype=torch.float64)
    d_in = N if placement == "output" else K
    down = torch.randn(b, d_in, generator=gen, dtype=torch.float64)
    up = torch.randn(N, b, generator=gen, dtype=torch.float64)
    # 0.375 is exact in fp32 (the kernels take the scale as fp32)
    theirs = ob.bottleneck_linear(placement, x, (W, bias), down, up, 0.375, act, backend="torch")
    h = x @ W.t() + bias
    if placement == "output":
        mine = co.bottleneck_fwd_cuda(h, down, up, 0.375, act=act, placement="output")
    else:
        mine = co.bottleneck_fwd_cuda(x, down, up, 0.375, act=act, placement="parallel", y0=h)
    torch.testing.assert_close(mine, theirs, rtol=1e-10, atol=1e-10)


def test_multi_adapter_ref_agrees_with_ops_multi():
    multi = pytest.importorskip("fastadapters.ops.multi")
    gen = torch.Generator().manual_seed(15)
    S, R, K, N, M = 6, 8, 40, 30, 29
    down, up, sizes, scales, acts = make_store(S, R, K, N, torch.float64, gen, sizes=[1, 5, 8, 7, 0, 3])
    x = torch.randn(M, K, generator=gen, dtype=torch.float64)
    y0 = torch.randn(M, N, generator=gen, dtype=torch.float64)
    row_slot = make_row_slot("skewed", M, S, 0.2, gen)
    torch.testing.assert_close(co.multi_adapter_ref(y0, x, row_slot, down, up, sizes, scales, acts),
                               multi.multi_adapter_ref(y0, x, row_slot, down, up, sizes, scales, acts),
                               rtol=1e-12, atol=1e-12)


def _built_extension():
    """The extension built at install time, loaded; a skip that says why where there is none."""
    if torch.version.cuda is None:
        pytest.skip(f"torch {torch.__version__} is a CPU-only build: fastadapters._C cannot be built")
    status = _ext.extension_status()
    if status != "built":
        pytest.skip(f"fastadapters._C was not built at install time ({status})")
    return _ext.load_extension()


def test_built_extension_registers_cuda_kernels_under_the_python_schemas():
    """The C++ library adds CUDA kernels to the ops whose schemas, fakes and CPU kernels Python defined
    (runs with a CUDA build of torch, GPU or not)."""
    _built_extension()
    for schema in (co.MULTI_ADAPTER_SCHEMA, co.BOTTLENECK_FWD_SCHEMA):
        name = f"{co.NAMESPACE}::{schema.split('(', 1)[0]}"
        for key in ("CUDA", "CPU", "Meta"):
            assert torch._C._dispatch_has_kernel_for_dispatch_key(name, key), (name, key)


def test_cuda_kernel_checks_its_arguments_before_launching():
    """The C++ kernel entry, reached with CPU tensors by forcing the CUDA dispatch key, refuses them
    with the message csrc/ops.cpp documents (no GPU needed: nothing is launched)."""
    _built_extension()
    cuda = torch._C.DispatchKeySet(torch._C.DispatchKey.CUDA)
    x, y0 = torch.randn(3, 8, dtype=torch.bfloat16), torch.randn(3, 5, dtype=torch.bfloat16)
    down, up = torch.randn(2, 8, dtype=torch.bfloat16), torch.randn(5, 2, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="cuda_bottleneck_fwd: expected x on a CUDA device, got x on cpu"):
        torch.ops.fastadapters.cuda_bottleneck_fwd.default.redispatch(cuda, x, y0, down, up, torch.ones(1), 0)
