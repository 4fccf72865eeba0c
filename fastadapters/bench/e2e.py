"""End-to-end serving benchmark: the engine over a stream of requests for A adapters, vs baselines.

For each A in ``adapter_counts`` (default 1, 8, 32) the engine serves ``requests`` requests whose
adapters are drawn with Zipf popularity (p_i ~ 1/i) from A adapters -- LoRA of ranks 8, 16, 32,
64 in turn, every fourth a bottleneck adapter (series Houlsby / parallel) -- all submitted at once
(a burst: the queue drains at ``max_num_seqs``). Measured per run: output tokens/s (generated
tokens over wall time), time to first token (TTFT) and time per output token after the first
(TPOT), p50 and p99 over requests. Baselines in the same process, same prompts and lengths:

  base_only   the engine with every request on the base model (what adapters cost is the ratio)
  hf_generate Hugging Face's own batched ``generate`` of the base model on the same prompts in
              left-padded batches of ``max_num_seqs`` rows (what the engine's base-only run is
              measured against: ``base_only_over_hf``), run in every row beside the engine (the
              record's top-level ``hf_generate`` is the median of those runs); throughput only
  peft        ``model.generate`` on padded batches of ``max_num_seqs`` rows with PEFT LoRA adapters
              and ``adapter_names=`` per row (what a PEFT user has; PEFT has no bottleneck adapters,
              so its adapters are all LoRA of the same ranks); throughput only
  greedy parity  how many engine requests (greedy) differ from ``generate`` alone (near-ties)
  vllm        optional (``vllm_python=``: a Python with vLLM installed): vLLM's offline engine
              (``fastadapters/bench/vllm_offline.py`` in that Python, a subprocess) on each row's
              first-trial prompts and adapter draw, and the base model on the first row's prompts,
              after everything above (one trial: its LoRA runs are slow on a CPU). vLLM serves LoRA
              only, so its A adapters are all LoRA of the same ranks (as PEFT's); its greedy
              base-model answers are compared with the engine's (``vllm_base_greedy_equal``)

Noise: on a shared machine one run's ratio can move by 20% or more from run to run;
``trials=N`` (``bench/serving_e2e.py --trials N``) repeats every measurement N times, interleaved,
and reports medians with each ratio's range.

Models: a folder (e.g. SmolLM2-135M) or ``"small"``: a random Llama (hidden 256, 4 layers, vocab
2048) built from a config. ``run_e2e(...) -> dict`` returns a JSON-able record; ``render_e2e``
prints it as markdown. Nothing here asserts speed.
"""
from __future__ import annotations

import os
import random
import statistics
import subprocess
import tempfile
import time
import warnings

import torch

from .harness import ratio_stats

__all__ = ["run_e2e", "render_e2e"]

RANKS = (8, 16, 32, 64)


def _small_model(device, dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=2048, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                      num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=1024,
                      pad_token_id=0, bos_token_id=1, eos_token_id=None)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).to(device, dtype).eval()


def _load(model_spec: str, device, dtype):
    if model_spec == "small":
        return _small_model(device, dtype)
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_spec, dtype=dtype).to(device).eval()


LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def _lora_spec(i: int) -> dict:
    """Adapter ``i`` as LoRA (rank RANKS[i % 4]): ours where it is not a bottleneck adapter, and
    every one of PEFT's and vLLM's (they have no bottleneck adapters)."""
    return dict(adapter="lora", r=RANKS[i % len(RANKS)], alpha=16, target_modules=LORA_TARGETS)


def _adapter_spec(i: int) -> dict:
    if i % 4 == 3:
        return (dict(adapter="series", variant="houlsby", bottleneck_size=64) if (i // 4) % 2 == 0
                else dict(adapter="parallel", bottleneck_size=64))
    return _lora_spec(i)


def _write_adapters(model_spec, count: int, folder: str, device, dtype, spec=_adapter_spec,
                    format: str = "fastadapters") -> list[str]:
    """Save ``count`` adapters ``a0..`` (``spec(i)``) with small random weights in ``format``;
    returns their directories."""
    import fastadapters as fa
    from fastadapters.patching import _wrappers

    model = _load(model_spec, device, dtype)
    paths = []
    g = torch.Generator().manual_seed(count)
    for i in range(count):
        name = f"a{i}"
        fa.patch(model, name=name, **spec(i))
        with torch.no_grad():
            for _, w in _wrappers(model):
                for container in (w.lora_A, w.lora_B, w.adapter_down, w.adapter_up):
                    if name in container:
                        p = container[name].weight
                        p.copy_(torch.randn(p.shape, generator=g).to(p) * 0.02)
        paths.append(fa.save_adapter(model, os.path.join(folder, name), name=name, format=format))
        fa.delete_adapter(model, name)
    return paths


def _zipf(count: int, n: int, rng: random.Random) -> list[int]:
    weights = [1.0 / (i + 1) for i in range(count)]
    return rng.choices(range(count), weights=weights, k=n)


def _pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def _run_engine(engine, prompts, names, max_tokens: int) -> dict:
    from ..serving.sampling import SamplingParams

    stamps: dict[str, list[float]] = {}
    t0 = time.perf_counter()
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    reqs = []
    for p, n in zip(prompts, names):
        req = engine.submit(p, params, adapter=n, on_output=lambda out: stamps.setdefault(out.request_id, []).append(
            time.perf_counter()))
        reqs.append(req)
    engine.run_until_done()
    wall = time.perf_counter() - t0
    ttft = [stamps[r.request_id][0] - t0 for r in reqs]
    tpot = [(stamps[r.request_id][-1] - stamps[r.request_id][0]) / max(len(r.output_ids) - 1, 1) for r in reqs]
    tokens = sum(len(r.output_ids) for r in reqs)
    return {"tokens": tokens, "wall_s": wall, "tok_per_s": tokens / wall, "ttft_p50_ms": _pct(ttft, .5) * 1e3,
            "ttft_p99_ms": _pct(ttft, .99) * 1e3, "tpot_p50_ms": _pct(tpot, .5) * 1e3,
            "tpot_p99_ms": _pct(tpot, .99) * 1e3, "outputs": [r.output_ids for r in reqs]}


def _padded_generate(model, prompts, max_tokens: int, batch: int, device, names=None) -> dict:
    """``model.generate`` over left-padded batches of ``batch`` prompts, greedy, exactly ``max_tokens``
    new tokens each; ``names``: PEFT's ``adapter_names`` per prompt (None: the bare model)."""
    pad = 0
    t0 = time.perf_counter()
    tokens = 0
    with torch.no_grad():
        for s in range(0, len(prompts), batch):
            chunk = prompts[s:s + batch]
            width = max(len(p) for p in chunk)
            ids = torch.tensor([[pad] * (width - len(p)) + p for p in chunk], device=device)
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], device=device)
            extra = {} if names is None else {"adapter_names": names[s:s + batch]}
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_tokens,
                                 min_new_tokens=max_tokens, do_sample=False, pad_token_id=pad, **extra)
            tokens += (out.shape[1] - width) * len(chunk)
    wall = time.perf_counter() - t0
    return {"tokens": tokens, "wall_s": wall, "tok_per_s": tokens / wall}


def _peft_model(model_spec, count, device, dtype):
    """The base model with ``count`` PEFT LoRA adapters ``a0..`` (ranks as ours); None without peft."""
    try:
        import peft
    except ImportError:
        return None
    model = _load(model_spec, device, dtype)
    pm = None
    for i in range(count):
        r = RANKS[i % len(RANKS)]
        cfg = peft.LoraConfig(r=r, lora_alpha=16, target_modules=LORA_TARGETS,
                              init_lora_weights=False)
        if pm is None:
            pm = peft.get_peft_model(model, cfg, adapter_name=f"a{i}")
        else:
            pm.add_adapter(f"a{i}", cfg)
    return pm.eval()


def run_e2e(model_spec: str = "small", adapter_counts=(1, 8, 32), requests: int = 32, max_tokens: int = 16,
            prompt_lens=(8, 64), max_num_seqs: int = 16, device: str | None = None, dtype: str = "float32",
            with_peft: bool = True, parity: int = 8, seed: int = 0, backend: str | None = None,
            with_hf: bool = True, trials: int = 1, vllm_python: str | None = None,
            vllm_cpu_bind: str | None = None) -> dict:
    """``trials`` > 1: each A is measured that many times, the engine, its base-only run, HF's
    generate and PEFT interleaved within each trial (their order rotated from trial to trial) on a
    fresh prompt set and Zipf draw per trial; a row then holds the per-trial records (``trials``), the median of
    each throughput and of each per-trial ratio, and each ratio's range (``ratio_range``). A ratio
    is taken within one trial, so the machine's drift between trials cancels in it.

    ``vllm_python``: also measure vLLM (above); ``vllm_cpu_bind``: its ``VLLM_CPU_OMP_THREADS_BIND``
    (e.g. ``"0"``: one core, as a one-thread engine run), left to vLLM when None."""
    from .harness import environment
    from ..serving.engine import Engine

    if isinstance(trials, bool) or not isinstance(trials, int) or trials < 1:
        raise ValueError(f"trials: got {trials!r}; valid: an integer >= 1")
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dt = getattr(torch, dtype)
    rng = random.Random(seed)
    probe = _load(model_spec, dev, dt)
    vocab = probe.get_input_embeddings().weight.shape[0]
    shape = {k: getattr(probe.config, k, None) for k in ("hidden_size", "num_hidden_layers", "vocab_size")}
    del probe

    def draw(r: random.Random) -> list[list[int]]:
        return [[r.randrange(3, vocab) for _ in range(r.randint(*prompt_lens))] for _ in range(requests)]

    if not (len(prompt_lens) == 2 and all(isinstance(v, int) and not isinstance(v, bool) for v in prompt_lens)
            and 1 <= prompt_lens[0] <= prompt_lens[1]):
        raise ValueError(f"prompt_lens: got {prompt_lens!r}; valid: (low, high) integers with 1 <= low <= high")
    model_len = max(512, prompt_lens[1] + max_tokens)  # the engine's and vLLM's max_model_len
    prompt_sets = [draw(rng) for _ in range(trials)]  # trial t's prompts, the same for every A
    warm = draw(random.Random(seed + 1))[:2]  # warm-up prompts of their own: no prefix-cache hit in a trial
    rows = []
    vllm_runs = []  # per row: its first trial's prompts, draw and engine runs (what vLLM is run on)
    hf_runs = []  # every HF generate run, all rows and trials
    # the base model through transformers' own batched generate: the engine's yardstick, run inside
    # each trial beside the engine so that the ratio compares runs made minutes apart at most
    hf_model = _load(model_spec, dev, dt) if with_hf else None
    with tempfile.TemporaryDirectory() as tmp:
        paths = _write_adapters(model_spec, max(adapter_counts), tmp, dev, dt)
        for count in adapter_counts:
            engine = Engine(_load(model_spec, dev, dt), max_num_seqs=max_num_seqs, max_model_len=model_len,
                            backend=backend)
            for i in range(count):
                engine.load_adapter(f"a{i}", paths[i], confined=False)
            peft_model = _peft_model(model_spec, count, dev, dt) if with_peft else None
            _run_engine(engine, warm, [f"a{i % count}" for i in range(len(warm))], 2)  # warm-up
            per_trial = []
            first_outputs = None
            for t, prompts in enumerate(prompt_sets):
                picks = _zipf(count, requests, rng)
                names = [f"a{i}" for i in picks]
                jobs = [("mixed", lambda: _run_engine(engine, prompts, names, max_tokens)),
                        ("base", lambda: _run_engine(engine, prompts, [None] * requests, max_tokens))]
                if hf_model is not None:
                    jobs.append(("hf", lambda: _padded_generate(hf_model, prompts, max_tokens, max_num_seqs, dev)))
                if peft_model is not None:
                    jobs.append(("peft", lambda: _padded_generate(peft_model, prompts, max_tokens, max_num_seqs, dev,
                                                                  names=names)))
                jobs = jobs[t % len(jobs):] + jobs[:t % len(jobs)]  # rotated: no system always runs first
                got = {key: job() for key, job in jobs}
                mixed, base = got["mixed"], got["base"]
                if first_outputs is None:
                    first_outputs = (prompts, names, mixed["outputs"])
                    vllm_runs.append({"A": count, "prompts": prompts, "names": names, "engine": _strip(mixed),
                                      "base_only": _strip(base), "base_outputs": base["outputs"]})
                rec = {"distinct_adapters_used": len(set(picks)), "engine": _strip(mixed), "base_only": _strip(base),
                       "ratio_vs_base_only": mixed["tok_per_s"] / base["tok_per_s"]}
                if "hf" in got:
                    hf_runs.append(got["hf"])
                    rec["hf_generate"] = got["hf"]
                    rec["base_only_over_hf"] = base["tok_per_s"] / got["hf"]["tok_per_s"]
                if "peft" in got:
                    rec["peft_padded_generate"] = got["peft"]
                    rec["engine_over_peft"] = mixed["tok_per_s"] / got["peft"]["tok_per_s"]
                per_trial.append(rec)
            row = {"A": count, "requests": requests, "max_tokens": max_tokens, **_combine(per_trial)}
            if trials > 1:
                row["trials"] = per_trial
            if parity:  # greedy parity with generate alone, first `parity` requests of the first trial
                import fastadapters as fa

                diverged = 0
                for p, n, out in list(zip(*first_outputs))[:parity]:
                    fa.set_adapter(engine.model, engine.registry.entries[n].internal)
                    ref = engine.model.generate(torch.tensor([p], device=dev), max_new_tokens=max_tokens,
                                                min_new_tokens=max_tokens, do_sample=False)[0, len(p):].tolist()
                    diverged += ref != out
                row["parity_checked"], row["parity_diverged"] = min(parity, requests), diverged
            rows.append(row)
            engine = peft_model = None  # freed before the next A loads its own
        hf_model = None
        vllm = vllm_error = None
        if vllm_python:
            try:
                vllm = _run_vllm(vllm_python, vllm_cpu_bind, model_spec, dtype, max(adapter_counts), vllm_runs,
                                 max_tokens, max_num_seqs, tmp, model_len)
            except (RuntimeError, OSError, subprocess.TimeoutExpired) as e:  # the rest of the record stands
                vllm_error = f"{type(e).__name__}: {e}"
                warnings.warn(f"serving_e2e: the vLLM runs failed; the record has no vLLM numbers ({vllm_error})",
                              RuntimeWarning, stacklevel=2)
    for row, run in zip(rows, vllm_runs if vllm else []):
        got = vllm["runs"][f"A{row['A']}"]
        row["vllm"] = _strip(got)
        row["engine_over_vllm"] = run["engine"]["tok_per_s"] / got["tok_per_s"]  # the same prompts and draw
    hf = _combine_runs(hf_runs) if hf_runs else None
    out = {"benchmark": "serving_e2e", "env": environment(dev), "model": model_spec, "model_shape": shape,
           "dtype": dtype, "requests": requests, "max_tokens": max_tokens,
           "max_num_seqs": max_num_seqs, "prompt_lens": list(prompt_lens), "backend": backend or "auto",
           "hf_generate": hf, "rows": rows}
    if vllm_error:
        out["vllm"] = {"error": vllm_error}
    if vllm:
        base = vllm["runs"]["base"]
        first = vllm_runs[0]
        out["vllm"] = {"version": vllm["vllm"], "cpu_bind": vllm_cpu_bind, "base_only": _strip(base),
                       "engine_base_only": first["base_only"],
                       "engine_base_over_vllm_base": first["base_only"]["tok_per_s"] / base["tok_per_s"],
                       "vllm_base_greedy_equal": sum(a == b for a, b in zip(base["outputs"], first["base_outputs"])),
                       "requests": len(first["prompts"])}
    if trials > 1:
        out["trials"] = trials
    return out


_RATIOS = ("ratio_vs_base_only", "base_only_over_hf", "engine_over_peft")


def _run_vllm(python: str, cpu_bind: str | None, model_spec: str, dtype: str, count: int, runs: list[dict],
              max_tokens: int, max_num_seqs: int, tmp: str, max_model_len: int = 512) -> dict:
    """vLLM's offline engine on ``runs`` (one per row) plus the base model, in ``python`` (a
    subprocess running vllm_offline.py from a copy in ``tmp``: run from the package folder, its
    ``kernels.py`` would shadow a module of that name vLLM imports). Raises with the log's tail if
    it fails."""
    import json
    import shutil

    work = os.path.join(tmp, "vllm")
    os.makedirs(work, exist_ok=True)
    model_dir = model_spec
    if model_spec == "small":  # a folder vLLM can load (no tokenizer: the worker passes token ids)
        model_dir = os.path.join(work, "small")
        _small_model(torch.device("cpu"), getattr(torch, dtype)).save_pretrained(model_dir)
    paths = _write_adapters(model_spec, count, os.path.join(work, "adapters"), torch.device("cpu"),
                            getattr(torch, dtype), spec=_lora_spec, format="peft")
    adapters = {f"a{i}": p for i, p in enumerate(paths)}
    job = {"model": model_dir, "dtype": dtype, "max_model_len": max_model_len, "max_num_seqs": max_num_seqs,
           "max_lora_rank": max(RANKS[i % len(RANKS)] for i in range(count)), "adapters": adapters,
           "runs": [{"key": "base", "prompts": runs[0]["prompts"], "names": [None] * len(runs[0]["prompts"]),
                     "max_tokens": max_tokens}]
           + [{"key": f"A{r['A']}", "prompts": r["prompts"], "names": r["names"], "max_tokens": max_tokens}
              for r in runs]}
    script = shutil.copy(os.path.join(os.path.dirname(os.path.abspath(__file__)), "vllm_offline.py"), work)
    job_path, out_path, log_path = (os.path.join(work, n) for n in ("job.json", "out.json", "vllm.log"))
    with open(job_path, "w") as f:
        json.dump(job, f)
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE=os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2"))
    if cpu_bind is not None:
        env["VLLM_CPU_OMP_THREADS_BIND"] = cpu_bind
    with open(log_path, "w") as log:
        proc = subprocess.run([python, script, job_path, out_path], stdout=log, stderr=subprocess.STDOUT, env=env,
                              cwd=work, timeout=3600)
    if proc.returncode != 0 or not os.path.exists(out_path):
        with open(log_path, errors="replace") as f:
            tail = f.read()[-3000:]
        raise RuntimeError(f"serving_e2e: vLLM ({python}) exited with {proc.returncode}; the end of its log:\n{tail}")
    with open(out_path) as f:
        return json.load(f)


def _combine_runs(runs: list[dict]) -> dict:
    """One run's record (a single run: itself); several: the median of each number."""
    if len(runs) == 1:
        return runs[0]
    return {k: statistics.median(r[k] for r in runs) for k in runs[0]}


def _combine(per_trial: list[dict]) -> dict:
    """A row's numbers from its trials: each throughput record and each ratio the median over the
    trials (a ratio is the median of the per-trial ratios, not a ratio of medians); with several
    trials also each ratio's [min, max]."""
    if len(per_trial) == 1:
        return dict(per_trial[0])
    row = {"distinct_adapters_used": int(statistics.median(r["distinct_adapters_used"] for r in per_trial))}
    for key in ("engine", "base_only", "hf_generate", "peft_padded_generate"):
        if key in per_trial[0]:
            row[key] = _combine_runs([r[key] for r in per_trial])
    spread = {}
    for key in _RATIOS:
        if key in per_trial[0]:
            stats = ratio_stats([r[key] for r in per_trial])
            row[key] = stats["median"]
            spread[key] = [stats["low"], stats["high"]]
    row["ratio_range"] = spread
    return row


def _strip(run: dict) -> dict:
    return {k: v for k, v in run.items() if k != "outputs"}


def render_e2e(result: dict) -> str:
    env = result["env"]
    shape = result.get("model_shape")  # older records lack it
    model = result["model"] + (" random Llama" if result["model"] == "small" else "")
    model += (f" (hidden {shape['hidden_size']}, {shape['num_hidden_layers']} layers, "
              f"vocab {shape['vocab_size']})" if shape else "")
    load = (f"{result['requests']} requests x {result['max_tokens']} new tokens, " if "requests" in result else "")
    lines = [f"serving end to end: {model}, {result['dtype']}, {load}max_num_seqs {result['max_num_seqs']}, "
             f"prompts {result['prompt_lens'][0]}-{result['prompt_lens'][1]} tokens, on {env['device']} "
             f"({env.get('device_type', '?')}, {env['threads']} threads)", "",
             "| A | adapters used | engine tok/s | base-only tok/s | ratio | base-only/HF generate "
             "| TTFT p50/p99 ms | TPOT p50/p99 ms | PEFT padded tok/s | engine/PEFT | greedy diverged |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    hf = result.get("hf_generate")  # older records lack it
    if hf:
        lines.insert(1, f"HF batched generate of the base model (padded batches of {result['max_num_seqs']}): "
                        f"{hf['tok_per_s']:.1f} tok/s")
    trials = result.get("trials", 1)
    if trials > 1:
        lines.insert(1, f"median of {trials} trials (engine, base-only, HF generate and PEFT interleaved in each, "
                        "order rotated; fresh prompts and Zipf draw per trial); a ratio is the median of the "
                        "per-trial ratios, its range in brackets")

    def ratio(r, key):
        lo_hi = r.get("ratio_range", {}).get(key)
        return f"{r[key]:.2f}" + (f" ({lo_hi[0]:.2f}-{lo_hi[1]:.2f})" if lo_hi else "")

    for r in result["rows"]:
        e, peft = r["engine"], r.get("peft_padded_generate")
        peft_cells = f"{peft['tok_per_s']:.1f} | {ratio(r, 'engine_over_peft')}" if peft else "- | -"
        hf_cell = ratio(r, "base_only_over_hf") if "base_only_over_hf" in r else "-"
        lines.append(f"| {r['A']} | {r['distinct_adapters_used']} | {e['tok_per_s']:.1f} | "
                     f"{r['base_only']['tok_per_s']:.1f} | {ratio(r, 'ratio_vs_base_only')} | {hf_cell} | "
                     f"{e['ttft_p50_ms']:.0f}/{e['ttft_p99_ms']:.0f} | {e['tpot_p50_ms']:.0f}/{e['tpot_p99_ms']:.0f} | "
                     f"{peft_cells} | {r.get('parity_diverged', '-')}/{r.get('parity_checked', '-')} |")
    v = result.get("vllm")
    if v and "error" in v:
        lines += ["", f"vLLM: not measured ({v['error']})"]
    elif v:
        bind = f"VLLM_CPU_OMP_THREADS_BIND={v['cpu_bind']}" if v.get("cpu_bind") else "its default threads"
        lines += ["", f"vLLM {v['version']} offline engine ({bind}), each row's first-trial prompts and adapter draw, "
                      "one run each; its adapters are all LoRA of the same ranks (it serves no bottleneck adapters):",
                  f"base model: vLLM {v['base_only']['tok_per_s']:.1f} tok/s, the engine's base-only run on the same "
                  f"prompts {v['engine_base_only']['tok_per_s']:.1f} (engine/vLLM "
                  f"{v['engine_base_over_vllm_base']:.2f}); greedy answers equal {v['vllm_base_greedy_equal']}/"
                  f"{v['requests']}", "",
                  "| A | vLLM tok/s | vLLM / its base | engine tok/s (same prompts) | engine/vLLM |", "|---|---|---|---|---|"]
        for r in result["rows"]:
            if "vllm" in r:
                eng = r["vllm"]["tok_per_s"] * r["engine_over_vllm"]
                lines.append(f"| {r['A']} | {r['vllm']['tok_per_s']:.1f} | "
                             f"{r['vllm']['tok_per_s'] / v['base_only']['tok_per_s']:.2f} | {eng:.1f} | "
                             f"{r['engine_over_vllm']:.2f} |")
    return "\n".join(lines)


def summary(result: dict) -> dict:
    """The table's headline: the engine's output tokens/s over PEFT's padded ``generate`` at the
    largest adapter count."""
    from .harness import summary_line

    rows = [r for r in result["rows"] if "engine_over_peft" in r]
    row = max(rows, key=lambda r: r["A"], default=None)
    value = row["engine_over_peft"] if row else None
    note = f"A={row['A']}, ratio to base-only {row['ratio_vs_base_only']:.2f}" if row else "PEFT not installed"
    if row and "base_only_over_hf" in row:
        note += f", engine base-only / HF batched generate {row['base_only_over_hf']:.2f}"
    if result.get("env", {}).get("device_type") == "cpu":
        note += ("; on a CPU at this toy size (hidden 256) per-step host work weighs more than on a real model: "
                 "bench/serving_e2e.py --model <folder> measures a real one")
    # several trials: noise when the per-trial ratios spread wider than the effect (harness.ratio_stats)
    noisy = ratio_stats([t["engine_over_peft"] for t in row["trials"]])["noisy"] if row and "trials" in row else None
    return summary_line("end-to-end", "engine / PEFT generate tokens/s", value, "x", "above", 1.0,
                        "above 1: the engine serves more tokens/s", noisy, note=note)
