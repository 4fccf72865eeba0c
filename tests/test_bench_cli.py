"""`fastadapters bench` runs end to end on the micro preset and writes parseable JSON."""
import json

from fastadapters import bench, cli


def test_bench_micro_writes_json(tmp_path, capsys):
    out = tmp_path / "r.json"
    rc = cli.main(["bench", "--preset", "micro", "--repeats", "1", "--no-serving", "--json", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "| fa lora" in text and "| PEFT lora" in text
    data = json.loads(out.read_text())
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


def test_saved_activation_bytes_counts_storages_once():
    import torch

    x = torch.randn(64, 32, requires_grad=True)
    n = bench.saved_activation_bytes(lambda: (x * x).sum())  # x saved twice, one storage
    assert n == x.untyped_storage().nbytes()


def test_unknown_command_exits_2(capsys):
    assert cli.main(["frobnicate"]) == 2
    assert "valid: bench, train, eval" in capsys.readouterr().err
