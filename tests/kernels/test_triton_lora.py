"""fastadapters.kernels.lora under the Triton interpreter vs fp64 / same-dtype torch references."""
import pytest
import torch

from kernel_checks import check_rule
from fastadapters.kernels import lora as K

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def dropout_mask(M, Kdim, p, seed):
    """The kernels' keep-mask, read back through the down projection: ones · I with dropout."""
    if p == 0:
        return torch.ones(M, Kdim, dtype=torch.bool)
    s = K.launch_down_proj(torch.ones(M, Kdim), torch.eye(Kdim), p, seed)
    return s != 0


def make(M, Kd, N, r, dtype, bias=True, seed=0, transposed_w=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, Kd, generator=g)
    if transposed_w:  # gpt2 Conv1D: stored (K, N), used as W = weight.t()
        w = (torch.randn(Kd, N, generator=g) / Kd**0.5).to(dtype).t()
    else:
        w = (torch.randn(N, Kd, generator=g) / Kd**0.5).to(dtype)
    b = torch.randn(N, generator=g).to(dtype) if bias else None
    a = torch.randn(r, Kd, generator=g) / Kd**0.5
    bb = torch.randn(N, r, generator=g) / r**0.5
    return x.to(dtype), w, b, a.to(dtype), bb.to(dtype)


def torch_lora(x, w, b, a, bb, s, mask, p, dy):
    """Plain-torch LoRA forward + autograd backward in the inputs' dtype (fp64 for the reference)."""
    x = x.detach().requires_grad_()
    a = a.detach().requires_grad_()
    bb = bb.detach().requires_grad_()
    xd = x * mask.to(x.dtype) / (1 - p) if p > 0 else x
    y = torch.nn.functional.linear(x, w, b) + (xd @ a.t() @ bb.t()) * s
    y.backward(dy)
    return y.detach(), x.grad, a.grad, bb.grad


CASES = [  # (M, K, N, r, bias, dropout)
    (1, 100, 77, 1, True, 0.0),
    (37, 100, 77, 5, False, 0.1),
    (130, 64, 48, 16, True, 0.25),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("M,Kd,N,r,bias,p", CASES)
def test_lora_fwd_bwd_matches_reference(M, Kd, N, r, bias, p, dtype):
    x, w, b, a, bb = make(M, Kd, N, r, dtype, bias=bias)
    s, seed = 0.75, 1234
    dy = torch.randn(M, N, generator=torch.Generator().manual_seed(7)).to(dtype)
    y, S = K.lora_linear_fwd(x, w, b, a, bb, s, p, seed)
    gx, ga, gb = K.lora_linear_bwd(dy, x, w, a, bb, S, s, p, seed)
    mask = dropout_mask(M, Kd, p, seed)
    ref64 = torch_lora(*(t.double() if t is not None else None for t in (x, w, b, a, bb)), s, mask, p, dy.double())
    ref_t = torch_lora(x, w, b, a, bb, s, mask, p, dy)
    for name, got, r64, rt in zip(("y", "grad_x", "grad_A", "grad_B"), (y, gx, ga, gb), ref64, ref_t):
        assert got.dtype == dtype, f"{name} dtype {got.dtype}"
        check_rule(name, got, r64, rt)
    # S is dropout(x)·Aᵀ in fp32
    xd = x.double() * mask / (1 - p) if p > 0 else x.double()
    torch.testing.assert_close(S.double(), xd @ a.double().t(), atol=1e-2 if dtype != torch.float32 else 1e-5, rtol=1e-2)


def test_lora_transposed_weight_and_tensor_scaling():
    """A gpt2 Conv1D weight (K, N) passed as the view .t() is read in place; scaling as a tensor."""
    x, w, b, a, bb = make(21, 48, 40, 4, torch.float32, transposed_w=True)
    assert not w.is_contiguous()
    dy = torch.randn(21, 40)
    y, S = K.lora_linear_fwd(x, w, b, a, bb, torch.tensor(2.0), 0.0, 0)
    gx, ga, gb = K.lora_linear_bwd(dy, x, w, a, bb, S, torch.tensor(2.0), 0.0, 0)
    ref = torch_lora(*(t.double() for t in (x, w, b, a, bb)), 2.0, None, 0.0, dy.double())
    for got, r64 in zip((y, gx, ga, gb), ref):
        torch.testing.assert_close(got.double(), r64, atol=1e-5, rtol=1e-5)


def test_lora_dropout_seeded_and_kept_fraction():
    M, Kd, N, r, p = 64, 128, 32, 4, 0.3
    x, w, b, a, bb = make(M, Kd, N, r, torch.float32)
    y1, s1 = K.lora_linear_fwd(x, w, b, a, bb, 1.0, p, 11)
    y2, s2 = K.lora_linear_fwd(x, w, b, a, bb, 1.0, p, 11)
    y3, s3 = K.lora_linear_fwd(x, w, b, a, bb, 1.0, p, 12)
    assert torch.equal(y1, y2) and torch.equal(s1, s2), "same seed must give the same output"
    assert not torch.allclose(s1, s3), "different seeds must give different masks"
    kept = dropout_mask(M, Kd, p, 11).float().mean().item()
    assert abs(kept - (1 - p)) < 0.03, f"kept fraction {kept} for p={p}"
    # the mask does not depend on the tiling: a row slice sees the same mask rows
    m_full = dropout_mask(M, Kd, p, 11)
    m_again = dropout_mask(M, Kd, p, 11)
    assert torch.equal(m_full, m_again)


def test_lora_backward_uses_forward_mask():
    """grad_A from the kernel equals s·dSᵀ·(x ⊙ mask) with the mask the forward's S was built with."""
    M, Kd, N, r, p, seed = 16, 64, 24, 2, 0.5, 99
    x, w, b, a, bb = make(M, Kd, N, r, torch.float32)
    y, S = K.lora_linear_fwd(x, w, None, a, bb, 1.0, p, seed)
    dy = torch.randn(M, N)
    _, ga, _ = K.lora_linear_bwd(dy, x, w, a, bb, S, 1.0, p, seed)
    # recover the forward mask from S's definition: S = (x ⊙ keep / (1-p)) Aᵀ with A = I would be
    # the masked x itself; here use a fresh forward with A = I
    _, S_id = K.lora_linear_fwd(x, w, None, torch.eye(Kd), torch.zeros(N, Kd), 1.0, p, seed)
    xd = S_id.double()  # x ⊙ keep / (1-p), exactly the forward's dropout(x)
    torch.testing.assert_close(S.double(), xd @ a.double().t(), atol=1e-5, rtol=1e-5)
    ds = dy.double() @ bb.double()
    torch.testing.assert_close(ga.double(), ds.t() @ xd, atol=1e-4, rtol=1e-4)
    _, ga_other, _ = K.lora_linear_bwd(dy, x, w, a, bb, S, 1.0, p, seed + 1)
    assert not torch.allclose(ga_other, ga), "backward with another seed must differ"


def test_lora_errors_name_the_bad_value():
    x, w, b, a, bb = make(4, 32, 16, 2, torch.float32)
    with pytest.raises(ValueError, match=r"expected weight of shape \('\*', 32\), got \(16, 31\)"):
        K.lora_linear_fwd(x, w[:, :31], b, a, bb, 1.0)
    with pytest.raises(ValueError, match=r"expected lora_B of shape \(16, 2\), got \(16, 3\)"):
        K.lora_linear_fwd(x, w, b, a, torch.zeros(16, 3), 1.0)
    with pytest.raises(ValueError, match=r"expected dropout_p in \[0, 1\), got 1.0"):
        K.lora_linear_fwd(x, w, b, a, bb, 1.0, 1.0)
    with pytest.raises(ValueError, match=r"expected bias of shape \(16,\), got \(15,\)"):
        K.lora_linear_fwd(x, w, b[:15], a, bb, 1.0)
    with pytest.raises(ValueError, match="expected x of dtype float16, bfloat16 or float32, got torch.float64"):
        K.lora_linear_fwd(x.double(), w.double(), None, a, bb, 1.0)


def test_lora_deterministic_mode_matches_atomics():
    """Under torch.use_deterministic_algorithms the reductions over M avoid atomics; same values."""
    M, Kd, N, r = 200, 64, 48, 4  # several row blocks, several dA splits
    x, w, b, a, bb = make(M, Kd, N, r, torch.float32)
    dy = torch.randn(M, N)
    y, S = K.lora_linear_fwd(x, w, b, a, bb, 1.0, 0.2, 5)
    ref = K.lora_linear_bwd(dy, x, w, a, bb, S, 1.0, 0.2, 5)
    torch.use_deterministic_algorithms(True)
    try:
        det = K.lora_linear_bwd(dy, x, w, a, bb, S, 1.0, 0.2, 5)
    finally:
        torch.use_deterministic_algorithms(False)
    for u, v in zip(ref, det):
        torch.testing.assert_close(v, u, atol=1e-5, rtol=1e-5)
