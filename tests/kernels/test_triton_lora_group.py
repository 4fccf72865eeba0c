"""fastadapters.kernels.lora_group (sibling projections sharing one input) under the interpreter:
against the fp64 reference with the DESIGN.md rule, and against the single-projection kernels
with the same seeds (the same dropout masks, so the same numbers)."""
import pytest
import torch

from kernel_checks import check_rule
from fastadapters.kernels import lora as K
from fastadapters.kernels import lora_group as KG

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def keep_mask(M, Kdim, p, seed):
    """The single kernel's keep-mask for this seed, read back through its down projection."""
    if p == 0:
        return torch.ones(M, Kdim, dtype=torch.bool)
    return K.launch_down_proj(torch.ones(M, Kdim), torch.eye(Kdim), p, seed) != 0


def members(Kd, outs, ranks, dtype, biases, seed=0):
    g = torch.Generator().manual_seed(seed)
    ws, bs, As, Bs = [], [], [], []
    for n, r, has_b in zip(outs, ranks, biases):
        ws.append((torch.randn(n, Kd, generator=g) / Kd**0.5).to(dtype))
        bs.append(torch.randn(n, generator=g).to(dtype) if has_b else None)
        As.append((torch.randn(r, Kd, generator=g) / Kd**0.5).to(dtype))
        Bs.append((torch.randn(n, r, generator=g) / r**0.5).to(dtype))
    return ws, bs, As, Bs


def reference(x, ws, bs, As, Bs, scalings, masks, p, dys):
    """Plain torch in x's dtype (fp64 for the reference): the members' outputs and autograd grads."""
    x = x.detach().requires_grad_()
    As = [a.detach().requires_grad_() for a in As]
    Bs = [b.detach().requires_grad_() for b in Bs]
    ys = []
    for w, b, a, bb, s, m in zip(ws, bs, As, Bs, scalings, masks):
        xd = x * m.to(x.dtype) / (1 - p) if p > 0 else x
        ys.append(torch.nn.functional.linear(x, w, b) + (xd @ a.t() @ bb.t()) * s)
    torch.autograd.backward([y for y, dy in zip(ys, dys) if dy is not None], [dy for dy in dys if dy is not None])
    return [y.detach() for y in ys], x.grad, [a.grad for a in As], [b.grad for b in Bs]


CASES = [  # (M, K, outs, ranks, biases, p)
    (37, 100, (77, 24, 24), (5, 16, 1), (True, False, True), 0.1),  # q/k/v with GQA-sized k, v
    (1, 64, (48, 48), (8, 8), (False, False), 0.0),  # gate/up, one decode row
    (70, 48, (40, 33, 40), (16, 4, 16), (False, True, False), 0.0),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("M,Kd,outs,ranks,biases,p", CASES)
def test_group_matches_fp64_reference(M, Kd, outs, ranks, biases, p, dtype):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(M, Kd, generator=g).to(dtype)
    ws, bs, As, Bs = members(Kd, outs, ranks, dtype, biases)
    scalings = [0.5, 2.0, 1.25][:len(outs)]
    seeds = [11, 222, 3333][:len(outs)]
    dys = [torch.randn(M, n, generator=g).to(dtype) for n in outs]
    ys, s_pad = KG.lora_group_fwd(x, ws, bs, As, Bs, scalings, p, seeds)
    gx, gAs, gBs, _ = KG.lora_group_bwd(dys, x, ws, As, Bs, s_pad, scalings, p, seeds)
    masks = [keep_mask(M, Kd, p, s) for s in seeds]
    if p > 0:  # the members really draw different masks
        assert not torch.equal(masks[0], masks[1])
    d = lambda ts: [t.double() if t is not None else None for t in ts]  # noqa: E731
    r64 = reference(x.double(), d(ws), d(bs), d(As), d(Bs), scalings, masks, p, d(dys))
    rt = reference(x, ws, bs, As, Bs, scalings, masks, p, dys)
    for i in range(len(outs)):
        check_rule(f"y[{i}]", ys[i], r64[0][i], rt[0][i])
        check_rule(f"grad_A[{i}]", gAs[i], r64[2][i], rt[2][i])
        check_rule(f"grad_B[{i}]", gBs[i], r64[3][i], rt[3][i])
    check_rule("grad_x", gx, r64[1], rt[1])


def _assert_group_equals_single(M, Kd, outs, ranks, biases, p, scalings, seeds, gen_seed):
    g = torch.Generator().manual_seed(gen_seed)
    x = torch.randn(M, Kd, generator=g)
    ws, bs, As, Bs = members(Kd, outs, ranks, torch.float32, biases)
    dys = [torch.randn(M, n, generator=g) for n in outs]
    ys, s_pad = KG.lora_group_fwd(x, ws, bs, As, Bs, scalings, p, seeds)
    gx, gAs, gBs, _ = KG.lora_group_bwd(dys, x, ws, As, Bs, s_pad, scalings, p, seeds)
    gx_single = torch.zeros_like(x)
    for i in range(len(outs)):
        y1, s1 = K.lora_linear_fwd(x, ws[i], bs[i], As[i], Bs[i], scalings[i], p, seeds[i])
        dx1, da1, db1 = K.lora_linear_bwd(dys[i], x, ws[i], As[i], Bs[i], s1, scalings[i], p, seeds[i])
        torch.testing.assert_close(ys[i], y1, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(gAs[i], da1, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(gBs[i], db1, atol=1e-5, rtol=1e-5)
        gx_single += dx1
    torch.testing.assert_close(gx, gx_single, atol=1e-5, rtol=1e-5)


def test_group_equals_single_kernels_with_the_same_seeds():
    """Same seeds, same masks: the grouped path gives the single kernels' outputs and gradients."""
    _assert_group_equals_single(45, 72, (64, 16, 16), (16, 4, 8), (True, False, False), 0.2,
                                [2.0, 0.5, 1.0], [7, 8, 9], gen_seed=5)


def test_member_without_gradient():
    """A member whose output gets no gradient (None) adds nothing to dX and gets zero dA, dB."""
    M, Kd = 9, 32
    x = torch.randn(M, Kd)
    ws, bs, As, Bs = members(Kd, (16, 16), (4, 4), torch.float32, (False, False))
    dy0 = torch.randn(M, 16)
    ys, s_pad = KG.lora_group_fwd(x, ws, bs, As, Bs, [1.0, 1.0], 0.0, [0, 0])
    gx, gAs, gBs, _ = KG.lora_group_bwd([dy0, None], x, ws, As, Bs, s_pad, [1.0, 1.0], 0.0, [0, 0])
    _, s1 = K.lora_linear_fwd(x, ws[0], None, As[0], Bs[0], 1.0)
    dx1, da1, db1 = K.lora_linear_bwd(dy0, x, ws[0], As[0], Bs[0], s1, 1.0)
    torch.testing.assert_close(gx, dx1, atol=1e-5, rtol=1e-5)
    assert not gAs[1].any() and not gBs[1].any()


def test_group_limits_name_the_problem():
    x = torch.randn(4, 32)
    ws, bs, As, Bs = members(32, (8,) * 4, (4,) * 4, torch.float32, (False,) * 4)
    with pytest.raises(ValueError, match="groups of 2 to 3 projections, got 4"):
        KG.lora_group_fwd(x, ws, bs, As, Bs, [1.0] * 4)
    assert KG.group_unsupported([64, 64, 64]) is None and KG.group_unsupported([256, 256, 256]) is None
    assert "ranks up to 256" in KG.group_unsupported([300, 4])


def test_wide_members_group_too():
    """Members as wide as the kernels take (ranks 256 and 200 beside 4: the short-row-block config)
    still equal the single kernels."""
    assert KG.group_config(3, 256, torch.float32).BM == 16
    _assert_group_equals_single(21, 40, (24, 16, 16), (256, 4, 200), (False, True, False), 0.1,
                                [1.0, 2.0, 0.5], [1, 2, 3], gen_seed=6)


@pytest.mark.parametrize("act", ["relu", "gelu"])
def test_parallel_adapter_group_equals_single_kernels(act):
    """With an activation and learned (tensor) scalings the members are parallel adapters: the group
    gives bottleneck_parallel_fwd/bwd's outputs and gradients, the scalings' included."""
    from fastadapters.kernels import bottleneck as BK
    from fastadapters.kernels._common import activation_id

    M, Kd, outs, b, p = 29, 40, (40, 24, 24), 8, 0.1
    g = torch.Generator().manual_seed(9)
    x = torch.randn(M, Kd, generator=g)
    ws, bs, Ds, Us = members(Kd, outs, (b, b, b), torch.float32, (True, False, False))
    scal = [torch.tensor(v) for v in (0.5, 1.5, 2.0)]
    seeds = [3, 4, 5]
    dys = [torch.randn(M, n, generator=g) for n in outs]
    ys, s_pad = KG.lora_group_fwd(x, ws, bs, Ds, Us, scal, p, seeds, activation_id(act))
    gx, gDs, gUs, gSs = KG.lora_group_bwd(dys, x, ws, Ds, Us, s_pad, scal, p, seeds, activation=activation_id(act))
    gx_single = torch.zeros_like(x)
    for i in range(3):
        y1, pre = BK.bottleneck_parallel_fwd(x, ws[i], bs[i], Ds[i], Us[i], scal[i], act, p, seeds[i])
        dx1, dd1, du1, ds1 = BK.bottleneck_parallel_bwd(dys[i], x, ws[i], pre, Ds[i], Us[i], scal[i], act, p, seeds[i])
        for name, got, want in (("y", ys[i], y1), ("grad_down", gDs[i], dd1), ("grad_up", gUs[i], du1),
                                ("grad_scaling", gSs[i], ds1)):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5, msg=lambda m: f"{name}[{i}]: {m}")
        gx_single += dx1
    torch.testing.assert_close(gx, gx_single, atol=1e-5, rtol=1e-5)
