"""The serving table's building blocks run and check themselves (speed is never asserted)."""
import torch

from fastadapters.bench import layers as sb


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


def test_render_adds_the_graph_column_when_rows_have_it():
    """CUDA rows carry fa_graph (the graph-replayed layer): the table shows it beside eager fa."""
    from fastadapters.bench.layers import render_serving

    row = {"mode": "decode", "B": 8, "A": 8, "ranks": "16", "K": 4096, "N": 4096, "floor_us": 12.0,
           "fa_us": 40.0, "fa_over_floor": 3.33, "fa_graph_us": 14.0, "fa_graph_over_floor": 1.17,
           "merged_us": 13.0, "merged_over_floor": 1.08, "sequential_us": 90.0, "sequential_over_floor": 7.5,
           "sequential_over_fa": 2.25, "fa_over_merged": 3.08}
    rec = {"rows": [row], "dtype": "torch.bfloat16", "backend": "triton", "bandwidth_GBps": 3000.0,
           "env": {"device": "NVIDIA H100"}}
    text = render_serving(rec).splitlines()
    assert "| fa graph us (x floor) |" in text[2] and text[2].count("|") == text[3].count("|")
    assert "| 40 (3.3) | 14 (1.2) | - |" in text[4]
    del row["fa_graph_us"]
    assert "fa graph" not in render_serving(rec)
