"""Jobs that the distributed tests run under ``torchrun`` (2 gloo ranks on the CPU), one per launch.

``python dist_jobs.py <job> <outdir>`` runs every case of ``<job>`` on each rank. A case trains a
tiny Llama for a few SGD steps twice on every rank: once alone on the whole global batch (the
single-process reference, no collective involved) and once distributed -- DDP or FSDP2 -- on this
rank's half of the batch. Rank 0 writes ``<outdir>/results.json`` with the per-step losses of both,
the largest difference between their adapter weights, and whatever else the case recorded; the
tests (``test_ddp_fsdp.py``) make the assertions. Grouping many cases into one launch keeps the
cost of process start-up and ``import transformers`` to once per job.

Jobs: ``torch`` (every adapter type, DDP and FSDP2, checkpointing off/on, saving, the refusals;
FSDP2 with bf16 mixed precision and a bf16 base with fp32 adapters in one unit, under ``mixed``),
``triton`` (the Triton kernels under the interpreter, the shared-input grouping included).
"""
from __future__ import annotations

import json
import os
import sys
import time

import torch
import torch.distributed as dist

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # tests/: tiny_models

import fastadapters as fa  # noqa: E402
from fastadapters import distributed as fad, io as fa_io  # noqa: E402
from tiny_models import VOCAB, tiny_model  # noqa: E402

DEVICE = os.environ.get("FA_DIST_DEVICE", "cpu")  # "cuda": the GPU job (nccl, one rank per GPU)
GLOBAL_BATCH = 4
SEQ = 7  # odd on purpose
STEPS = 3
LR = 0.5

ADAPTERS = {
    "lora": dict(adapter="lora", r=4, alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
    "series": dict(adapter="series", variant="houlsby", bottleneck_size=5, scaling="learned"),
    "pfeiffer": dict(adapter="series", variant="pfeiffer", bottleneck_size=5),
    "parallel": dict(adapter="parallel", bottleneck_size=5),
    "prefix": dict(adapter="prefix", num_virtual_tokens=3, prefix_projection=True, encoder_hidden_size=16),
}


def batches(steps: int = STEPS) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1234)
    return [torch.randint(3, VOCAB, (GLOBAL_BATCH, SEQ), generator=g) for _ in range(steps)]


def patched_model(adapter: str, backend: str | None = None, base_dtype=torch.float32):
    """The same tiny patched model on every rank: seeded base, adapters moved off their init
    (LoRA's B starts at zero, which would hide half of the gradients)."""
    model = tiny_model("llama", seed=0).to(device=DEVICE, dtype=base_dtype)
    torch.manual_seed(1)
    if adapter == "lora+idle":  # a second, inactive adapter: frozen, so DDP finds no unused parameter
        fa.patch(model, backend=backend, **ADAPTERS["lora"])
        fa.patch(model, backend=backend, name="idle", **ADAPTERS["parallel"])
    else:
        fa.patch(model, backend=backend, **ADAPTERS[adapter])
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_((torch.randn(p.shape, generator=g) * 0.05).to(p.device, p.dtype))
    model.train()
    return model


def enable_checkpointing(model) -> None:
    if hasattr(model, "activation_checkpointing_enable"):  # the name since transformers 5.2x
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    model.config.use_cache = False


def adapter_weights(model) -> dict[str, torch.Tensor]:
    """The whole adapter tensors (gathered from the shards under FSDP2: a collective)."""
    return {k: fad.full_tensor(p.detach()).float().cpu().clone()
            for k, p in fa_io._adapter_entries(model, "default").items()}


def train(model, rows: slice, wrapped=None) -> list[float]:
    """STEPS SGD steps on rows ``rows`` of each global batch; the global mean loss of each step."""
    runner = wrapped if wrapped is not None else model
    params = [p for p in runner.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=LR)
    losses = []
    for ids in batches():
        ids = ids.to(DEVICE)
        loss = runner(input_ids=ids[rows], labels=ids[rows]).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        value = loss.detach().float()
        if wrapped is not None:  # each rank's mean over the same number of tokens: mean of the means
            dist.all_reduce(value)
            value /= dist.get_world_size()
        losses.append(float(value))
    return losses


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys(), (sorted(a), sorted(b))
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def run_case(adapter: str, mode: str, checkpointing: bool = False, backend: str | None = None,
             mp_policy=None, base_dtype=torch.float32, ref_backend: str | None = "same"):
    """One case: the single-process reference (no mixed precision policy; on ``ref_backend``) and the
    distributed run, both from the same start. Returns (results, distributed model, reference model)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    per = GLOBAL_BATCH // world
    ref = patched_model(adapter, backend if ref_backend == "same" else ref_backend, base_dtype)
    if checkpointing:
        enable_checkpointing(ref)
    t0 = time.time()
    ref_losses = train(ref, slice(None))
    ref_weights = adapter_weights(ref)

    model = patched_model(adapter, backend, base_dtype)
    if checkpointing:
        enable_checkpointing(model)
    wrapped = None
    if mode == "ddp":
        wrapped = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=False)
    else:
        fad.shard_model(model, mp_policy=mp_policy)
        wrapped = model
    losses = train(model, slice(rank * per, (rank + 1) * per), wrapped)
    weights = adapter_weights(model)
    out = {"adapter": adapter, "mode": mode, "checkpointing": checkpointing, "backend": backend,
           "ref_losses": ref_losses, "losses": losses, "weight_diff": max_diff(weights, ref_weights),
           "weight_scale": max(float(w.abs().max()) for w in ref_weights.values()),
           "moved": max_diff(weights, adapter_weights(patched_model(adapter, backend, base_dtype))),
           "seconds": time.time() - t0}
    return out, model, ref


# ---------------------------------------------------------------------------------------------
# jobs
# ---------------------------------------------------------------------------------------------

def job_torch(outdir: str) -> dict:
    res = {"cases": [], "saves": {}, "refusals": {}, "reloads": {}}
    writes = {"n": 0}
    real_write = fa_io._write_atomic

    def counting_write(*a, **k):
        writes["n"] += 1
        return real_write(*a, **k)

    fa_io._write_atomic = counting_write
    probe = torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(7))
    for adapter in ("lora", "series", "pfeiffer", "parallel", "prefix"):
        for mode in ("ddp", "fsdp"):
            for ckpt in (False, True):
                case, model, ref = run_case(adapter, mode, ckpt)
                res["cases"].append(case)
                if mode == "fsdp" and ckpt:  # save from the sharded run; the reference's outputs to compare
                    formats = ("fastadapters", "peft") if adapter in ("lora", "prefix") else ("fastadapters",)
                    for fmt in formats:
                        before = writes["n"]
                        path = os.path.join(outdir, f"{adapter}-{fmt}")
                        fa.save_adapter(model, path, format=fmt)
                        per_rank = [None] * dist.get_world_size()
                        dist.all_gather_object(per_rank, writes["n"] - before)
                        res["saves"][f"{adapter}-{fmt}"] = {"path": path, "writes": per_rank}
                    # resume-style load into the sharded model: each rank keeps its part of the file
                    trained = adapter_weights(model)
                    with torch.no_grad():
                        for p in model.parameters():
                            if p.requires_grad:
                                p.zero_()
                    fa.load_adapter(model, os.path.join(outdir, f"{adapter}-fastadapters"))
                    res["reloads"][adapter] = max_diff(adapter_weights(model), trained)
                    ref.eval()
                    with torch.no_grad():
                        logits = ref(input_ids=probe).logits
                    if dist.get_rank() == 0:
                        torch.save({"probe": probe, "logits": logits}, os.path.join(outdir, f"{adapter}-ref.pt"))
    for ckpt in (False, True):  # DDP with find_unused_parameters=False and an inactive adapter
        res["cases"].append(run_case("lora+idle", "ddp", ckpt)[0])
    res["mixed"] = mixed_cases()  # in this launch too: a launch costs more than these cases
    # a sharded save that fails on rank 0 (its directory is a file) raises on every rank, none hangs
    model = patched_model("lora")
    fad.shard_model(model)
    blocked = os.path.join(outdir, "blocked")
    if dist.get_rank() == 0:
        open(blocked, "w").close()
    dist.barrier()
    try:
        fa.save_adapter(model, blocked)
        error = None
    except Exception as e:
        error = f"{type(e).__name__}: {e}"
    res["failed_save"] = [None] * dist.get_world_size()
    dist.all_gather_object(res["failed_save"], error)
    # the refusals: an adapter patched into a sharded / DDP-wrapped model would never be reduced
    model = tiny_model("llama", seed=0)
    fad.shard_model(model)
    names = [n for n, _ in model.named_parameters()]
    try:
        fa.patch(model, adapter="lora", r=2)
        res["refusals"]["fsdp"] = None
    except ValueError as e:
        res["refusals"]["fsdp"] = str(e)
    res["refusals"]["fsdp_unchanged"] = names == [n for n, _ in model.named_parameters()] and \
        "_fastadapters" not in model.__dict__
    ddp = torch.nn.parallel.DistributedDataParallel(tiny_model("llama", seed=0))
    try:
        fa.patch(ddp, adapter="lora", r=2)
        res["refusals"]["ddp"] = None
    except ValueError as e:
        res["refusals"]["ddp"] = str(e)
    return res


def mixed_cases() -> list[dict]:
    from torch.distributed.fsdp import MixedPrecisionPolicy

    res = {"cases": []}
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for adapter in ("lora", "series", "parallel", "prefix"):
        for ckpt in (False, True):
            case, _, _ = run_case(adapter, "fsdp", ckpt, mp_policy=mp)
            case["kind"] = "mp-bf16"
            res["cases"].append(case)
        # a frozen bf16 base and fp32 adapters in one FSDP unit (no policy): against the same
        # model trained in one process
        case, model, _ = run_case(adapter, "fsdp", False, base_dtype=torch.bfloat16)
        case["kind"] = "bf16-base"
        case["adapter_dtypes"] = sorted({str(p.dtype) for p in model.parameters() if p.requires_grad})
        res["cases"].append(case)
    return res["cases"]


def job_triton(outdir: str) -> dict:
    from fastadapters.ops import lora as lora_ops

    res = {"cases": [], "group_calls": 0}
    real = lora_ops.branch_group
    calls = {"n": 0}

    def counting(*a, **k):
        calls["n"] += 1
        return real(*a, **k)

    import fastadapters.layers as layers
    layers.branch_group = counting  # the shared-input path calls it through layers' import
    # the interpreter is slow: LoRA (grouped q/k/v) under DDP, parallel (grouped q/k/v, checkpointed:
    # the group's outputs are handed out again in the recompute) and series under FSDP2
    # the single-process reference runs the torch ops (the interpreter would double the cost; the
    # kernels against the torch ops: tests/kernels)
    for adapter, mode, ckpt in (("lora", "ddp", False), ("parallel", "fsdp", True), ("series", "fsdp", False)):
        case, _, _ = run_case(adapter, mode, checkpointing=ckpt, backend="triton", ref_backend="torch")
        res["cases"].append(case)
    # the grouped kernels' backward under FSDP2 bf16 mixed precision (against the fp32 triton run)
    from torch.distributed.fsdp import MixedPrecisionPolicy

    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    case, _, _ = run_case("lora", "fsdp", backend="triton", mp_policy=mp, ref_backend="torch")
    case["kind"] = "mp-bf16"
    res["cases"].append(case)
    res["group_calls"] = calls["n"]
    return res


def job_gpu(outdir: str) -> dict:
    """FSDP2 on one GPU rank with the real Triton kernels (shared-input grouping included), against
    one process without FSDP on the same kernels; bf16 mixed precision against fp32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    res = {"cases": []}
    for adapter, ckpt in (("lora", False), ("parallel", True)):
        res["cases"].append(run_case(adapter, "fsdp", checkpointing=ckpt, backend="triton")[0])
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    case = run_case("lora", "fsdp", backend="triton", mp_policy=mp)[0]
    case["kind"] = "mp-bf16"
    res["cases"].append(case)
    return res


JOBS = {"torch": job_torch, "triton": job_triton, "gpu": job_gpu}


def main() -> None:
    job, outdir = sys.argv[1], sys.argv[2]
    if DEVICE == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if DEVICE == "cuda" else "gloo")
    torch.set_num_threads(1)
    try:
        res = JOBS[job](outdir)
        res["world_size"] = dist.get_world_size()
        if dist.get_rank() == 0:
            with open(os.path.join(outdir, "results.json"), "w") as f:
                json.dump(res, f, indent=1)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
