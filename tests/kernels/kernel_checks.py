"""Shared checks of the kernel tests (the DESIGN.md tolerance rule)."""
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


# offline compilation (conftest.compile_reports, test_triton_compile.py)
COMPILE_MODULES = ["fastadapters.kernels.lora", "fastadapters.kernels.lora_group", "fastadapters.kernels.bottleneck"]
COMPILE_CCS = (80, 90)
# fp32 (IEEE, torch's default) runs on FMA units, not the tensor cores: its largest tiles are
# compiled for the shared-memory check only, on sm_80 (fp16 compiles to bf16's configs and code).
FP32_NAMES = ["fused_up/large/r64", "input_grad/large/r64"]
# fp16 shares bf16's configs; two of them are compiled in fp16 too, to check the dtype itself
FP16_NAMES = ["fused_up/large/r64", "rank_grad/wide/r256"]
