"""The offline-compile guard: every kernel configuration the launchers can choose, compiled for
sm_80 and sm_90 with the installed Triton (no GPU needed), checked for what a GPU would hit.

The compiles run in a subprocess started by conftest.py (see `compile_reports`; the jobs, which
dtypes on which chip, are `kernel_checks.COMPILE_JOBS`). For each compiled spec:

  - it compiles;
  - its shared memory fits the per-block opt-in limit (163 KiB sm_80, 227 KiB sm_90): a launch
    past it raises OutOfResources (issue 12: fp32 at rank 129-256 asked for 262,144 B);
  - bf16 / fp16 on sm_90 do not spill registers (`ptxas -v`), or stay within the bound the spec
    states and justifies (`spill_bound`); fp32 does not spill on sm_80 either;
  - GEMMs use the tensor cores: `mma.sync` in sm_80 PTX, `wgmma.mma_async` in sm_90 PTX (kernels
    whose tiles are below wgmma's 64 rows by design may use mma.sync there); fp32 with IEEE
    dots runs on the FMA units and is exempt, fp32 with TF32 is not.

Triton's cache and a small cache of the ptxas figures (`_common.ptxas_usage`) make a second run
cheap; the first compiles each configuration once, one at a time.
"""
import pytest

from kernel_checks import COMPILE_JOBS


def _job_ids():
    return [f"{dtype}-sm{cc}" + ("" if names is None else "-subset") for dtype, cc, names in COMPILE_JOBS]


def _records_of(compile_reports, dtype, cc, names):
    recs = [r for (name, dt, c), r in compile_reports.items() if dt == dtype and c == cc]
    if names is not None:
        got = {r["name"] for r in recs}
        missing = sorted(set(names) - got)
        assert not missing, f"{dtype} sm_{cc}: specs named in kernel_checks but not shipped: {missing}"
        recs = [r for r in recs if r["name"] in names]
    assert recs, f"no compiled specs for {dtype} sm_{cc}"
    return recs


@pytest.mark.parametrize("dtype,cc,names", COMPILE_JOBS, ids=_job_ids())
def test_every_config_compiles_within_shared_memory(compile_reports, dtype, cc, names):
    bad = []
    for r in _records_of(compile_reports, dtype, cc, names):
        if not r["ok"]:
            bad.append(f"{r['name']}: {r['error']}")
        elif not 0 <= r["shared"] <= r["smem_limit"]:
            bad.append(f"{r['name']}: {r['shared']} B shared memory > {r['smem_limit']} B per block")
    assert not bad, f"{dtype} sm_{cc}:\n" + "\n".join(bad)


@pytest.mark.parametrize("dtype,cc,names", [j for j in COMPILE_JOBS if j[0] != "float32" and j[1] == 90],
                         ids=lambda v: str(v) if not isinstance(v, list) else "subset")
def test_16bit_configs_do_not_spill_on_sm90(compile_reports, dtype, cc, names):
    bad = []
    for r in _records_of(compile_reports, dtype, cc, names):
        if not r["ok"]:
            continue  # reported by the compile test
        if r["spill"] < 0:
            bad.append(f"{r['name']}: ptxas -v figures not found")
        elif r["spill"] > r["spill_bound"]:
            bad.append(f"{r['name']}: {r['spill']} B spilled ({r['regs']} registers), bound {r['spill_bound']} B")
    assert not bad, f"{dtype} sm_{cc}:\n" + "\n".join(bad)


def test_fp32_configs_do_not_spill_on_sm80(compile_reports):
    """fp32 (FMA-unit dots unless TF32) takes tiles that fit registers too: 64 x 64 with 8 warps,
    16-wide rank slices in the GEMM loops (the 128 x 128 tiles spilled 3-47 KB per thread)."""
    bad = [f"{r['name']}: {r['spill']} B spilled ({r['regs']} registers)"
           for r in _records_of(compile_reports, "float32", 80, None) if r["ok"] and r["spill"] != 0]
    assert not bad, "float32 sm_80:\n" + "\n".join(bad)


@pytest.mark.parametrize("dtype,cc,names", COMPILE_JOBS, ids=_job_ids())
def test_gemms_use_tensor_cores(compile_reports, dtype, cc, names):
    bad = []
    for r in _records_of(compile_reports, dtype, cc, names):
        if not r["ok"] or not r["gemm"] or (dtype == "float32" and r["prec"] != "tf32"):
            continue
        if cc == 80 and not r["mma"]:
            bad.append(f"{r['name']}: no mma.sync in the sm_80 PTX")
        elif cc == 90 and not (r["wgmma"] or (r["mma_sync_ok"] and r["mma"])):
            bad.append(f"{r['name']}: no wgmma.mma_async in the sm_90 PTX")
    assert not bad, f"{dtype} sm_{cc}:\n" + "\n".join(bad)


@pytest.mark.parametrize("cc", (80, 90))
def test_atomics_are_relaxed(compile_reports, cc):
    """The fp32 reductions add with relaxed atomics (`red`), not tl.atomic_add's default acq_rel
    (`atom.acq_rel`, which orders memory for nothing here)."""
    recs = _records_of(compile_reports, "bfloat16", cc, None)
    assert sum(r.get("atomics", 0) for r in recs) > 0, "no atomics found: the check would not see them"
    bad = [r["name"] for r in recs if r.get("acq_rel_atomics", 1)]
    assert not bad, f"sm_{cc}: acquire-release atomics in {bad}"


def test_guard_covers_every_kernel_function():
    """Each Triton kernel of the four modules has at least one compile spec."""
    import importlib

    from kernel_checks import COMPILE_MODULES

    for mod_name in COMPILE_MODULES:
        mod = importlib.import_module(mod_name)
        kernels = {n: v for n, v in vars(mod).items() if n.endswith("_kernel") and hasattr(v, "arg_names")}
        compiled = {id(s["fn"]) for s in mod.shipped_kernel_specs()}
        missing = sorted(n for n, v in kernels.items() if id(v) not in compiled)
        assert kernels and not missing, f"{mod_name}: kernels without a compile spec: {missing}"
