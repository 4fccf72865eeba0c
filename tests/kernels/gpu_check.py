"""GPU checks of the compiled Triton adapter kernels (bench/gpu_session.sh runs this directly;
test_triton_gpu.py runs it in a subprocess).

The kernel tests' conftest sets TRITON_INTERPRET=1 for the whole pytest process, which would make
these kernels run interpreted; this script runs without it, on CUDA, with the compiled kernels.
Trimmed to fit a 15-minute GPU loan (issue 12): bf16, plus fp32 where issue 12 found a crash.

  - lora_linear, bottleneck residual and parallel, bf16, issue-3-sized shapes (K = N = 4096,
    M = 2048 and M = 1, r = 16 / b = 64 and 256) against an fp64 reference with the DESIGN.md rule
    (2x the error of the same-dtype torch reference);
  - fp32 with rank / bottleneck size 129-256 and M > 64 (the launch that asked for 262,144 B of
    shared memory before the rank dot was sliced), K = N = 1024;
  - rank 256 with dropout; the K / N splits of the row-block kernels (M = 2048 at rank 16);
  - dropout on the device: same seed same output, kept fraction, backward uses the forward mask;
  - the ops' triton backend equals the torch backend (fp32, forward and backward) on CUDA;
  - the grouped q/k/v kernels (kernels/lora_group.py; LoRA and parallel adapters) equal the single
    ones with the same seeds;
  - with two or more GPUs: a launch on cuda:1 while cuda:0 is current (the device guard).

Every check runs and prints one line as it finishes (``ok`` / ``FAIL`` with seconds), so a cut-short
run still says what passed; the exit status is non-zero if any failed.

    python tests/kernels/gpu_check.py
"""
import os
import sys
import time
import traceback

import torch

from kernel_checks import check_rule

DEV = "cuda"


def _rand(*shape, g, scale=1.0, dtype=torch.float32):
    return (torch.randn(*shape, generator=g) * scale).to(DEV, dtype)


def _lora_torch(x, w, b, a, bb, s, dy):
    x, a, bb = (t.detach().requires_grad_() for t in (x, a, bb))
    y = torch.nn.functional.linear(x, w, b) + (x @ a.t() @ bb.t()) * s
    y.backward(dy)
    return y.detach(), x.grad, a.grad, bb.grad


def check_lora(dtype, M, K=4096, N=4096, r=16):
    from fastadapters.kernels.lora import lora_linear_bwd, lora_linear_fwd

    g = torch.Generator().manual_seed(0)
    x, w, b = _rand(M, K, g=g, dtype=dtype), _rand(N, K, g=g, scale=K**-0.5, dtype=dtype), _rand(N, g=g, dtype=dtype)
    a, bb = _rand(r, K, g=g, scale=K**-0.5, dtype=dtype), _rand(N, r, g=g, scale=r**-0.5, dtype=dtype)
    dy = _rand(M, N, g=g, dtype=dtype)
    y, S = lora_linear_fwd(x, w, b, a, bb, 2.0)
    gx, ga, gb = lora_linear_bwd(dy, x, w, a, bb, S, 2.0)
    ref64 = _lora_torch(*(t.double() for t in (x, w, b, a, bb)), 2.0, dy.double())
    ref_t = _lora_torch(x, w, b, a, bb, 2.0, dy)
    for name, got, r64, rt in zip(("y", "grad_x", "grad_A", "grad_B"), (y, gx, ga, gb), ref64, ref_t):
        check_rule(f"lora {dtype} M={M} {name}", got, r64, rt)


def check_lora_dropout(K=256, N=192, M=512, r=8, p=0.1):
    from fastadapters.kernels.lora import launch_down_proj, lora_linear_bwd, lora_linear_fwd

    g = torch.Generator().manual_seed(1)
    x, w = _rand(M, K, g=g), _rand(N, K, g=g, scale=K**-0.5)
    a, bb = _rand(r, K, g=g, scale=K**-0.5), _rand(N, r, g=g)
    y1, S1 = lora_linear_fwd(x, w, None, a, bb, 1.0, p, 42)
    y2, S2 = lora_linear_fwd(x, w, None, a, bb, 1.0, p, 42)
    assert torch.equal(y1, y2) and torch.equal(S1, S2), "same seed, different output"
    xd = launch_down_proj(x, torch.eye(K, device=DEV), p, 42)  # x ⊙ keep / (1 - p), the forward's
    kept = (xd != 0).float().mean().item()
    assert abs(kept - (1 - p)) < 0.01, f"kept fraction {kept}"
    torch.testing.assert_close(S1, xd @ a.t(), atol=1e-4, rtol=1e-4)
    dy = _rand(M, N, g=g)
    _, ga, _ = lora_linear_bwd(dy, x, w, a, bb, S1, 1.0, p, 42)
    torch.testing.assert_close(ga, (dy @ bb).t() @ xd, atol=1e-3, rtol=1e-4)


def _branch_torch(z, down, up, s, act, base=None):
    z, down, up = (t.detach().requires_grad_() for t in (z, down, up))
    f = act(z @ down.t()) @ up.t()
    y = (z if base is None else base(z)) + s * f
    return y, (z, down, up)


def check_bottleneck(dtype, M, b, d=4096, N=4096):
    from fastadapters.kernels import bottleneck as BK

    g = torch.Generator().manual_seed(2)
    z = _rand(M, d, g=g, dtype=dtype)
    down, up = _rand(b, d, g=g, scale=d**-0.5, dtype=dtype), _rand(d, b, g=g, scale=b**-0.5, dtype=dtype)
    dy = _rand(M, d, g=g, dtype=dtype)
    y, pre = BK.bottleneck_residual_fwd(z, down, up, 0.5, "gelu")
    gz, gd, gu, _ = BK.bottleneck_residual_bwd(dy, z, pre, down, up, 0.5, "gelu")

    def ref(dt):
        yr, leaves = _branch_torch(z.to(dt), down.to(dt), up.to(dt), 0.5, torch.nn.functional.gelu)
        yr.backward(dy.to(dt))
        return [yr.detach()] + [t.grad for t in leaves]

    for name, got, r64, rt in zip(("y", "grad_z", "grad_down", "grad_up"), (y, gz, gd, gu), ref(torch.float64), ref(dtype)):
        check_rule(f"residual {dtype} M={M} b={b} {name}", got, r64, rt)

    w = _rand(N, d, g=g, scale=d**-0.5, dtype=dtype)
    up_p = _rand(N, b, g=g, scale=b**-0.5, dtype=dtype)
    dy = _rand(M, N, g=g, dtype=dtype)
    y, pre = BK.bottleneck_parallel_fwd(z, w, None, down, up_p, 0.5, "relu")
    gx, gd, gu, _ = BK.bottleneck_parallel_bwd(dy, z, w, pre, down, up_p, 0.5, "relu")

    def ref_p(dt):
        wd = w.to(dt)
        yr, leaves = _branch_torch(z.to(dt), down.to(dt), up_p.to(dt), 0.5, torch.relu,
                                   base=lambda t: torch.nn.functional.linear(t, wd))
        yr.backward(dy.to(dt))
        return [yr.detach()] + [t.grad for t in leaves]

    for name, got, r64, rt in zip(("y", "grad_x", "grad_down", "grad_up"), (y, gx, gd, gu), ref_p(torch.float64), ref_p(dtype)):
        check_rule(f"parallel {dtype} M={M} b={b} {name}", got, r64, rt)


def check_ops_backends(M=300, K=512, N=384):
    from fastadapters.ops.bottleneck import PLACEMENTS, bottleneck_linear
    from fastadapters.ops.lora import lora_linear

    g = torch.Generator().manual_seed(3)
    x = _rand(M, K, g=g).requires_grad_()
    w, b = _rand(N, K, g=g, scale=K**-0.5), _rand(N, g=g)
    a, bb = _rand(8, K, g=g, scale=K**-0.5).requires_grad_(), _rand(N, 8, g=g).requires_grad_()
    dy = _rand(M, N, g=g)

    def run(fn, leaves):
        for t in leaves:
            t.grad = None
        y = fn()
        y.backward(dy)
        return [y.detach()] + [t.grad.clone() for t in leaves]

    res = [run(lambda: lora_linear(x, w, b, a, bb, 0.5, backend=be), (x, a, bb)) for be in ("torch", "triton")]
    for u, v in zip(*res):
        torch.testing.assert_close(v, u, atol=1e-4, rtol=1e-4)
    for placement in PLACEMENTS:
        d_in, d_out = {"mh": (K, K), "output": (N, N), "parallel": (K, N)}[placement]
        down = _rand(16, d_in, g=g, scale=d_in**-0.5).requires_grad_()
        up = _rand(d_out, 16, g=g, scale=0.25).requires_grad_()
        s = torch.tensor(0.7, device=DEV, requires_grad=True)
        res = [run(lambda: bottleneck_linear(placement, x, (w, b), down, up, s, "tanh", backend=be), (x, down, up, s))
               for be in ("torch", "triton")]
        for u, v in zip(*res):
            torch.testing.assert_close(v, u, atol=1e-4, rtol=1e-4)


def check_lora_group(dtype, M, K=4096, outs=(4096, 1024, 1024), r=16, p=0.05, act=None):
    """q/k/v (Llama-3-8B widths) sharing X: the grouped kernels against the single ones, same seeds
    (``act``: parallel adapters with that activation and learned scalings, against bottleneck_parallel)."""
    from fastadapters.kernels import bottleneck as BK
    from fastadapters.kernels._common import activation_id
    from fastadapters.kernels.lora import lora_linear_bwd, lora_linear_fwd
    from fastadapters.kernels.lora_group import lora_group_bwd, lora_group_fwd

    g = torch.Generator().manual_seed(4)
    x = _rand(M, K, g=g, dtype=dtype)
    ws = [_rand(n, K, g=g, scale=K**-0.5, dtype=dtype) for n in outs]
    As = [_rand(r, K, g=g, scale=K**-0.5) for _ in outs]
    Bs = [_rand(n, r, g=g, scale=r**-0.5) for n in outs]
    dys = [_rand(M, n, g=g, dtype=dtype) for n in outs]
    seeds = [5, 6, 7]
    scal = [2.0, 2.0, 2.0] if act is None else [torch.tensor(v, device=DEV) for v in (0.5, 1.0, 2.0)]
    aid = 0 if act is None else activation_id(act)
    ys, s_pad = lora_group_fwd(x, ws, [None] * 3, As, Bs, scal, p, seeds, aid)
    gx, gAs, gBs, gSs = lora_group_bwd(dys, x, ws, As, Bs, s_pad, scal, p, seeds, activation=aid)
    gx_one = torch.zeros(M, K, device=DEV, dtype=torch.float32)
    tol = dict(atol=2e-2, rtol=2e-2) if dtype != torch.float32 else dict(atol=1e-4, rtol=1e-4)
    for i in range(3):
        if act is None:
            y1, s1 = lora_linear_fwd(x, ws[i], None, As[i], Bs[i], scal[i], p, seeds[i])
            dx1, da1, db1 = lora_linear_bwd(dys[i], x, ws[i], As[i], Bs[i], s1, scal[i], p, seeds[i])
        else:
            y1, s1 = BK.bottleneck_parallel_fwd(x, ws[i], None, As[i], Bs[i], scal[i], act, p, seeds[i])
            dx1, da1, db1, ds1 = BK.bottleneck_parallel_bwd(dys[i], x, ws[i], s1, As[i], Bs[i], scal[i], act, p,
                                                            seeds[i])
            torch.testing.assert_close(gSs[i], ds1, **tol)
        torch.testing.assert_close(ys[i], y1, **tol)
        torch.testing.assert_close(gAs[i], da1, **tol)
        torch.testing.assert_close(gBs[i], db1, **tol)
        gx_one += dx1.float()
    torch.testing.assert_close(gx.float(), gx_one, **tol)


def check_multi_device():
    """Tensors on cuda:1 while cuda:0 is current: the launch follows the tensors (device guard)."""
    if torch.cuda.device_count() < 2:
        print("skip multi_device: one GPU", flush=True)
        return
    global DEV
    saved, DEV = DEV, "cuda:1"
    try:
        torch.cuda.set_device(0)
        check_lora(torch.bfloat16, 256, K=512, N=384, r=16)
        check_bottleneck(torch.bfloat16, 130, 64, d=512, N=384)
    finally:
        DEV = saved


def report_fp32_timing(M=2048, K=4096, N=4096, r=16):
    """Information, not a check: fp32 (IEEE) fused LoRA forward + backward vs plain torch (cuBLAS),
    to decide whether fp32 without TF32 should run the kernels or the torch path (issue 12)."""
    import triton.testing

    from fastadapters.kernels.lora import lora_linear_bwd, lora_linear_fwd

    g = torch.Generator().manual_seed(9)
    x, w = _rand(M, K, g=g), _rand(N, K, g=g, scale=K**-0.5)
    a, bb, dy = _rand(r, K, g=g, scale=K**-0.5), _rand(N, r, g=g), _rand(M, N, g=g)

    def fused():
        y, S = lora_linear_fwd(x, w, None, a, bb, 2.0)
        lora_linear_bwd(dy, x, w, a, bb, S, 2.0)

    def plain():
        _lora_torch(x, w, None, a, bb, 2.0, dy)

    t_f, t_p = triton.testing.do_bench(fused), triton.testing.do_bench(plain)
    print(f"info fp32 LoRA fwd+bwd M={M} K={K} N={N} r={r}: fused {t_f:.3f} ms, torch {t_p:.3f} ms "
          f"(ratio {t_f / t_p:.2f}) on {torch.cuda.get_device_name()}", flush=True)


CHECKS = [
    ("lora bf16 M=2048", lambda: check_lora(torch.bfloat16, 2048)),
    ("lora bf16 M=1", lambda: check_lora(torch.bfloat16, 1)),
    ("lora bf16 M=2048 r=256", lambda: check_lora(torch.bfloat16, 2048, r=256)),
    ("bottleneck bf16 M=2048 b=64", lambda: check_bottleneck(torch.bfloat16, 2048, 64)),
    ("bottleneck bf16 M=2048 b=256", lambda: check_bottleneck(torch.bfloat16, 2048, 256)),
    ("bottleneck bf16 M=1 b=64", lambda: check_bottleneck(torch.bfloat16, 1, 64)),
    ("lora fp32 M=300 r=256", lambda: check_lora(torch.float32, 300, K=1024, N=1024, r=256)),
    ("lora fp32 M=300 r=130", lambda: check_lora(torch.float32, 300, K=1024, N=1024, r=130)),
    ("bottleneck fp32 M=300 b=256", lambda: check_bottleneck(torch.float32, 300, 256, d=1024, N=1024)),
    ("lora dropout", check_lora_dropout),
    ("ops triton == torch (fp32)", check_ops_backends),
    ("lora group bf16 M=2048", lambda: check_lora_group(torch.bfloat16, 2048)),
    ("lora group bf16 M=1", lambda: check_lora_group(torch.bfloat16, 1)),
    ("lora group fp32 M=2048", lambda: check_lora_group(torch.float32, 2048)),
    ("parallel group bf16 b=64", lambda: check_lora_group(torch.bfloat16, 2048, r=64, act="relu")),
    ("parallel group bf16 b=256", lambda: check_lora_group(torch.bfloat16, 2048, r=256, act="relu")),
    ("multi device", check_multi_device),
    ("fp32 timing (information)", report_fp32_timing),
]


def main() -> int:
    assert os.environ.get("TRITON_INTERPRET", "0") != "1", "run without TRITON_INTERPRET"
    assert torch.cuda.is_available(), "needs a CUDA GPU"
    torch.backends.cuda.matmul.allow_tf32 = False
    only = sys.argv[1:]  # optional substrings of check names
    failed = []
    print("gpu_check on", torch.cuda.get_device_name(), flush=True)
    for name, fn in CHECKS:
        if only and not any(o in name for o in only):
            continue
        t = time.time()
        try:
            fn()
            torch.cuda.synchronize()
            print(f"ok   {name} ({time.time() - t:.1f}s)", flush=True)
        except Exception:  # every check runs: one GPU loan, as much learned from it as possible
            failed.append(name)
            print(f"FAIL {name} ({time.time() - t:.1f}s)\n{traceback.format_exc()[-3000:]}", flush=True)
    if failed:
        print(f"gpu_check: {len(failed)} failed: {failed}", flush=True)
        return 1
    print("gpu_check: all passed on", torch.cuda.get_device_name(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
