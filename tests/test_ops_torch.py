"""The torch path of the ops (what CPU users run): lora_linear and the three bottleneck placements.

Every check is against the formulas of DESIGN.md written out again here in fp64 (the ops'
``*_ref`` functions are deliberately not used). The bar in dtype T (fp32, bf16) is flash-attention's
rule: error vs fp64 at most 2x the error of the same formula computed in plain torch in T, plus a
small floor. Also: odd sizes, every activation, learned scaling, gradcheck in fp64, dropout
statistics, shape errors that name the bad shape, and backend selection errors.
"""
from __future__ import annotations

import pytest
import torch

from fastadapters.ops import dispatch
from fastadapters.ops.bottleneck import bottleneck_linear
from fastadapters.ops.lora import lora_linear

ACTS = {
    "tanh": torch.tanh,
    "relu": torch.relu,
    "gelu": lambda t: 0.5 * t * (1.0 + torch.erf(t / 2 ** 0.5)),
    "silu": lambda t: t * torch.sigmoid(t),
    "swish": lambda t: t * torch.sigmoid(t),
    "sigmoid": torch.sigmoid,
}
FLOOR = {torch.float32: 1e-5, torch.bfloat16: 1e-3}


# ----------------------------------------------------------------------------- formulas, again
# The adapter branch runs in the adapter weights' dtype and is cast back to the input's dtype
# (a no-op when everything has one dtype).
def lora_formula(x, W, b, A, B, s):
    y = x @ W.T
    if b is not None:
        y = y + b
    return y + (s * ((x.to(A.dtype) @ A.T) @ B.T)).to(y.dtype)


def branch_formula(z, D, U, s, act):
    return (s * (ACTS[act](z.to(D.dtype) @ D.T) @ U.T)).to(z.dtype)


def bottleneck_formula(placement, x, W, b, D, U, s, act):
    def lin(t):
        return t @ W.T if b is None else t @ W.T + b

    if placement == "mh":
        return lin(x + branch_formula(x, D, U, s, act))
    if placement == "output":
        h = lin(x)
        return h + branch_formula(h, D, U, s, act)
    return lin(x) + branch_formula(x, D, U, s, act)


def adapter_dims(placement, K, N):
    """(d_in, d_out) of the bottleneck branch for a placement around a (N, K) linear."""
    return {"mh": (K, K), "output": (N, N), "parallel": (K, N)}[placement]


def make_lora(M, K, N, r, seed=0, bias=True, lead=()):
    g = torch.Generator().manual_seed(seed)
    t = lambda *s, scale=1.0: (torch.randn(*s, generator=g, dtype=torch.float64) * scale)
    return dict(x=t(*lead, M, K), W=t(N, K, scale=K ** -0.5), b=t(N) if bias else None,
                A=t(r, K, scale=K ** -0.5), B=t(N, r, scale=0.5))


def make_bottleneck(placement, M, K, N, bsz, seed=0, bias=True, lead=()):
    g = torch.Generator().manual_seed(seed)
    t = lambda *s, scale=1.0: (torch.randn(*s, generator=g, dtype=torch.float64) * scale)
    d_in, d_out = adapter_dims(placement, K, N)
    return dict(x=t(*lead, M, K), W=t(N, K, scale=K ** -0.5), b=t(N) if bias else None,
                D=t(bsz, d_in, scale=d_in ** -0.5), U=t(d_out, bsz, scale=0.5))


def cast(d, dtype, adapter_dtype=None):
    adapter_keys = ("A", "B", "D", "U")
    return {k: None if v is None else v.to(adapter_dtype or dtype if k in adapter_keys else dtype)
            for k, v in d.items()}


def max_err(a, ref):
    return (a.double() - ref).abs().max().item()


# ----------------------------------------------------------------------------- LoRA values
@pytest.mark.parametrize("M", [1, 37])
@pytest.mark.parametrize("r", [1, 5])
@pytest.mark.parametrize("bias", [True, False])
def test_lora_fp64_exact(M, r, bias):
    p = make_lora(M, 100, 77, r, bias=bias)
    y = lora_linear(p["x"], p["W"], p["b"], p["A"], p["B"], 0.7)
    assert y.shape == (M, 77) and y.dtype == torch.float64
    torch.testing.assert_close(y, lora_formula(p["x"], p["W"], p["b"], p["A"], p["B"], 0.7), rtol=1e-12, atol=1e-12)


def test_lora_leading_dims_and_transposed_weight():
    p = make_lora(37, 100, 77, 5, lead=(2,))
    Wt = p["W"].T.contiguous()  # stored (K, N) as gpt2's Conv1D; the op gets the (N, K) view
    y = lora_linear(p["x"], Wt.T, p["b"], p["A"], p["B"], 2.0)
    assert y.shape == (2, 37, 77)
    torch.testing.assert_close(y, lora_formula(p["x"], p["W"], p["b"], p["A"], p["B"], 2.0), rtol=1e-12, atol=1e-12)


def _grads(fn, tensors, seed=1):
    """Gradients of <fn(...), G> for a fixed random G w.r.t. every tensor (in the tensors' dtype)."""
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in tensors.items() if v is not None}
    y = fn(**{k: leaves.get(k) for k in tensors})
    G = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(y.dtype)
    grads = torch.autograd.grad(y, list(leaves.values()), G)
    return y.detach(), dict(zip(leaves, grads))


@pytest.mark.parametrize("dtype,adapter_fp32", [(torch.float32, False), (torch.bfloat16, False),
                                                (torch.bfloat16, True)])
@pytest.mark.parametrize("M,r", [(1, 1), (37, 5)])
def test_lora_dtype_tolerance_rule(dtype, adapter_fp32, M, r):
    p64 = make_lora(M, 100, 77, r)
    s = 1.5
    op = lambda x, W, b, A, B: lora_linear(x, W, b, A, B, s)
    ref = lambda x, W, b, A, B: lora_formula(x, W, b, A, B, s)
    y64, g64 = _grads(ref, p64)
    pT = cast(p64, dtype, torch.float32 if adapter_fp32 else None)
    yT, gT = _grads(op, pT)
    yR, gR = _grads(ref, pT)  # the plain-torch formula on the same inputs
    assert yT.dtype == dtype
    assert max_err(yT, y64) <= 2 * max_err(yR, y64) + FLOOR[dtype]
    for k in g64:
        assert gT[k].dtype == pT[k].dtype, k
        assert max_err(gT[k], g64[k]) <= 2 * max_err(gR[k], g64[k]) + FLOOR[dtype] * (1 + g64[k].abs().max().item()), k


def test_lora_gradcheck_fp64():
    p = make_lora(3, 5, 4, 2)
    leaves = [p[k].clone().requires_grad_(True) for k in ("x", "W", "b", "A", "B")]
    assert torch.autograd.gradcheck(lambda x, W, b, A, B: lora_linear(x, W, b, A, B, 0.5), leaves)
    no_bias = [leaves[0], leaves[1], leaves[3], leaves[4]]
    assert torch.autograd.gradcheck(lambda x, W, A, B: lora_linear(x, W, None, A, B, 2.0), no_bias)


# ----------------------------------------------------------------------------- bottleneck values
PLACEMENTS = ("mh", "output", "parallel")


@pytest.mark.parametrize("placement", PLACEMENTS)
@pytest.mark.parametrize("act", list(ACTS))
def test_bottleneck_every_activation_fp64(placement, act):
    p = make_bottleneck(placement, 37, 100, 77, 3)
    base = (p["W"], p["b"])
    y = bottleneck_linear(placement, p["x"], base, p["D"], p["U"], 0.8, act)
    exp = bottleneck_formula(placement, p["x"], p["W"], p["b"], p["D"], p["U"], 0.8, act)
    assert y.shape == (37, 77)
    torch.testing.assert_close(y, exp, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("placement", PLACEMENTS)
@pytest.mark.parametrize("M,bsz,bias", [(1, 3, True), (37, 5, False), (37, 1, True)])
def test_bottleneck_odd_sizes_and_leading_dims(placement, M, bsz, bias):
    p = make_bottleneck(placement, M, 100, 77, bsz, bias=bias, lead=(2,))
    y = bottleneck_linear(placement, p["x"], (p["W"], p["b"]), p["D"], p["U"], -0.3, "gelu")
    exp = bottleneck_formula(placement, p["x"], p["W"], p["b"], p["D"], p["U"], -0.3, "gelu")
    assert y.shape == (2, M, 77)
    torch.testing.assert_close(y, exp, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_bottleneck_callable_base(placement):
    """A base given as a callable (an opaque module) runs the same composition."""
    p = make_bottleneck(placement, 37, 100, 77, 3)
    lin = lambda t: t @ p["W"].T + p["b"]
    y = bottleneck_linear(placement, p["x"], lin, p["D"], p["U"], 0.8, "tanh")
    torch.testing.assert_close(y, bottleneck_formula(placement, p["x"], p["W"], p["b"], p["D"], p["U"], 0.8, "tanh"),
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("placement", PLACEMENTS)
@pytest.mark.parametrize("dtype,adapter_fp32", [(torch.float32, False), (torch.bfloat16, False),
                                                (torch.bfloat16, True)])
def test_bottleneck_dtype_tolerance_rule(placement, dtype, adapter_fp32):
    p64 = make_bottleneck(placement, 37, 100, 77, 5)
    s64 = torch.tensor(0.9, dtype=torch.float64)
    p64 = dict(p64, s=s64)
    op = lambda x, W, b, D, U, s: bottleneck_linear(placement, x, (W, b), D, U, s, "silu")
    ref = lambda x, W, b, D, U, s: bottleneck_formula(placement, x, W, b, D, U, s, "silu")
    y64, g64 = _grads(ref, p64)
    # adapter_fp32: as the layers run it, base in T, adapter weights (and learned scaling) in fp32
    ad = torch.float32 if adapter_fp32 else dtype
    pT = {k: v.to(ad if k in ("D", "U", "s") else dtype) for k, v in p64.items()}
    yT, gT = _grads(op, pT)
    yR, gR = _grads(ref, pT)  # the plain-torch formula on the same inputs
    assert yT.dtype == dtype
    assert max_err(yT, y64) <= 2 * max_err(yR, y64) + FLOOR[dtype]
    for k in g64:
        assert max_err(gT[k], g64[k]) <= 2 * max_err(gR[k], g64[k]) + FLOOR[dtype] * (1 + g64[k].abs().max().item()), k


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_bottleneck_learned_scaling_gets_gradient(placement):
    p = make_bottleneck(placement, 37, 100, 77, 3)
    s = torch.tensor(1.0, dtype=torch.float64, requires_grad=True)
    y = bottleneck_linear(placement, p["x"], (p["W"], p["b"]), p["D"], p["U"], s, "tanh")
    y.sum().backward()
    s2 = torch.tensor(1.0, dtype=torch.float64, requires_grad=True)
    bottleneck_formula(placement, p["x"], p["W"], p["b"], p["D"], p["U"], s2, "tanh").sum().backward()
    assert s.grad is not None and s.grad.abs() > 0
    torch.testing.assert_close(s.grad, s2.grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("placement", PLACEMENTS)
@pytest.mark.parametrize("act", ["tanh", "gelu", "sigmoid"])
def test_bottleneck_gradcheck_fp64(placement, act):
    p = make_bottleneck(placement, 3, 5, 4, 2)
    s = torch.tensor(0.7, dtype=torch.float64)
    leaves = [v.clone().requires_grad_(True) for v in (p["x"], p["W"], p["b"], p["D"], p["U"], s)]
    fn = lambda x, W, b, D, U, s: bottleneck_linear(placement, x, (W, b), D, U, s, act)
    assert torch.autograd.gradcheck(fn, leaves)


# ----------------------------------------------------------------------------- dropout
def _identity_lora(x):
    """W = 0, A = B = I, s = 1: lora_linear returns dropout(x) itself."""
    K = x.shape[-1]
    eye = torch.eye(K, dtype=x.dtype)
    return lambda xx, p, training: lora_linear(xx, torch.zeros(K, K, dtype=x.dtype), None, eye, eye, 1.0, p, training)


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_lora_dropout_statistics_and_backward_mask(p):
    torch.manual_seed(0)
    x = (torch.rand(256, 64, dtype=torch.float64) + 0.5).requires_grad_(True)
    op = _identity_lora(x)
    y = op(x, p, True)
    kept = y != 0
    frac = kept.double().mean().item()
    n = kept.numel()
    assert abs(frac - (1 - p)) < 5 * ((p * (1 - p) / n) ** 0.5), frac
    torch.testing.assert_close(y[kept], (x / (1 - p))[kept])  # kept inputs scaled by 1/(1-p)
    # the backward uses the same mask: d sum(y) / dx = mask / (1 - p)
    (gx,) = torch.autograd.grad(y.sum(), x)
    torch.testing.assert_close(gx, kept.double() / (1 - p))
    # the base path is never dropped: W = I, A = 0 gives x exactly
    K = x.shape[-1]
    y_base = lora_linear(x, torch.eye(K, dtype=x.dtype), None, torch.zeros(1, K, dtype=x.dtype),
                         torch.zeros(K, 1, dtype=x.dtype), 1.0, p, True)
    assert torch.equal(y_base, x)


def test_lora_eval_mode_has_no_dropout():
    x = torch.rand(64, 32, dtype=torch.float64) + 0.5
    op = _identity_lora(x)
    assert torch.equal(op(x, 0.5, False), x)
    assert torch.equal(op(x, 0.0, True), x)


@pytest.mark.parametrize("placement", ["parallel", "output", "mh"])
def test_bottleneck_dropout_statistics(placement):
    """W = 0 (parallel), W = I (output/mh: the branch sees x itself), D = U = I, relu, x > 0."""
    torch.manual_seed(0)
    p = 0.3
    K = 64
    x = torch.rand(256, K, dtype=torch.float64) + 0.5
    eye = torch.eye(K, dtype=torch.float64)
    W = torch.zeros(K, K, dtype=torch.float64) if placement == "parallel" else eye
    y = bottleneck_linear(placement, x, (W, None), eye, eye, 1.0, "relu", p, True)
    branch = y if placement == "parallel" else y - x  # output: h = x; mh: W(x + f(x)) = x + f(x)
    kept = branch != 0
    frac = kept.double().mean().item()
    assert abs(frac - (1 - p)) < 5 * ((p * (1 - p) / kept.numel()) ** 0.5), frac
    torch.testing.assert_close(branch[kept], (x / (1 - p))[kept])
    # eval mode: no dropout
    y_eval = bottleneck_linear(placement, x, (W, None), eye, eye, 1.0, "relu", p, False)
    torch.testing.assert_close(y_eval, bottleneck_formula(placement, x, W, None, eye, eye, 1.0, "relu"),
                               rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------- shape errors
def test_lora_shape_errors_name_the_shape():
    p = make_lora(37, 100, 77, 5)
    x, W, b, A, B = p["x"], p["W"], p["b"], p["A"], p["B"]
    cases = [
        (dict(x=x[:, :99]), r"expected x of shape \(\*, 100\), got \(37, 99\)"),
        (dict(W=W[0]), r"weight.*got \(100,\)"),
        (dict(b=b[:76]), r"expected bias of shape \(77\), got \(76,\)"),
        (dict(A=A[:, :99]), r"expected lora_A of shape \(\*, 100\), got \(5, 99\)"),
        (dict(B=B[:76]), r"expected lora_B of shape \(77, 5\), got \(76, 5\)"),
        (dict(B=B[:, :4]), r"expected lora_B of shape \(77, 5\), got \(77, 4\)"),
    ]
    for over, msg in cases:
        args = dict(x=x, W=W, b=b, A=A, B=B, **{})
        args.update(over)
        with pytest.raises(ValueError, match=msg):
            lora_linear(args["x"], args["W"], args["b"], args["A"], args["B"], 1.0)


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_bottleneck_shape_errors_name_the_shape(placement):
    p = make_bottleneck(placement, 37, 100, 77, 3)
    x, W, b, D, U = p["x"], p["W"], p["b"], p["D"], p["U"]
    d_in, d_out = adapter_dims(placement, 100, 77)
    with pytest.raises(ValueError, match=r"expected weight of shape \(N, 100\), got \(77, 99\)"):
        bottleneck_linear(placement, x, (W[:, :99], b), D, U, 1.0)
    with pytest.raises(ValueError, match=r"expected bias of shape \(77\), got \(78,\)"):
        bottleneck_linear(placement, x, (W, torch.zeros(78, dtype=x.dtype)), D, U, 1.0)
    with pytest.raises(ValueError, match=rf"expected down of shape \(\*, {d_in}\), got \(3, {d_in + 1}\)"):
        bottleneck_linear(placement, x, (W, b), torch.zeros(3, d_in + 1, dtype=x.dtype), U, 1.0)
    with pytest.raises(ValueError, match=rf"expected up of shape \({d_out}, 3\), got \({d_out}, 4\)"):
        bottleneck_linear(placement, x, (W, b), D, torch.zeros(d_out, 4, dtype=x.dtype), 1.0)
    with pytest.raises(ValueError, match=r"act: got 'softmax'; valid: tanh, relu, gelu, silu, swish, sigmoid"):
        bottleneck_linear(placement, x, (W, b), D, U, 1.0, "softmax")
    with pytest.raises(ValueError, match=r"placement: got 'serial'; valid: mh, output, parallel"):
        bottleneck_linear("serial", x, (W, b), D, U, 1.0)


# ----------------------------------------------------------------------------- backends
def _small_lora_call(**kw):
    p = make_lora(4, 8, 6, 2)
    return lora_linear(p["x"], p["W"], p["b"], p["A"], p["B"], 1.0, **kw)


def _small_bottleneck_call(**kw):
    p = make_bottleneck("parallel", 4, 8, 6, 2)
    return bottleneck_linear("parallel", p["x"], (p["W"], p["b"]), p["D"], p["U"], 1.0, **kw)


@pytest.mark.parametrize("call", [_small_lora_call, _small_bottleneck_call], ids=["lora", "bottleneck"])
def test_backend_errors(call, monkeypatch):
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    ref = call(backend="torch")
    assert torch.equal(call(backend="auto"), ref)  # auto on CPU tensors: torch
    assert torch.equal(call(), ref)
    with pytest.raises(RuntimeError, match=r"backend='cuda'.*(needs CUDA tensors|no cuda implementation)"):
        call(backend="cuda")
    with pytest.raises(RuntimeError, match=r"backend='triton'.*(TRITON_INTERPRET|no triton implementation)"):
        call(backend="triton")
    with pytest.raises(ValueError, match=r"backend: got 'gpu'; valid: auto, torch, triton, cuda"):
        call(backend="gpu")
    # the environment variable is read when no backend is given
    monkeypatch.setenv(dispatch.ENV_VAR, "cuda")
    with pytest.raises(RuntimeError, match="cuda"):
        call()
    assert torch.equal(call(backend="torch"), ref)  # an explicit argument wins over the environment
    monkeypatch.setenv(dispatch.ENV_VAR, "torch")
    assert torch.equal(call(), ref)
    monkeypatch.setenv(dispatch.ENV_VAR, "fast")
    with pytest.raises(ValueError, match=r"FASTADAPTERS_BACKEND='fast'.*valid: auto, torch, triton, cuda"):
        call()
