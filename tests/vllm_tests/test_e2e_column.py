"""The vLLM column of the end-to-end serving benchmark (issue 19's "Measure": vLLM serving the same
model and LoRA adapters in the same run, where it is installed): ``run_e2e(..., vllm_python=...)``
runs vLLM's offline engine in that Python on each row's first-trial prompts and adapter draw, and on
the base model. On the random "small" Llama in fp32, vLLM's greedy base-model answers must equal the
engine's (the same model, prompts and dtype: a check that the two ran the same workload), every vLLM
run makes every requested token, and the ratios are the engine's numbers over vLLM's. Measures no
speed."""
from __future__ import annotations

import sys

from fastadapters.bench import e2e as e2e_bench


def test_vllm_column_same_workload():
    res = e2e_bench.run_e2e("small", adapter_counts=(1, 3), requests=4, max_tokens=3, prompt_lens=(5, 9),
                            max_num_seqs=4, parity=0, with_peft=False, with_hf=False, vllm_python=sys.executable,
                            vllm_cpu_bind=None)
    v = res["vllm"]
    assert "error" not in v, v.get("error")
    assert v["requests"] == 4 and v["base_only"]["tokens"] == 4 * 3
    assert v["vllm_base_greedy_equal"] == 4
    assert v["engine_base_over_vllm_base"] == v["engine_base_only"]["tok_per_s"] / v["base_only"]["tok_per_s"]
    for row in res["rows"]:
        assert row["vllm"]["tokens"] == 4 * 3
        assert row["engine_over_vllm"] == row["trials"][0]["engine"]["tok_per_s"] / row["vllm"]["tok_per_s"] \
            if "trials" in row else row["engine_over_vllm"] == row["engine"]["tok_per_s"] / row["vllm"]["tok_per_s"]
    text = e2e_bench.render_e2e(res)
    assert "vLLM" in text and "greedy answers equal 4/4" in text
