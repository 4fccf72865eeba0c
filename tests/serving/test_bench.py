"""The serving table's building blocks run and check themselves (speed is never asserted)."""
import torch

from fastadapters.serving import bench as sb


def test_bench_case_and_render():
    bw = sb.measured_bandwidth(torch.device("cpu"), 1 << 20)
    rows = [sb.bench_case(torch.device("cpu"), torch.float32, 32, 24, b, t, a, s, bw, "torch", repeats=1)
            for b, t, a, s in [(4, 1, 4, "mixed"), (2, 3, 1, "16")]]
    for r in rows:
        for key in ("fa", "merged", "sequential", "peft"):
            assert r[f"{key}_us"] > 0 and r[f"{key}_over_floor"] > 0
    text = sb.render_serving({"env": {"device": "cpu"}, "dtype": "torch.float32", "backend": "torch",
                              "bandwidth_GBps": bw / 1e9, "rows": rows})
    assert "| decode | 4 | 4 | mixed |" in text and "| prefill | 2 | 1 | 16 |" in text
