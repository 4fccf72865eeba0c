"""Offline compilation of every shipped kernel configuration for sm_80 and sm_90 (no GPU needed).

The interpreter's kernels cannot be compiled, so the compiles run in two subprocesses without
TRITON_INTERPRET (one per compute capability, in parallel) and the tests check their reports:
it compiles, the GEMMs use the tensor cores (`mma.sync` in sm_80 PTX, `wgmma.mma_async` in sm_90
PTX) and the shared memory fits the chip.
"""
import json
import os
import subprocess
import sys

import pytest

MODULES = ["fastadapters.kernels.lora", "fastadapters.kernels.bottleneck"]
CCS = (80, 90)
# fp32 (IEEE, torch's default) runs on FMA units, not the tensor cores: its largest tiles are
# compiled for the shared-memory check only, on sm_80 (fp16 compiles to bf16's configs and code).
FP32_NAMES = ["fused_up/large/r64", "input_grad/large/r64"]


def _spec_names(dtype="bfloat16"):
    import importlib

    import torch

    names = []
    for m in MODULES:
        mod = importlib.import_module(m)
        names += [f"{m.rsplit('.', 1)[-1]}:{s['name']}" for s in mod.shipped_kernel_specs(getattr(torch, dtype))]
    return names


def _launch(cc, jobs):
    code = (
        "import json, sys\n"
        "from fastadapters.kernels._common import compile_report\n"
        "jobs = json.loads(sys.argv[1])\n"
        "out = []\n"
        "for mods, dtype, names in jobs:\n"
        f"    out += compile_report(mods, dtype, {cc}, names)\n"
        "print('REPORT' + json.dumps(out))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    return subprocess.Popen([sys.executable, "-c", code, json.dumps(jobs)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope="module")
def reports():
    procs = {}
    for cc in CCS:
        jobs = [[MODULES, "bfloat16", None]]
        if cc == 80:
            jobs.append([["fastadapters.kernels.lora"], "float32", FP32_NAMES])
        procs[cc] = _launch(cc, jobs)
    out = {}
    for cc, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=900)
        line = [ln for ln in stdout.splitlines() if ln.startswith("REPORT")]
        assert proc.returncode == 0 and line, f"compile subprocess for sm_{cc} failed:\n{stderr[-3000:]}"
        for rec in json.loads(line[-1][len("REPORT"):]):
            out[(rec["name"], rec["dtype"], rec["cc"])] = rec
    return out


BF16_NAMES = _spec_names()


@pytest.mark.parametrize("cc", CCS)
@pytest.mark.parametrize("name", BF16_NAMES)
def test_bf16_config_compiles_on_tensor_cores(reports, name, cc):
    rec = reports[(name, "bfloat16", cc)]
    assert rec["ok"], f"{name} sm_{cc}: {rec['error']}"
    if cc == 80:
        assert rec["mma"], f"{name}: no mma.sync in the sm_80 PTX"
    else:
        assert rec["wgmma"], f"{name}: no wgmma.mma_async in the sm_90 PTX"
    assert 0 <= rec["shared"] <= rec["smem_limit"], f"{name} sm_{cc}: {rec['shared']} B shared memory"


@pytest.mark.parametrize("name", FP32_NAMES)
def test_fp32_largest_tiles_fit_sm80(reports, name):
    rec = reports[(f"lora:{name}", "float32", 80)]
    assert rec["ok"], f"{name} fp32 sm_80: {rec['error']}"
    assert 0 <= rec["shared"] <= rec["smem_limit"], f"{name} fp32 sm_80: {rec['shared']} B"
