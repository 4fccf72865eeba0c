"""The engine's numbers in bfloat16 and float32 against a float64 reference.

A batch of every adapter type (the zoo of ``helpers``) and the base model, prompts of odd lengths,
short-context decode rows batched and longer ones on the per-request path: each request's greedy
tokens are scored by the engine (its log-probability of each token it chose) and, teacher-forced,
by the same model alone in float64 and in the engine's dtype through plain transformers. The
engine's error against float64 may be at most twice the plain model's in the same dtype (plus a
floor of about one ulp of a log-probability, where the plain model happens to be almost exact).
"""
from __future__ import annotations

import copy

import pytest
import torch

import fastadapters as fa
from fastadapters.serving.engine import Engine
from fastadapters.serving.sampling import SamplingParams

from .helpers import ZOO, add_zoo, tiny_llama

FLOOR = {torch.float32: 2e-7, torch.bfloat16: 2 ** -10}  # about one ulp of a log-probability near -4


def _scores(model, seq: list[int], start: int, name) -> torch.Tensor:
    """log p(seq[t] | seq[:t]) for t >= start, by ``model`` alone with adapter ``name``."""
    fa.set_adapter(model, name)
    with torch.no_grad():
        logits = model(torch.tensor([seq])).logits[0, start - 1:-1].double()
    return logits.log_softmax(-1).gather(1, torch.tensor(seq[start:])[:, None])[:, 0]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_engine_errs_at_most_twice_the_plain_model_in_its_dtype(dtype, tmp_path):
    zoo = add_zoo(tiny_llama(hidden=64, layers=3))
    paths = {n: fa.save_adapter(zoo, str(tmp_path / n), name=n) for n in ZOO}
    ref = copy.deepcopy(zoo).double()
    plain = copy.deepcopy(zoo).to(dtype)
    engine = Engine(tiny_llama(hidden=64, layers=3).to(dtype), max_num_seqs=16, max_model_len=128,
                    decode_batch_max_len=24)  # (the default backend: the C++ kernel on the CPU)
    for n, path in paths.items():
        engine.load_adapter(n, path, confined=False)
    g = torch.Generator().manual_seed(0)
    names = [None] + ZOO
    prompts = [torch.randint(2, 64, (n,), generator=g).tolist() for n in (3, 17, 5, 30, 9, 41, 1, 22, 13)]
    params = SamplingParams(max_tokens=9, temperature=0, ignore_eos=True, logprobs=1)
    reqs = [engine.submit(p, params, adapter=n) for p, n in zip(prompts, names)]
    engine.run_until_done()
    mine, theirs = [], []  # per token: |engine - float64|, |plain - float64|
    for p, n, r in zip(prompts, names, reqs):
        assert len(r.output_ids) == 9, r.finish_reason
        got = torch.tensor([lp[1] for lp in r.metadata["logprobs"]], dtype=torch.float64)
        seq = p + r.output_ids
        exact = _scores(ref, seq, len(p), n)
        mine.append((got - exact).abs())
        theirs.append((_scores(plain, seq, len(p), n) - exact).abs())
    mine, theirs = torch.cat(mine), torch.cat(theirs)
    for stat in (torch.max, torch.mean):  # the worst token and the typical one
        assert stat(mine) <= 2 * stat(theirs) + FLOOR[dtype], (stat.__name__, stat(mine), stat(theirs))
