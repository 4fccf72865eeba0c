"""Offline compilation of every shipped kernel configuration for sm_80 and sm_90 (no GPU needed).

The compiles run in a subprocess started by conftest.py (see `compile_reports`); these tests check
its report: every spec compiles, the GEMMs use the tensor cores (`mma.sync` in sm_80 PTX,
`wgmma.mma_async` in sm_90 PTX) and the shared memory fits the chip (164 KiB sm_80, 228 KiB sm_90).
"""
import importlib

import pytest
import torch

from kernel_checks import COMPILE_CCS, COMPILE_MODULES, FP16_NAMES, FP32_NAMES


def _spec_names(dtype=torch.bfloat16):
    names = []
    for m in COMPILE_MODULES:
        mod = importlib.import_module(m)
        names += [f"{m.rsplit('.', 1)[-1]}:{s['name']}" for s in mod.shipped_kernel_specs(dtype)]
    return names


@pytest.mark.parametrize("cc", COMPILE_CCS)
@pytest.mark.parametrize("name", _spec_names())
def test_bf16_config_compiles_on_tensor_cores(compile_reports, name, cc):
    rec = compile_reports[(name, "bfloat16", cc)]
    assert rec["ok"], f"{name} sm_{cc}: {rec['error']}"
    if cc == 80:
        assert rec["mma"], f"{name}: no mma.sync in the sm_80 PTX"
    elif rec["mma_sync_ok"]:  # short row blocks by design (below wgmma's 64 rows): still tensor cores
        assert rec["mma"] or rec["wgmma"], f"{name}: no tensor-core instruction in the sm_90 PTX"
    else:
        assert rec["wgmma"], f"{name}: no wgmma.mma_async in the sm_90 PTX"
    assert 0 <= rec["shared"] <= rec["smem_limit"], f"{name} sm_{cc}: {rec['shared']} B shared memory"


@pytest.mark.parametrize("name", FP32_NAMES)
def test_fp32_largest_tiles_fit_sm80(compile_reports, name):
    rec = compile_reports[(f"lora:{name}", "float32", 80)]
    assert rec["ok"], f"{name} fp32 sm_80: {rec['error']}"
    assert 0 <= rec["shared"] <= rec["smem_limit"], f"{name} fp32 sm_80: {rec['shared']} B"


@pytest.mark.parametrize("cc", COMPILE_CCS)
@pytest.mark.parametrize("name", FP16_NAMES)
def test_fp16_compiles_on_tensor_cores(compile_reports, name, cc):
    rec = compile_reports[(f"lora:{name}", "float16", cc)]
    assert rec["ok"], f"{name} fp16 sm_{cc}: {rec['error']}"
    assert rec["mma"] if cc == 80 else rec["wgmma"], f"{name} fp16 sm_{cc}: no tensor-core instruction"
    assert 0 <= rec["shared"] <= rec["smem_limit"]
