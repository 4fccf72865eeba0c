"""The kernel table's CPU decode rows: one layer's forward per M for LoRA (beside PEFT and the plain
linear), parallel and series adapters, with ratios from the same run, and their markdown."""
import torch

from fastadapters.bench import harness
from fastadapters.bench.kernels import _decode_layers, _run_decode_rows, render_kernel_table


def test_decode_rows_fields_ratios_and_table():
    rows, logged = [], []
    _run_decode_rows(torch, harness, torch.device("cpu"), torch.float32, rows, [("tiny", 24, 20, 4, 6)], (1, 3),
                     0.05, 1, logged.append)
    assert [(r["kind"], r["M"]) for r in rows] == [(k, m) for k in ("lora_decode", "parallel_decode", "series_decode")
                                                   for m in (1, 3)]
    assert len(logged) == len(rows)
    lora, par = rows[0], rows[2]
    assert set(lora["impls"]) == {"base", "fused", "peft"} and set(par["impls"]) == {"base", "fused"}
    assert (lora["r"], par["b"], lora["threads"]) == (4, 6, torch.get_num_threads())
    for r in rows:
        for v in r["impls"].values():
            assert v["fwd_ms"] > 0 and v["fwd_cpu_ms"] >= 0 and v["calls_per_round"] >= 1
        assert r["fused_over_base_fwd"] == r["impls"]["fused"]["fwd_ms"] / r["impls"]["base"]["fwd_ms"]
    assert lora["peft_over_fused_fwd"] == lora["impls"]["peft"]["fwd_ms"] / lora["impls"]["fused"]["fwd_ms"]
    text = render_kernel_table(dict(rows=rows, dtype="float32", env={"device": "cpu"}))
    assert text.startswith("Decode, one layer's forward") and "| lora_decode | M=3 K=24 N=20 r=4 |" in text
    assert "| series_decode | M=1 K=24 N=20 b=6 |" in text


def test_decode_layers_compute_the_same_function():
    """The timed modules are one computation: PEFT's layer and fastadapters' on the same weights agree,
    and every adapter is on (its branch changes the base output)."""
    x = torch.randn(3, 24)
    with torch.inference_mode():
        lora = _decode_layers(torch, "lora", 24, 20, 4, "cpu", torch.float32, 0.05)
        torch.testing.assert_close(lora["fused"](x), lora["peft"](x), atol=1e-5, rtol=1e-5)
        for kind in ("lora", "parallel", "series"):
            impls = lora if kind == "lora" else _decode_layers(torch, kind, 24, 20, 6, "cpu", torch.float32, 0.05)
            assert not torch.allclose(impls["fused"](x), impls["base"](x), atol=1e-3)


def test_bench_decode_script_runs_on_a_tiny_model(tmp_path):
    """bench/decode.py (per-token step and generate loop, base / fa / PEFT) end to end on --tiny."""
    import importlib.util
    import json
    import os

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    spec = importlib.util.spec_from_file_location("bench_decode", os.path.join(root, "bench", "decode.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "d.json"
    assert mod.main(["--tiny", "--steps", "2", "--rounds", "1", "--new", "2", "--json", str(out)]) == 0
    rec = json.loads(out.read_text())[-1]
    rows = {r["model"]: r for r in rec["rows"]}
    assert set(rows) == {"base", "fa_lora", "peft_lora", "fa_parallel", "fa_series"}
    assert rec["peft_tokens_equal"] is True and rec["benchmark"] == "decode"
    for r in rows.values():
        assert r["step_ms"] > 0 and r["generate_s"] > 0
        assert r["step_over_base"] == r["step_ms"] / rows["base"]["step_ms"]
