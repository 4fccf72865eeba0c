"""`fastadapters bench` runs end to end on the micro preset and writes parseable JSON; its end-to-end
serving section runs at a tiny size, picks issue 13's configuration on CUDA, and `--no-e2e` skips it."""
import importlib.util
import json
import os

from fastadapters import cli
from fastadapters.bench import command as bench, harness


def test_bench_micro_writes_json(tmp_path, capsys):
    out = tmp_path / "r.json"
    rc = cli.main(["bench", "--preset", "micro", "--repeats", "1", "--no-serving", "--no-e2e", "--json", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "serving end to end" not in text
    assert "| fa lora" in text and "| PEFT lora" in text
    # issue 20: the duration up front, progress per table, then the summary before the tables
    lines = text.splitlines()
    assert lines[0].startswith("fastadapters bench: preset micro on cpu; 2 tables (training, kernels), about ")
    assert "[1/2] training-step table" in text and "[2/2] kernel table" in text and "done in " in text
    summary = lines.index("Summary (each table's headline ratio from this run; details in the tables below):")
    assert summary < next(i for i, ln in enumerate(lines) if ln.startswith("Training step, micro"))
    heads = lines[summary + 1:summary + 3]
    assert heads[0].startswith("  training  fa LoRA / PEFT LoRA step time = ")
    assert "(good: below 1: fastadapters trains faster)  -> " in heads[0]
    assert heads[1].startswith("  kernels   PEFT / fused LoRA layer fwd+bwd = ")
    assert "(good: above 1: the fused layer is faster)  -> " in heads[1]
    assert all(h.split("-> ")[1].split(";")[0] in ("GOOD", "BAD", "EVEN", "NOISE: spread > effect, not a result")
               for h in heads)
    data = json.loads(out.read_text())
    assert [d["benchmark"] for d in data] == ["training_step", "kernels"]  # --no-e2e: no serving_e2e record
    assert data[0]["summary"]["table"] == "training" and data[1]["summary"]["table"] == "kernels"
    stats = {r["variant"]: r for r in data[0]["rows"]}["fa lora"]["vs_peft_stats"]
    assert stats["low"] <= stats["median"] <= stats["high"] and stats["noisy"] is None  # --repeats 1: cannot tell
    assert data[0]["summary"]["value"] == stats["median"]
    rows = {r["variant"]: r for r in data[0]["rows"]}
    assert {"frozen base", "PEFT lora", "fa lora", "fa series houlsby", "fa parallel", "fa prefix"} <= set(rows)
    assert all(r["step_s"] > 0 for r in rows.values())
    assert rows["fa lora"]["vs_peft"] == rows["fa lora"]["step_s"] / rows["PEFT lora"]["step_s"]
    assert data[0]["env"]["device_type"] == "cpu"
    # the kernel table: on the CPU "fused" is the torch path, beside the frozen base and PEFT's layer
    assert "fused = torch backend" in text and "| lora | M=512 K=1024 N=1024 r=16 |" in text
    kernels = data[1]
    assert kernels["benchmark"] == "kernels"
    kinds = [r["kind"] for r in kernels["rows"]]
    assert kinds[:3] == ["lora", "bottleneck_output", "bottleneck_parallel"]
    # then the decode rows: one layer's forward at M = 1, 2, 8, 64 for each adapter type, PEFT beside LoRA
    decode = kernels["rows"][3:]
    assert [(r["kind"], r["M"]) for r in decode] == [(f"{k}_decode", m) for k in ("lora", "parallel", "series")
                                                     for m in (1, 2, 8, 64)]
    assert set(decode[0]["impls"]) == {"base", "fused", "peft"} and set(decode[4]["impls"]) == {"base", "fused"}
    assert all(v["fwd_ms"] > 0 and v["fwd_cpu_ms"] >= 0 for r in decode for v in r["impls"].values())
    m2 = decode[1]["impls"]
    assert decode[1]["peft_over_fused_fwd"] == m2["peft"]["fwd_ms"] / m2["fused"]["fwd_ms"]
    assert "| lora_decode | M=2 K=576 N=576 r=16 |" in text
    lora = kernels["rows"][0]
    assert set(lora["impls"]) == {"base", "fused", "peft"} and lora["fused_backend"] == "torch"
    assert lora["peft_over_fused_full"] == lora["impls"]["peft"]["full_ms"] / lora["impls"]["fused"]["full_ms"]


def test_bench_e2e_section_tiny(tmp_path, capsys, monkeypatch):
    # the section's CPU configuration shrunk further, so the test takes seconds
    monkeypatch.setattr(bench, "E2E_CPU", dict(adapter_counts=(1, 2), requests=4, max_tokens=3, prompt_lens=(4, 9),
                                               max_num_seqs=4, parity=2))
    out = tmp_path / "r.json"
    rc = cli.main(["bench", "--preset", "micro", "--repeats", "1", "--only", "fa lora", "--no-kernels",
                   "--no-serving", "--json", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert ("serving end to end: small random Llama (hidden 256, 4 layers, vocab 2048), float32, "
            "4 requests x 3 new tokens, max_num_seqs 4, prompts 4-9 tokens, on ") in text
    assert "(cpu, " in text and "| A | adapters used | engine tok/s |" in text
    data = json.loads(out.read_text())
    assert [d["benchmark"] for d in data] == ["training_step", "serving_e2e"]
    e2e = data[1]
    assert e2e["dtype"] == "float32" and e2e["env"]["device_type"] == "cpu"
    assert e2e["model_shape"] == {"hidden_size": 256, "num_hidden_layers": 4, "vocab_size": 2048}
    assert [r["A"] for r in e2e["rows"]] == [1, 2]
    hf = e2e["hf_generate"]  # HF's batched generate of the base model on the same prompts: the yardstick
    assert hf["tokens"] == 4 * 3 and hf["tok_per_s"] > 0
    assert f"HF batched generate of the base model (padded batches of 4): {hf['tok_per_s']:.1f} tok/s" in text
    for r in e2e["rows"]:
        # HF's generate runs in each row beside the engine; the header gives the median of those runs
        assert r["hf_generate"]["tokens"] == 4 * 3
        assert r["base_only_over_hf"] == r["base_only"]["tok_per_s"] / r["hf_generate"]["tok_per_s"]
        assert r["engine"]["tokens"] == r["base_only"]["tokens"] == 4 * 3  # ignore_eos: every token generated
        assert r["engine"]["tok_per_s"] > 0 and r["engine"]["ttft_p50_ms"] <= r["engine"]["ttft_p99_ms"]
        assert r["ratio_vs_base_only"] == r["engine"]["tok_per_s"] / r["base_only"]["tok_per_s"]
        assert 1 <= r["distinct_adapters_used"] <= r["A"]
        assert r["parity_checked"] == 2 and 0 <= r["parity_diverged"] <= 2
        assert r["peft_padded_generate"]["tokens"] == 4 * 3
        assert r["engine_over_peft"] == r["engine"]["tok_per_s"] / r["peft_padded_generate"]["tok_per_s"]
        assert f"| {r['A']} | {r['distinct_adapters_used']} | {r['engine']['tok_per_s']:.1f} |" in text


def test_bench_e2e_section_configuration(monkeypatch):
    # which configuration each device gets (run_e2e itself is exercised above)
    from fastadapters.bench import e2e as e2e_bench

    calls = []
    monkeypatch.setattr(e2e_bench, "run_e2e", lambda spec, **kw: calls.append((spec, kw)) or {})
    bench.e2e_section("cuda", None)
    bench.e2e_section("cuda:1", "float16")
    bench.e2e_section("cpu", None)
    bench.e2e_section("cpu", None, "/venvs/vllm/bin/python")
    (spec, cuda), (_, cuda1), (_, cpu), (_, cpu_vllm) = calls
    assert cpu["vllm_python"] is None and cpu_vllm["vllm_python"] == "/venvs/vllm/bin/python"
    assert spec == "small" and cuda["adapter_counts"] == (1, 8, 32) and cuda["dtype"] == "bfloat16"
    assert cuda["device"] == "cuda" and cuda1["device"] == "cuda:1" and cuda1["dtype"] == "float16"
    assert cpu["adapter_counts"] == (1, 8, 32) and cpu["dtype"] == "float32" and cpu["requests"] <= 16


def test_saved_activation_bytes_counts_storages_once():
    import torch

    x = torch.randn(64, 32, requires_grad=True)
    n = harness.saved_activation_bytes(lambda: (x * x).sum())  # x saved twice, one storage
    assert n == x.untyped_storage().nbytes()


def test_unknown_command_exits_2(capsys):
    assert cli.main(["frobnicate"]) == 2
    assert "valid: bench, train, eval" in capsys.readouterr().err


def test_a_ratio_whose_spread_exceeds_its_effect_is_flagged_not_printed():
    """Per-repeat ratios: 1.10 with a range of 0.80-1.45 is noise (half-range 0.33 > effect 0.10) and is
    rendered as such, never as a result; 1.50 within 1.45-1.56 is a result."""
    noisy = harness.ratio_stats([0.80, 1.10, 1.45, 1.05, 1.2])
    assert noisy["median"] == 1.10 and noisy["noisy"] is True
    assert harness.format_ratio(noisy) == "noise (0.80-1.45)"
    steady = harness.ratio_stats([1.50, 1.45, 1.56])
    assert steady["noisy"] is False and harness.format_ratio(steady) == "1.50"
    assert harness.ratio_stats([1.3])["noisy"] is None  # one repeat cannot tell
    assert harness.verdict(1.10, "below", 1.0, noisy=True) == "noise"
    assert harness.verdict(0.80, "below", 1.0) == "good" and harness.verdict(1.3, "below", 1.0) == "bad"
    assert harness.verdict(1.02, "above", 1.0) == "even"
    line = harness.render_summary([harness.summary_line("training", "fa / PEFT", 1.1, "x", "below", 1.0,
                                                        "below 1", noisy=True)])
    assert "NOISE: spread > effect, not a result" in line.splitlines()[1]


def test_e2e_trials_interleaved_medians():
    # --trials N: every A measured N times on fresh prompts; the row reports the median of each
    # per-trial ratio (not a ratio of medians) and its range; one trial keeps the single-run record
    import pytest

    from fastadapters.bench import e2e as e2e_bench

    res = e2e_bench.run_e2e("small", adapter_counts=(2,), requests=3, max_tokens=2, prompt_lens=(4, 7),
                            max_num_seqs=3, parity=0, trials=3)
    assert res["trials"] == 3
    (row,) = res["rows"]
    recs = row["trials"]
    assert len(recs) == 3
    for key in ("ratio_vs_base_only", "engine_over_peft", "base_only_over_hf"):
        vals = sorted(r[key] for r in recs)
        assert row[key] == vals[1] and row["ratio_range"][key] == [vals[0], vals[2]]
    for r in recs:
        hf = r["hf_generate"]
        assert r["ratio_vs_base_only"] == r["engine"]["tok_per_s"] / r["base_only"]["tok_per_s"]
        assert r["engine_over_peft"] == r["engine"]["tok_per_s"] / r["peft_padded_generate"]["tok_per_s"]
        assert r["base_only_over_hf"] == r["base_only"]["tok_per_s"] / hf["tok_per_s"]
        assert r["engine"]["tokens"] == r["base_only"]["tokens"] == r["peft_padded_generate"]["tokens"] == \
            hf["tokens"] == 3 * 2
    assert row["engine"]["tok_per_s"] == sorted(r["engine"]["tok_per_s"] for r in recs)[1]
    assert res["hf_generate"]["tok_per_s"] == row["hf_generate"]["tok_per_s"] == sorted(
        r["hf_generate"]["tok_per_s"] for r in recs)[1]
    text = e2e_bench.render_e2e(res)
    assert "median of 3 trials" in text
    lo, hi = row["ratio_range"]["engine_over_peft"]
    assert f"{row['engine_over_peft']:.2f} ({lo:.2f}-{hi:.2f})" in text
    # the summary line calls it noise when the per-trial ratios spread wider than the effect
    spread = [r["engine_over_peft"] for r in recs]
    assert e2e_bench.summary(res)["noisy"] == ((max(spread) - min(spread)) / 2 > abs(row["engine_over_peft"] - 1))
    with pytest.raises(ValueError, match="trials"):
        e2e_bench.run_e2e("small", adapter_counts=(1,), trials=0)


def test_e2e_vllm_failure_is_recorded_and_the_rest_stands():
    # a Python without vLLM: the vLLM runs fail, the record says why (warned, rendered) and keeps
    # every engine number; nothing of vLLM's is made up
    import sys

    import pytest

    from fastadapters.bench import e2e as e2e_bench

    with pytest.warns(RuntimeWarning, match="vLLM runs failed"):
        res = e2e_bench.run_e2e("small", adapter_counts=(1,), requests=2, max_tokens=2, prompt_lens=(4, 6),
                                max_num_seqs=2, parity=0, with_peft=False, with_hf=False,
                                vllm_python=sys.executable if importlib.util.find_spec("vllm") is None
                                else "/nonexistent/python")
    assert "exited with" in res["vllm"]["error"] or "No such file" in res["vllm"]["error"]
    (row,) = res["rows"]
    assert row["engine"]["tokens"] == 4 and "vllm" not in row and "engine_over_vllm" not in row
    assert "vLLM: not measured" in e2e_bench.render_e2e(res)


def test_bench_vllm_python_checked(capsys):
    # --vllm-python: refused with --no-e2e (nothing would use it) and when it names no executable
    assert cli.main(["bench", "--no-e2e", "--vllm-python", "/bin/sh"]) == 2
    assert "--no-e2e" in capsys.readouterr().err
    assert cli.main(["bench", "--vllm-python", "/nonexistent/python"]) == 2
    assert "not an executable" in capsys.readouterr().err


def test_e2e_prompt_lens_past_512_and_checked():
    # --prompt-lens: prompts longer than the engine's default 512 positions grow its max_model_len
    # (the run serves them, no request refused); a bad range is refused, on the CLI with exit 2
    import pytest

    from fastadapters.bench import e2e as e2e_bench

    res = e2e_bench.run_e2e("small", adapter_counts=(1,), requests=2, max_tokens=3, prompt_lens=(600, 640),
                            max_num_seqs=2, parity=0, with_peft=False, with_hf=False)
    (row,) = res["rows"]
    assert res["prompt_lens"] == [600, 640]
    assert row["engine"]["tokens"] == row["base_only"]["tokens"] == 2 * 3
    for bad in ((0, 5), (9, 8), (4,), (4.0, 8)):
        with pytest.raises(ValueError, match="prompt_lens"):
            e2e_bench.run_e2e("small", adapter_counts=(1,), prompt_lens=bad)
    spec = importlib.util.spec_from_file_location("serving_e2e_cli", os.path.join(
        os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench", "serving_e2e.py"))
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    for bad in ("128", "a,b", "1,2,3"):
        with pytest.raises(SystemExit) as e:
            cli.main(["--prompt-lens", bad, "--json", ""])
        assert e.value.code == 2
