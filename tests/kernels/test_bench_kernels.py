"""bench/kernel_ops.py imports and runs its CPU smoke configuration (the Triton ops via the interpreter)."""
import importlib.util
import json
import os

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_bench_kernels_smoke(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_kernels", os.path.join(ROOT, "bench", "kernel_ops.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "k.json"
    assert mod.main(["--smoke", "--device", "cpu", "--repeats", "1", "--json", str(out)]) == 0
    rec = json.loads(out.read_text())[-1]
    kinds = [r["kind"] for r in rec["rows"]]
    assert kinds == ["lora", "lora_qkv_group", "parallel_qkv_group", "bottleneck_output", "bottleneck_parallel"]
    assert set(rec["rows"][2]["impls"]) == {"base", "single", "grouped"} and rec["rows"][2]["b"] == 8
    group = rec["rows"][1]
    assert set(group["impls"]) == {"base", "single", "grouped"} and group["outs"] == [40, 16, 16]
    assert group["grouped_over_single_full"] == group["impls"]["grouped"]["full_ms"] / group["impls"]["single"]["full_ms"]
    lora = rec["rows"][0]
    assert {"base", "fused", "addmm"} <= set(lora["impls"])
    for impl in lora["impls"].values():
        assert impl["full_ms"] > 0 and impl["saved_bytes_per_token"] > 0
    assert rec["env"]["device_type"] == "cpu"
