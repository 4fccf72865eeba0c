"""Shared checks of the kernel tests (the DESIGN.md tolerance rule)."""
import contextlib
import os

import torch

# floor: a few rounding steps of the dtype, relative to the output's magnitude
FLOOR = {torch.float32: 1e-5, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}


def check_rule(name, got, ref64, ref_t):
    """DESIGN.md rule: max|got - ref64| <= 2 max|ref_t - ref64| + floor.

    got: the kernel's result in dtype T; ref64: the fp64 reference; ref_t: the plain-torch
    reference computed in T. The floor is FLOOR[T] times max|ref64|.
    """
    assert got.shape == ref64.shape, f"{name}: shape {tuple(got.shape)} != {tuple(ref64.shape)}"
    assert torch.isfinite(got).all(), f"{name}: non-finite values"
    scale = ref64.abs().max().item()
    err = (got.double() - ref64).abs().max().item()
    err_t = (ref_t.double() - ref64).abs().max().item()
    bound = 2 * err_t + FLOOR[ref_t.dtype] * scale
    assert err <= bound, (
        f"{name} ({ref_t.dtype}): kernel error {err:.3g} > 2 x torch error {err_t:.3g} + floor "
        f"(bound {bound:.3g}, max|ref| {scale:.3g})"
    )


@contextlib.contextmanager
def gpu_rounding():
    """fp32 -> bf16 casts in triton's interpreter rounded to nearest (even), as the GPU's
    ``cvt.rn.bf16.f32`` rounds them. The interpreter (triton 3.6-3.9) truncates them: up to one ulp,
    always toward zero, where the GPU errs half an ulp either way, so an error bound measured
    under it is the interpreter's, not the kernels'. A no-op on a GPU run. The tests that use it
    also check that it rounds (``test_gpu_rounding_rounds_to_nearest``)."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        yield
        return
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter as interp

    orig = getattr(getattr(interp, "InterpreterBuilder", None), "cast_impl", None)
    if orig is None or not hasattr(interp, "TensorHandle"):
        import triton

        raise RuntimeError(f"triton {triton.__version__}'s interpreter has no InterpreterBuilder.cast_impl / "
                           "TensorHandle (3.6-3.9 have them): gpu_rounding cannot round its fp32 -> bf16 casts")

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            t = torch.from_numpy(np.ascontiguousarray(src.data, dtype=np.float32)).to(torch.bfloat16)
            return interp.TensorHandle(t.view(torch.int16).numpy().view(np.uint16), dst_type.scalar)
        return orig(self, src, dst_type)

    interp.InterpreterBuilder.cast_impl = cast_impl
    try:
        yield
    finally:
        interp.InterpreterBuilder.cast_impl = orig


# offline compilation (conftest.compile_reports, test_triton_compile.py)
COMPILE_MODULES = ["fastadapters.kernels.lora", "fastadapters.kernels.lora_group", "fastadapters.kernels.bottleneck",
                   "fastadapters.kernels.multi"]
COMPILE_CCS = (80, 90)
# (dtype, cc, spec names or None = every shipped spec) compiled by the conftest's subprocess:
#  - bf16: every spec on sm_80 and sm_90;
#  - fp32: every spec on sm_80, whose 163 KiB per-block limit is the tighter one (IEEE dots run on
#    the FMA units alike on both chips), and the TF32 GEMM configs on sm_90 (wgmma: other tiling);
#  - fp16: the same configs and code as bf16 bar the conversions, so each kernel function is compiled
#    once at its widest configuration on sm_90, where spills are checked.
FP32_SM90_NAMES = ["lora:fused_up/large/tf32", "lora:input_grad/large/tf32", "lora:input_grad/large/tf32/res"]
FP16_NAMES = ["lora:fused_up/large", "lora:input_grad/large/res", "lora:down_proj/r64", "lora:rank_grad/r64",
              "lora:down_weight_grad/r64", "lora_group:down_proj_group/g3/r64",
              "lora_group:down_weight_grad_group/g3/r64", "bottleneck:residual_fwd/b256",
              "bottleneck:residual_input_grad/small", "multi:seg_shrink_r64", "multi:seg_expand",
              "multi:gather_expand_bmg32"]
COMPILE_JOBS = [("bfloat16", cc, None) for cc in COMPILE_CCS] + [
    ("float32", 80, None), ("float32", 90, FP32_SM90_NAMES), ("float16", 90, FP16_NAMES)]
