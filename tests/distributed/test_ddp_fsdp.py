"""DDP and FSDP2 with 2 gloo ranks on the CPU: parity with one process, mixed precision, saving, refusals.

Each job of ``dist_jobs.py`` is one ``torchrun`` launch (process start-up and ``import transformers``
cost seconds), run once per module and shared by the tests that read its results. Parity: 3 SGD
steps on 2 ranks, each with half of a global batch of 4, against one process on the whole batch,
fp32: per-step losses and final adapter weights agree to ``TIGHT``.
"""
from __future__ import annotations

import json
import os

import pytest
import torch

from dist_launch import torchrun

HERE = os.path.dirname(os.path.abspath(__file__))
TIGHT = 2e-5  # fp32: only the order of the reductions differs
# bf16 compute (FSDP2 MixedPrecisionPolicy param_dtype=bf16, reduce_dtype=fp32) against the fp32
# single process, 3 steps: losses within 5e-4 relative (measured: at most 3.4e-5), adapter weights
# within 1% of their largest magnitude (measured: 0.2%) and 5% of how far training moved them (1.1%)
MP_LOSS_REL = 5e-4
MP_WEIGHT_REL = 1e-2

_RESULTS: dict = {}


def run_job(job: str, tmp_path_factory, env: dict | None = None, timeout: float = 420,
            nproc: int = 2) -> tuple[dict, str]:
    if job not in _RESULTS:
        outdir = str(tmp_path_factory.mktemp(f"dist-{job}"))
        proc = torchrun([os.path.join(HERE, "dist_jobs.py"), job, outdir], nproc=nproc, timeout=timeout, env=env)
        assert proc.returncode == 0, f"job {job} failed:\n{proc.stdout[-6000:]}"
        with open(os.path.join(outdir, "results.json")) as f:
            _RESULTS[job] = (json.load(f), outdir)
    return _RESULTS[job]


def _check_parity(case: dict, tol: float = TIGHT) -> None:
    what = f"{case['adapter']} {case['mode']} checkpointing={case['checkpointing']} " \
           f"backend={case['backend']}"
    assert case["moved"] > 1e-4, f"{what}: the adapter did not train"
    assert len(case["losses"]) == len(case["ref_losses"]) == 3
    for step, (got, want) in enumerate(zip(case["losses"], case["ref_losses"])):
        assert abs(got - want) <= tol * max(1.0, abs(want)), f"{what}: step {step} loss {got} vs one process {want}"
    # against the scale of the weights and against how far training moved them
    assert case["weight_diff"] <= tol * max(1.0, case["weight_scale"]), \
        f"{what}: adapter weights differ from one process by {case['weight_diff']}"
    assert case["weight_diff"] <= 10 * tol * case["moved"], \
        f"{what}: adapter weights differ from one process by {case['weight_diff']} (training moved them {case['moved']})"


def _check_mixed_precision(case: dict) -> None:
    what = f"{case['adapter']} {case['kind']} checkpointing={case['checkpointing']} backend={case['backend']}"
    assert case["moved"] > 1e-4, f"{what}: the adapter did not train"
    for step, (got, want) in enumerate(zip(case["losses"], case["ref_losses"])):
        assert abs(got - want) <= MP_LOSS_REL * abs(want), f"{what}: step {step} loss {got} vs fp32 {want}"
    assert case["weight_diff"] <= MP_WEIGHT_REL * case["weight_scale"], \
        f"{what}: adapter weights differ from fp32 by {case['weight_diff']} (scale {case['weight_scale']})"
    assert case["weight_diff"] <= 5 * MP_WEIGHT_REL * case["moved"], \
        f"{what}: adapter weights differ from fp32 by {case['weight_diff']} (training moved them {case['moved']})"


@pytest.fixture(scope="module")
def torch_job(tmp_path_factory):
    return run_job("torch", tmp_path_factory)


def test_ddp_and_fsdp2_match_one_process(torch_job):
    res, _ = torch_job
    assert res["world_size"] == 2
    seen = set()
    for case in res["cases"]:
        _check_parity(case)
        seen.add((case["adapter"], case["mode"], case["checkpointing"]))
    want = {(a, m, c) for a in ("lora", "series", "pfeiffer", "parallel", "prefix") for m in ("ddp", "fsdp")
            for c in (False, True)}
    want |= {("lora+idle", "ddp", False), ("lora+idle", "ddp", True)}  # an inactive adapter beside it
    assert seen == want


def test_patch_refuses_a_sharded_or_wrapped_model(torch_job):
    res, _ = torch_job
    ref = res["refusals"]
    for kind, named in (("fsdp", "FSDP2 (fully_shard)"), ("ddp", "DistributedDataParallel")):
        msg = ref[kind]
        assert msg is not None, f"patch accepted a {kind} model"
        assert named in msg and "patch must come first" in msg and "shard" in msg, msg
    assert ref["fsdp_unchanged"], "a refused patch changed the sharded model"


@pytest.mark.parametrize("saved", ["lora-fastadapters", "lora-peft", "series-fastadapters", "pfeiffer-fastadapters",
                                   "parallel-fastadapters", "prefix-fastadapters", "prefix-peft"])
def test_save_from_fsdp2_loads_unsharded_with_same_outputs(torch_job, saved):
    from tiny_models import tiny_model

    import fastadapters as fa

    res, outdir = torch_job
    info = res["saves"][saved]
    assert info["writes"] == [1, 0], f"files written per rank: {info['writes']}"  # once, by rank 0
    assert sorted(f for f in os.listdir(info["path"])) == ["adapter_config.json", "adapter_model.safetensors"]
    adapter = saved.split("-")[0]
    ref = torch.load(os.path.join(outdir, f"{adapter}-ref.pt"))
    model = tiny_model("llama", seed=0)
    fa.load_adapter(model, info["path"])
    with torch.no_grad():
        logits = model(input_ids=ref["probe"]).logits
    torch.testing.assert_close(logits, ref["logits"], atol=TIGHT, rtol=TIGHT)


def test_failed_sharded_save_raises_on_every_rank(torch_job):
    res, _ = torch_job
    rank0, rank1 = res["failed_save"]
    assert rank0 is not None and rank0.startswith(("FileExistsError", "NotADirectoryError")), rank0
    assert rank1 == f"RuntimeError: global rank 0 could not write the adapter: {rank0}"


def test_load_adapter_into_fsdp2_model(torch_job):
    """Loading a saved adapter into the sharded model (resume) gives every rank its part of it."""
    res, _ = torch_job
    assert set(res["reloads"]) == {"lora", "series", "pfeiffer", "parallel", "prefix"}
    for adapter, diff in res["reloads"].items():
        assert diff == 0.0, f"{adapter}: reloaded weights differ by {diff}"


def test_fsdp2_lora_saved_as_peft_loads_in_peft(torch_job):
    peft = pytest.importorskip("peft")
    from tiny_models import tiny_model

    res, outdir = torch_job
    ref = torch.load(os.path.join(outdir, "lora-ref.pt"))
    model = peft.PeftModel.from_pretrained(tiny_model("llama", seed=0), res["saves"]["lora-peft"]["path"])
    with torch.no_grad():
        logits = model(input_ids=ref["probe"]).logits
    torch.testing.assert_close(logits, ref["logits"], atol=TIGHT, rtol=TIGHT)


def test_fsdp2_bf16_mixed_precision_and_bf16_base(torch_job):
    res, _ = torch_job
    kinds = {(c["adapter"], c["kind"], c["checkpointing"]) for c in res["mixed"]}
    assert kinds == {(a, k, c) for a in ("lora", "series", "parallel", "prefix")
                     for k, c in (("mp-bf16", False), ("mp-bf16", True), ("bf16-base", False))}
    for case in res["mixed"]:
        what = f"{case['adapter']} {case['kind']} checkpointing={case['checkpointing']}"
        assert case["moved"] > 1e-4, f"{what}: the adapter did not train"
        if case["kind"] == "bf16-base":
            # fp32 adapters on a frozen bf16 base in one unit: the adapters stay fp32, and one process
            # with the same model agrees to 1e-3 (bf16 GEMMs on half a batch may round differently)
            assert case["adapter_dtypes"] == ["torch.float32"], what
            _check_parity(case, tol=1e-3)
            continue
        _check_mixed_precision(case)


def test_triton_kernels_under_ddp_and_fsdp2(tmp_path_factory):
    """The Triton kernels (interpreter) and the shared-input grouping of q/k/v under DDP and FSDP2."""
    pytest.importorskip("triton")
    res, _ = run_job("triton", tmp_path_factory, env={"TRITON_INTERPRET": "1", "TRITON_DEFAULT_FP_FUSION": "1"})
    assert [(c["adapter"], c["mode"], c["checkpointing"], c.get("kind")) for c in res["cases"]] == [
        ("lora", "ddp", False, None), ("parallel", "fsdp", True, None), ("series", "fsdp", False, None),
        ("lora", "fsdp", False, "mp-bf16")]
    for case in res["cases"]:
        assert case["backend"] == "triton"
        if case.get("kind") == "mp-bf16":
            _check_mixed_precision(case)
        else:
            _check_parity(case, tol=1e-4)  # the kernels accumulate in another order per row block
    assert res["group_calls"] > 0, "the shared-input grouping never ran"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_fsdp2_one_gpu_rank_with_triton_kernels(tmp_path_factory):
    """One GPU: FSDP2 (one rank, nccl) with the real Triton kernels and the shared-input grouping
    gives what the same model gives without FSDP; bf16 mixed precision stays near fp32."""
    res, _ = run_job("gpu", tmp_path_factory, env={"FA_DIST_DEVICE": "cuda", "TRITON_INTERPRET": "0"},
                     timeout=180, nproc=1)
    assert res["world_size"] == 1
    assert [(c["adapter"], c.get("kind")) for c in res["cases"]] == [("lora", None), ("parallel", None),
                                                                    ("lora", "mp-bf16")]
    for case in res["cases"]:
        if case.get("kind") == "mp-bf16":
            _check_mixed_precision(case)
        else:
            _check_parity(case, tol=1e-4)
