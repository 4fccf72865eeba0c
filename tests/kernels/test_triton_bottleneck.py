"""fastadapters.kernels.bottleneck under the Triton interpreter vs fp64 / same-dtype torch references."""
import pytest
import torch

from kernel_checks import check_rule
from fastadapters.kernels import bottleneck as BK
from fastadapters.kernels import lora as LK

ACTS = {
    "identity": lambda t: t,
    "relu": torch.relu,
    "tanh": torch.tanh,
    "gelu": torch.nn.functional.gelu,
    "silu": torch.nn.functional.silu,
    "sigmoid": torch.sigmoid,
}


def dropout_mask(M, d, p, seed):
    if p == 0:
        return torch.ones(M, d, dtype=torch.bool)
    return LK.launch_down_proj(torch.ones(M, d), torch.eye(d), p, seed) != 0


def params(d_in, d_out, b, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    down = torch.randn(b, d_in, generator=g) / d_in**0.5
    up = torch.randn(d_out, b, generator=g) / b**0.5
    return down.to(dtype), up.to(dtype)


def torch_adapter(z, down, up, s, act, mask, p, dy, base=None):
    """y = base(z) + s·act(dropout(z)·downᵀ)·upᵀ (base None: identity residual), autograd grads."""
    z = z.detach().requires_grad_()
    down = down.detach().requires_grad_()
    up = up.detach().requires_grad_()
    s_t = torch.tensor(s, dtype=z.dtype, requires_grad=True)
    zd = z * mask.to(z.dtype) / (1 - p) if p > 0 else z
    f = ACTS[act](zd @ down.t()) @ up.t()
    y = (z if base is None else base(z)) + s_t * f
    y.backward(dy)
    return y.detach(), z.grad, down.grad, up.grad, s_t.grad


DTYPES = (torch.float32, torch.bfloat16, torch.float16)
RESIDUAL_CASES = [  # (M, d, b, act, p, learned scaling)
    (1, 100, 3, "relu", 0.0, False),
    (37, 100, 5, "tanh", 0.1, True),
    (70, 48, 16, "gelu", 0.0, True),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("M,d,b,act,p,learned", RESIDUAL_CASES)
def test_residual_fwd_bwd_matches_reference(M, d, b, act, p, learned, dtype):
    z = torch.randn(M, d, generator=torch.Generator().manual_seed(3)).to(dtype)
    down, up = params(d, d, b, dtype)
    dy = torch.randn(M, d, generator=torch.Generator().manual_seed(4)).to(dtype)
    s, seed = 0.5, 77
    scaling = torch.tensor([s], dtype=torch.float32) if learned else s
    y, pre = BK.bottleneck_residual_fwd(z, down, up, scaling, act, p, seed)
    gz, gd, gu, gs = BK.bottleneck_residual_bwd(dy, z, pre, down, up, scaling, act, p, seed)
    mask = dropout_mask(M, d, p, seed)
    ref64 = torch_adapter(z.double(), down.double(), up.double(), s, act, mask, p, dy.double())
    ref_t = torch_adapter(z, down, up, s, act, mask, p, dy)
    for name, got, r64, rt in zip(("y", "grad_z", "grad_down", "grad_up"), (y, gz, gd, gu), ref64, ref_t):
        assert got.dtype == dtype, f"{name} dtype {got.dtype}"
        check_rule(name, got, r64, rt)
    if learned:
        assert gs.shape == scaling.shape and gs.dtype == scaling.dtype
        check_rule("grad_scaling", gs.reshape(()), ref64[4], ref_t[4].float() if dtype != torch.float32 else ref_t[4])
    else:
        assert gs is None


@pytest.mark.parametrize("act", sorted(ACTS))
def test_every_activation_fp32(act):
    M, d, b = 19, 40, 6
    z = torch.randn(M, d, generator=torch.Generator().manual_seed(5))
    down, up = params(d, d, b, torch.float32, seed=2)
    dy = torch.randn(M, d)
    y, pre = BK.bottleneck_residual_fwd(z, down, up, 1.5, act)
    gz, gd, gu, _ = BK.bottleneck_residual_bwd(dy, z, pre, down, up, 1.5, act)
    ref = torch_adapter(z.double(), down.double(), up.double(), 1.5, act, None, 0.0, dy.double())
    for got, r64 in zip((y, gz, gd, gu), ref):
        torch.testing.assert_close(got.double(), r64, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(pre.double(), z.double() @ down.double().t(), atol=1e-5, rtol=1e-5)


PARALLEL_CASES = [  # (M, K, N, b, act, p, learned, bias)
    (1, 100, 77, 3, "relu", 0.0, False, True),
    (37, 64, 77, 5, "silu", 0.2, True, False),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("M,K,N,b,act,p,learned,bias", PARALLEL_CASES)
def test_parallel_fwd_bwd_matches_reference(M, K, N, b, act, p, learned, bias, dtype):
    g = torch.Generator().manual_seed(9)
    x = torch.randn(M, K, generator=g).to(dtype)
    w = (torch.randn(N, K, generator=g) / K**0.5).to(dtype)
    bias_t = torch.randn(N, generator=g).to(dtype) if bias else None
    down, up = params(K, N, b, dtype)
    dy = torch.randn(M, N, generator=g).to(dtype)
    s, seed = 2.0, 5
    scaling = torch.tensor(s) if learned else s
    y, pre = BK.bottleneck_parallel_fwd(x, w, bias_t, down, up, scaling, act, p, seed)
    gx, gd, gu, gs = BK.bottleneck_parallel_bwd(dy, x, w, pre, down, up, scaling, act, p, seed)
    mask = dropout_mask(M, K, p, seed)

    def run(dt):
        wd = w.to(dt)
        bd = bias_t.to(dt) if bias else None
        return torch_adapter(x.to(dt), down.to(dt), up.to(dt), s, act, mask, p, dy.to(dt),
                             base=lambda z: torch.nn.functional.linear(z, wd, bd))

    ref64, ref_t = run(torch.float64), run(dtype)
    for name, got, r64, rt in zip(("y", "grad_x", "grad_down", "grad_up"), (y, gx, gd, gu), ref64, ref_t):
        check_rule(name, got, r64, rt)
    if learned:
        check_rule("grad_scaling", gs, ref64[4], ref_t[4])


def test_residual_dropout_seeded():
    M, d, b, p = 32, 64, 8, 0.4
    z = torch.randn(M, d)
    down, up = params(d, d, b, torch.float32)
    y1, p1 = BK.bottleneck_residual_fwd(z, down, up, 1.0, "relu", p, 3)
    y2, p2 = BK.bottleneck_residual_fwd(z, down, up, 1.0, "relu", p, 3)
    y3, p3 = BK.bottleneck_residual_fwd(z, down, up, 1.0, "relu", p, 4)
    assert torch.equal(y1, y2) and torch.equal(p1, p2)
    assert not torch.allclose(p1, p3)
    # residual fwd and the shared down projection draw the same mask for the same (seed, p)
    torch.testing.assert_close(p1, LK.launch_down_proj(z, down, p, 3), atol=1e-6, rtol=1e-6)


def test_bottleneck_errors_name_the_bad_value():
    z = torch.randn(4, 16)
    down, up = params(16, 16, 4, torch.float32)
    with pytest.raises(ValueError, match=r"expected adapter_up of shape \(16, 4\), got \(15, 4\)"):
        BK.bottleneck_residual_fwd(z, down, up[:15], 1.0)
    with pytest.raises(ValueError, match=r"expected activation in .*, got 'mish'"):
        BK.bottleneck_residual_fwd(z, down, up, 1.0, "mish")
    with pytest.raises(ValueError, match=r"expected scaling to be a float or a 1-element tensor, got shape \(2,\)"):
        BK.bottleneck_residual_fwd(z, down, up, torch.ones(2))
