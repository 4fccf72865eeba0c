"""The triton backend of the ops layer (custom ops over the kernels), under TRITON_INTERPRET.

opcheck on every custom op (schema, fake, autograd registration); the dispatcher with
backend="triton" gives the outputs and gradients of backend="torch"; dropout is reproducible
under torch.manual_seed and its backward uses the forward's mask.
"""
import pytest
import torch

from fastadapters.ops import bottleneck as OB
from fastadapters.ops import lora as OL
from fastadapters.ops import dispatch


def test_triton_backend_registered_and_auto_keeps_cpu_on_torch():
    assert dispatch.resolve("lora_linear", "triton", torch.device("cpu")) == "triton"
    assert dispatch.resolve("lora_linear", "auto", torch.device("cpu")) == "torch"
    for p in OB.PLACEMENTS:
        assert dispatch.resolve(f"bottleneck_{p}", "triton", torch.device("cpu")) == "triton"


def _lora_inputs(grad=True, M=37, K=100, N=77, r=5):
    """LoRA test tensors (opcheck uses smaller ones: it runs each op many times)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(M, K, generator=g)
    W = torch.randn(N, K, generator=g) / 10
    b = torch.randn(N, generator=g)
    A = torch.randn(r, K, generator=g) / 10
    B = torch.randn(N, r, generator=g)
    if grad:
        for t in (x, A, B):
            t.requires_grad_()
    return x, W, b, A, B


def test_opcheck_lora_ops():
    x, W, b, A, B = _lora_inputs(M=9, K=24, N=20, r=3)
    seed = torch.tensor([5])
    torch.library.opcheck(OL._lora_triton_fwd, (x, W, b, A, B, 0.5, 0.1, seed))
    with torch.no_grad():
        _, S = OL._lora_triton_fwd(x, W, b, A, B, 0.5, 0.1, seed)
    dy = torch.randn(9, 20)
    torch.library.opcheck(OL._lora_triton_bwd, (dy, x.detach(), W, A.detach(), B.detach(), S, 0.5, 0.1, seed, True))
    # need_grad_x=False: the fake's placeholder must match the real op's (schema/fake checks only)
    torch.library.opcheck(OL._lora_triton_bwd, (dy, x.detach(), W, A.detach(), B.detach(), S, 0.5, 0.1, seed, False),
                          test_utils=("test_schema", "test_faketensor"))


def _bn_inputs(placement, M=37, K=100, N=77, b=3, learned=True):
    g = torch.Generator().manual_seed(1)
    d_in, d_out = {"mh": (K, K), "output": (N, N), "parallel": (K, N)}[placement]
    x = torch.randn(M, K, generator=g, requires_grad=True)
    W = torch.randn(N, K, generator=g) / 10
    bias = torch.randn(N, generator=g)
    D = (torch.randn(b, d_in, generator=g) / 10).requires_grad_()
    U = torch.randn(d_out, b, generator=g).requires_grad_()
    s = torch.tensor(0.7, requires_grad=True) if learned else 0.7
    return x, W, bias, D, U, s


def test_opcheck_bottleneck_ops():
    seed = torch.tensor([9])
    z, _, _, D, U, s = _bn_inputs("mh", M=9, K=24, N=20)
    torch.library.opcheck(OB._residual_triton_fwd, (z, D, U, s, 1.0, "tanh", 0.2, seed))
    torch.library.opcheck(OB._residual_triton_fwd, (z, D, U, None, 0.5, "relu", 0.0, seed),
                          test_utils=("test_schema", "test_faketensor"))
    with torch.no_grad():
        _, pre = OB._residual_triton_fwd(z, D, U, s, 1.0, "tanh", 0.2, seed)
    dy = torch.randn_like(z)
    torch.library.opcheck(OB._residual_triton_bwd,
                          (dy, z.detach(), pre, D.detach(), U.detach(), s.detach(), 0.5, "tanh", 0.2, seed, True))
    torch.library.opcheck(OB._residual_triton_bwd,
                          (dy, z.detach(), pre, D.detach(), U.detach(), None, 0.5, "tanh", 0.2, seed, True),
                          test_utils=("test_schema", "test_faketensor"))
    x, W, bias, D, U, s = _bn_inputs("parallel", M=9, K=24, N=20)
    torch.library.opcheck(OB._parallel_triton_fwd, (x, W, bias, D, U, s, 1.0, "gelu", 0.2, seed))
    torch.library.opcheck(OB._parallel_triton_fwd, (x, W, None, D, U, None, 0.3, "silu", 0.0, seed),
                          test_utils=("test_schema", "test_faketensor"))
    with torch.no_grad():
        _, pre = OB._parallel_triton_fwd(x, W, bias, D, U, s, 1.0, "gelu", 0.2, seed)
    dy = torch.randn(9, 20)
    torch.library.opcheck(OB._parallel_triton_bwd,
                          (dy, x.detach(), W, pre, D.detach(), U.detach(), s.detach(), 1.0, "gelu", 0.2, seed, False))


def _run(fn, leaves, dy):
    for t in leaves:
        t.grad = None
    y = fn()
    y.backward(dy)
    return [y.detach()] + [t.grad.clone() for t in leaves]


def _assert_same(a, b, what):
    for i, (u, v) in enumerate(zip(a, b)):
        torch.testing.assert_close(u, v, atol=1e-4, rtol=1e-4, msg=lambda m: f"{what}[{i}]: {m}")


@pytest.mark.parametrize("bias", [True, False])
def test_lora_triton_equals_torch(bias):
    x, W, b, A, B = _lora_inputs()
    x3 = x.detach().view(1, 37, 100).requires_grad_()  # leading dims go through the reshape
    dy = torch.randn(1, 37, 77)
    res = {be: _run(lambda: OL.lora_linear(x3, W, b if bias else None, A, B, 0.5, 0.3, False, backend=be),
                    (x3, A, B), dy) for be in ("torch", "triton")}
    _assert_same(res["torch"], res["triton"], "lora")


def test_lora_triton_unfrozen_base_gets_grads():
    x, W, b, A, B = _lora_inputs()
    W.requires_grad_()
    b.requires_grad_()
    dy = torch.randn(37, 77)
    res = {be: _run(lambda: OL.lora_linear(x, W, b, A, B, 0.5, backend=be), (x, W, b, A, B), dy)
           for be in ("torch", "triton")}
    _assert_same(res["torch"], res["triton"], "lora unfrozen")


def test_lora_triton_dropout_reproducible_and_mask_shared():
    x, W, b, A, B = _lora_inputs(M=32, K=64, N=48, r=4)
    dy = torch.randn(32, 48)
    torch.manual_seed(123)
    r1 = _run(lambda: OL.lora_linear(x, W, b, A, B, 1.0, 0.4, True, backend="triton"), (x, A, B), dy)
    torch.manual_seed(123)
    r2 = _run(lambda: OL.lora_linear(x, W, b, A, B, 1.0, 0.4, True, backend="triton"), (x, A, B), dy)
    for u, v in zip(r1, r2):
        assert torch.equal(u, v)
    # the backward used the forward's mask: recover xd from the output (y - base = (xd Aᵀ) Bᵀ s)
    # by taking A = I, B = I-like; then dA must equal dSᵀ·xd for that same xd
    eye = torch.eye(64)
    torch.manual_seed(7)
    y_id = OL.lora_linear(x.detach(), torch.zeros(64, 64), None, eye, eye, 1.0, 0.4, True, backend="triton")
    torch.manual_seed(7)
    A2 = A.detach().clone().requires_grad_()
    B2 = B.detach().clone().requires_grad_()
    y = OL.lora_linear(x.detach(), W, b, A2, B2, 1.0, 0.4, True, backend="triton")
    y.backward(dy)
    xd = y_id.detach()
    torch.testing.assert_close(A2.grad, (dy @ B2.detach()).t() @ xd, atol=1e-4, rtol=1e-4)
    kept = (xd != 0).float().mean().item()
    assert abs(kept - 0.6) < 0.05, kept


@pytest.mark.parametrize("placement", OB.PLACEMENTS)
@pytest.mark.parametrize("learned", [True, False])
def test_bottleneck_triton_equals_torch(placement, learned):
    x, W, bias, D, U, s = _bn_inputs(placement, learned=learned)
    dy = torch.randn(37, 77)
    leaves = (x, D, U) + ((s,) if learned else ())
    res = {be: _run(lambda: OB.bottleneck_linear(placement, x, (W, bias), D, U, s, "tanh", 0.2, False, backend=be),
                    leaves, dy) for be in ("torch", "triton")}
    _assert_same(res["torch"], res["triton"], placement)


@pytest.mark.parametrize("placement", OB.PLACEMENTS)
def test_bottleneck_triton_dropout_reproducible(placement):
    x, W, bias, D, U, s = _bn_inputs(placement, M=16, b=4)
    dy = torch.randn(16, 77)
    outs = []
    for _ in range(2):
        torch.manual_seed(99)
        outs.append(_run(lambda: OB.bottleneck_linear(placement, x, (W, bias), D, U, s, "relu", 0.3, True,
                                                      backend="triton"), (x, D, U, s), dy))
    for u, v in zip(*outs):
        assert torch.equal(u, v)
    torch.manual_seed(100)
    other = OB.bottleneck_linear(placement, x, (W, bias), D, U, s, "relu", 0.3, True, backend="triton")
    assert not torch.allclose(other, outs[0][0])


def test_triton_ops_compile_fullgraph_without_breaks():
    """The custom ops trace under torch.compile(fullgraph=True) (aot_eager: fakes + autograd)."""
    x, W, b, A, B = _lora_inputs(M=9, K=24, N=20, r=3)
    _, _, _, D, U, s = _bn_inputs("output", M=9, K=24, N=20)

    def step(x, A, B, D, U, s):
        h = OL.lora_linear(x, W, b, A, B, 0.5, 0.1, True, backend="triton")
        y = OB.bottleneck_linear("output", h, (torch.eye(20), None), D, U, s, "tanh", 0.1, True, backend="triton")
        return y.square().sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    leaves = (x, A, B, D, U, s)
    torch.manual_seed(0)
    loss_c = compiled(*leaves)
    loss_c.backward()
    grads_c = [t.grad.clone() for t in leaves]
    for t in leaves:
        t.grad = None
    torch.manual_seed(0)
    loss_e = step(*leaves)
    loss_e.backward()
    torch.testing.assert_close(loss_c, loss_e)
    for gc, t in zip(grads_c, leaves):
        torch.testing.assert_close(gc, t.grad)


@pytest.mark.parametrize("placement", OB.PLACEMENTS)
def test_bottleneck_triton_under_autocast_runs_in_autocast_dtype(placement):
    """fp32 inputs and base under CPU autocast(bfloat16): the triton op computes in bf16 like torch's."""
    x, W, bias, D, U, s = _bn_inputs(placement, M=16)
    dy = torch.randn(16, 77)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = OB.bottleneck_linear(placement, x, (W, bias), D, U, s, "tanh", 0.0, False, backend="triton")
    assert y.dtype == torch.bfloat16
    y.float().backward(dy)
    assert x.grad.dtype == torch.float32 and D.grad.dtype == torch.float32 and s.grad is not None
    ref = OB.bottleneck_linear_ref(placement, x.detach().double(), W.double(), bias.double(), D.detach().double(),
                                   U.detach().double(), s.detach().double(), "tanh")
    err = (y.double() - ref).abs().max().item()
    assert err <= 0.05 * ref.abs().max().item(), err


def test_lora_triton_under_autocast_runs_in_autocast_dtype():
    x, W, b, A, B = _lora_inputs(M=16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = OL.lora_linear(x, W, b, A, B, 0.5, backend="triton")
        y_torch = OL.lora_linear(x, W, b, A, B, 0.5, backend="torch")
    assert y.dtype == y_torch.dtype == torch.bfloat16
    y.float().sum().backward()
    assert x.grad.dtype == torch.float32 and A.grad.dtype == torch.float32
    ref = OL.lora_linear_ref(x.detach().double(), W.double(), b.double(), A.detach().double(), B.detach().double(), 0.5)
    assert (y.double() - ref).abs().max().item() <= 0.02 * ref.abs().max().item()


def test_triton_backend_warns_once_and_uses_torch_beyond_max_rank():
    from fastadapters.kernels._common import MAX_RANK

    x, W, b, A, B = _lora_inputs(M=4, K=8, N=6, r=MAX_RANK + 1)
    with pytest.warns(RuntimeWarning, match=rf"plain torch path.*rank r <= {MAX_RANK}, got {MAX_RANK + 1}"):
        y = OL.lora_linear(x, W, b, A, B, 0.5, backend="triton")
    torch.testing.assert_close(y, OL.lora_linear(x, W, b, A, B, 0.5, backend="torch"))
    with pytest.raises(ValueError, match=rf"expected rank r \(lora_A.shape\[0\]\) <= {MAX_RANK} for the Triton kernels, got {MAX_RANK + 1}"):
        from fastadapters.kernels.lora import lora_linear_fwd

        lora_linear_fwd(x.detach(), W, b, A.detach(), B.detach(), 0.5)
