"""Which models the engine serves (``hf_compat.check_model``): a model whose forward does more to
its logits than the plain linear LM head the engine runs is refused, not served with other numbers."""
from __future__ import annotations

import pytest
import torch

from fastadapters.serving.engine import Engine
from fastadapters.serving.sampling import SamplingParams
from .serve_helpers import one_thread  # noqa: F401 - fixture (autouse)


def _granite(logits_scaling: float):
    from transformers import GraniteConfig, GraniteForCausalLM

    cfg = GraniteConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, max_position_embeddings=64, logits_scaling=logits_scaling,
                        pad_token_id=0, bos_token_id=1, eos_token_id=None)
    torch.manual_seed(0)
    return GraniteForCausalLM(cfg).eval()


def test_granite_logits_scaling_is_refused_not_skipped():
    """Granite divides its logits by ``logits_scaling`` (8-16 in released checkpoints); the engine's
    head did not, so every temperature draw and log-probability came from logits 8x too sharp."""
    with pytest.raises(ValueError, match="logits_scaling"):
        Engine(_granite(8.0), backend="torch", max_num_seqs=2)
    # at 1.0 it is a plain head: served, with the model's own log-probabilities
    model = _granite(1.0)
    p = [5, 9, 13, 22, 7]
    req = Engine(model, backend="torch", max_num_seqs=2).generate(
        [p], SamplingParams(max_tokens=1, temperature=0, logprobs=1))[0]
    with torch.no_grad():
        ref = torch.log_softmax(model(torch.tensor([p])).logits[0, -1].float(), -1)
    token, logprob = req.metadata["logprobs"][0][:2]
    assert token == int(ref.argmax()) and logprob == pytest.approx(float(ref.max()), abs=1e-4)
