"""The training-step table: time and memory of one training step (forward + backward) of each
adapter type against PEFT LoRA and the frozen base.

The default model is embedded (a small Llama-architecture config with random weights: nothing is
downloaded). Rows: the frozen base (forward + backward into the input embeddings, no weight
gradients: what an adapter on every layer pays at least; an adapter only on late linears, such as
Pfeiffer's, can stop its backward earlier and come in under it), PEFT LoRA, and fastadapters LoRA,
series (Houlsby, Pfeiffer), parallel and prefix. The figure of merit is a ratio from the same run:
fastadapters / PEFT for LoRA, and every row / frozen base.
"""
from __future__ import annotations

import copy
import statistics
import time

from .harness import environment, format_ratio, peak_memory, ratio_stats, saved_activation_bytes, time_fn

PRESETS = {
    # name: (LlamaConfig kwargs, batch, seq)
    "micro": (dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2), 2, 32),
    "tiny": (dict(vocab_size=2048, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=4), 4, 128),
    "1b": (dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                num_attention_heads=32, num_key_value_heads=4), 4, 2048),
}




def _build_model(preset: str, device, dtype, seed: int = 0):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(**PRESETS[preset][0])
    cfg._attn_implementation = "sdpa"
    return LlamaForCausalLM(cfg).to(device=device, dtype=dtype)


def _variants(r: int, dropout: float, bottleneck: int):
    return [
        ("frozen base", None, {}),
        ("PEFT lora", "peft", dict(r=r, lora_alpha=2 * r, lora_dropout=dropout, target_modules=["q_proj", "v_proj"])),
        ("fa lora", "lora", dict(r=r, alpha=2 * r, dropout=dropout)),
        ("fa series houlsby", "series", dict(variant="houlsby", bottleneck_size=bottleneck)),
        ("fa series pfeiffer", "series", dict(variant="pfeiffer", bottleneck_size=bottleneck)),
        ("fa parallel", "parallel", dict(bottleneck_size=bottleneck)),
        ("fa prefix", "prefix", dict(num_virtual_tokens=30)),
    ]


def _prepare(model, kind, fields):
    import fastadapters as fa

    if kind is None:
        for p in model.parameters():
            p.requires_grad_(False)
        # backward into the inputs: every layer's dX runs, no weight gradient (the adapter floor)
        emb = model.get_input_embeddings()
        hook = emb.register_forward_hook(lambda m, i, o: o.requires_grad_(True))
        return model, lambda: hook.remove()
    if kind == "peft":
        import peft

        pm = peft.get_peft_model(model, peft.LoraConfig(task_type="CAUSAL_LM", **fields))
        return pm, lambda: pm.unload()
    fa.patch(model, adapter=kind, **fields)
    return model, lambda: fa.unpatch(model)


def training_step_table(preset: str = "tiny", device: str | None = None, dtype: str | None = None,
                        r: int = 16, dropout: float = 0.05, bottleneck: int = 64, repeats: int = 5,
                        only: list[str] | None = None, log=print) -> dict:
    """Time each variant's training step (see the module docstring). On the CPU the variants run
    round-robin ``repeats`` times, so every ratio is also taken per round: ``vs_frozen_base_stats``
    and ``vs_peft_stats`` hold its median and range, and ``noisy`` marks a ratio whose spread is
    larger than its effect (rendered as noise, not as a result)."""
    import torch

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dt = getattr(torch, dtype) if dtype else (torch.bfloat16 if dev.type == "cuda" else torch.float32)
    cfg_kwargs, batch, seq = PRESETS[preset]
    model = _build_model(preset, dev, dt)
    model.train()
    ids = torch.randint(0, cfg_kwargs["vocab_size"], (batch, seq), device=dev)
    variants = [v for v in _variants(r, dropout, bottleneck) if not only or any(o in v[0] for o in only)]
    # On the CPU the variants are timed round-robin on their own copies of the model, so slow drift
    # of the machine (other processes, allocator warm-up) hits every variant alike; on CUDA
    # do_bench is steady and one model is patched and unpatched in turn (no copies in GPU memory).
    interleave = dev.type != "cuda"
    rows, steps = [], {}
    for label, kind, fields in variants:
        try:
            m, undo = _prepare(copy.deepcopy(model) if interleave else model, kind, fields)
        except ImportError as e:
            log(f"  skipped {label}: {e}")
            continue

        def step(m=m):
            out = m(input_ids=ids, labels=ids, use_cache=False)
            out.loss.backward()
            for p in m.parameters():
                p.grad = None

        saved = saved_activation_bytes(lambda: m(input_ids=ids, labels=ids, use_cache=False).loss)
        row = {"variant": label, "saved_activation_MiB": saved / 2**20}
        if interleave:
            steps[label] = step
        else:
            try:
                row["step_s"] = time_fn(step, dev, warmup=2, repeats=repeats)
                peak = peak_memory(step, dev)
                row["peak_MiB"] = None if peak is None else peak / 2**20
            finally:
                undo()
        rows.append(row)
    if interleave:
        times: dict[str, list[float]] = {label: [] for label in steps}
        for rep in range(repeats + 2):  # two warm-up rounds
            for label, step in steps.items():
                t0 = time.perf_counter()
                step()
                if rep >= 2:
                    times[label].append(time.perf_counter() - t0)
        for row in rows:
            row["step_s"] = statistics.median(times[row["variant"]])
            row["step_s_repeats"] = times[row["variant"]]
            row["peak_MiB"] = None
    for row in rows:
        row["tokens_per_s"] = batch * seq / row["step_s"]
        log(f"  {row['variant']:<20} {row['step_s'] * 1e3:9.1f} ms/step")
    by = {r_["variant"]: r_ for r_ in rows}
    base = by.get("frozen base")

    def per_round(num, den):
        if "step_s_repeats" in num and "step_s_repeats" in den:
            return ratio_stats([a / b for a, b in zip(num["step_s_repeats"], den["step_s_repeats"])])
        return ratio_stats([num["step_s"] / den["step_s"]])  # CUDA: do_bench's median, no per-round ratio

    for row in rows:
        row["vs_frozen_base"] = row["step_s"] / base["step_s"] if base else None
        if base and row is not base:
            row["vs_frozen_base_stats"] = per_round(row, base)
    if "PEFT lora" in by and "fa lora" in by:
        by["fa lora"]["vs_peft"] = by["fa lora"]["step_s"] / by["PEFT lora"]["step_s"]
        by["fa lora"]["vs_peft_stats"] = per_round(by["fa lora"], by["PEFT lora"])
        by["fa lora"]["saved_vs_peft"] = by["fa lora"]["saved_activation_MiB"] / by["PEFT lora"]["saved_activation_MiB"]
    return {"benchmark": "training_step", "preset": preset, "model": cfg_kwargs, "batch": batch, "seq": seq,
            "dtype": str(dt).replace("torch.", ""), "r": r, "lora_dropout": dropout, "bottleneck_size": bottleneck,
            "env": environment(dev), "rows": rows}


def render(result: dict) -> str:
    env = result["env"]
    lines = [f"Training step, {result['preset']} Llama config ({result['model']['num_hidden_layers']} layers, "
             f"hidden {result['model']['hidden_size']}), batch {result['batch']} x seq {result['seq']}, "
             f"{result['dtype']}, on {env['device']} ({env['device_type']}, {env['threads']} threads), "
             f"LoRA r={result['r']} dropout={result['lora_dropout']}, bottleneck {result['bottleneck_size']}",
             "",
             f"| {'variant':<20} | {'ms/step':>9} | {'tokens/s':>9} | {'saved act MiB':>13} | {'peak MiB':>9} "
             f"| {'vs base':>7} | {'vs PEFT':>7} |",
             "|" + "|".join("-" * w for w in (22, 11, 11, 15, 11, 9, 9)) + "|"]
    for row in result["rows"]:
        peak = "-" if row["peak_MiB"] is None else f"{row['peak_MiB']:.0f}"
        vs_peft = format_ratio(row.get("vs_peft_stats"), 3) if "vs_peft" in row else "-"
        if row.get("vs_frozen_base_stats"):
            vs_base = format_ratio(row["vs_frozen_base_stats"], 3)
        else:
            vs_base = f"{row['vs_frozen_base']:.3f}" if row.get("vs_frozen_base") else "-"
        lines.append(f"| {row['variant']:<20} | {row['step_s'] * 1e3:9.1f} | {row['tokens_per_s']:9.0f} "
                     f"| {row['saved_activation_MiB']:13.1f} | {peak:>9} | {vs_base:>7} | {vs_peft:>7} |")
    if any((r.get("vs_peft_stats") or r.get("vs_frozen_base_stats") or {}).get("noisy") for r in result["rows"]):
        lines += ["", "noise (low-high): the ratio's range over the repeats is wider than its distance from 1 -- "
                      "the machine's noise, not a result; rerun on a quieter machine or with more --repeats"]
    return "\n".join(lines)


def summary(result: dict) -> dict:
    """The table's headline for the summary: fastadapters LoRA's training step over PEFT LoRA's."""
    from .harness import summary_line

    fa = next((r for r in result["rows"] if r["variant"] == "fa lora"), None)
    stats = (fa or {}).get("vs_peft_stats") or {}
    value = stats.get("median", (fa or {}).get("vs_peft"))
    return summary_line("training", "fa LoRA / PEFT LoRA step time", value, "x", "below", 1.0,
                        "below 1: fastadapters trains faster", stats.get("noisy"),
                        note="" if fa and "vs_peft" in fa else "PEFT not installed or row skipped")
