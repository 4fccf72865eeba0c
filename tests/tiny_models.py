"""Tiny causal-LM models of every supported architecture, built from configs in code (test helpers).

Nothing is downloaded: each family gets a config with hidden size 32, 2 layers and a 64-token
vocabulary, and random weights from a fixed seed. ``tiny_model(arch)`` builds a fresh model in
eval mode (fp32); ``ARCHS`` lists the families. Token ids: pad 0, bos 1, no eos (so generation
always runs the requested number of steps). Imported by tests as ``from tiny_models import ...``
(not from conftest: sub-directory conftests replace the ``conftest`` module during collection).
"""
from __future__ import annotations

import torch

ARCHS = ("llama", "mistral", "qwen2", "opt", "bloom", "gptj", "gpt2", "gpt_neox")
VOCAB = 64
HIDDEN = 32
LAYERS = 2
HEADS = 4
_TOKENS = dict(pad_token_id=0, bos_token_id=1, eos_token_id=None)


def tiny_config(arch: str):
    import transformers as T

    if arch in ("llama", "mistral", "qwen2"):
        cls = {"llama": T.LlamaConfig, "mistral": T.MistralConfig, "qwen2": T.Qwen2Config}[arch]
        extra = {"sliding_window": None} if arch == "mistral" else {}
        return cls(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=48, num_hidden_layers=LAYERS,
                   num_attention_heads=HEADS, num_key_value_heads=2, max_position_embeddings=128,
                   **extra, **_TOKENS)
    if arch == "opt":
        return T.OPTConfig(vocab_size=VOCAB, hidden_size=HIDDEN, ffn_dim=48, num_hidden_layers=LAYERS,
                           num_attention_heads=HEADS, max_position_embeddings=128,
                           word_embed_proj_dim=HIDDEN, **_TOKENS)
    if arch == "bloom":
        return T.BloomConfig(vocab_size=VOCAB, hidden_size=HIDDEN, n_layer=LAYERS, n_head=HEADS, **_TOKENS)
    if arch == "gptj":
        return T.GPTJConfig(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, rotary_dim=4,
                            n_positions=128, **_TOKENS)
    if arch == "gpt2":
        return T.GPT2Config(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, n_positions=128,
                            **_TOKENS)
    if arch == "gpt_neox":
        return T.GPTNeoXConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=48,
                               num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                               max_position_embeddings=128, **_TOKENS)
    raise KeyError(arch)


def tiny_model(arch: str, seed: int = 0):
    """A fresh tiny causal LM of family ``arch`` with seeded random weights, in eval mode."""
    import transformers as T

    torch.manual_seed(seed)
    model = T.AutoModelForCausalLM.from_config(tiny_config(arch))
    if arch in ("opt", "bloom", "gpt2", "gptj", "gpt_neox"):
        # some families initialise biases / layer norms to constants: randomise the biases so a
        # dropped bias or a wrong placement shows in the outputs
        g = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n.endswith("bias"):
                    p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    return model.eval()


def snapshot(model) -> dict[str, torch.Tensor]:
    """A detached copy of the state dict (for bit-for-bit comparisons)."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_state_identical(a: dict, b: dict) -> None:
    assert list(a) == list(b), f"keys differ: {sorted(set(a) ^ set(b))[:10]}"
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert torch.equal(a[k], b[k]), f"{k} changed"


def input_ids(batch: int = 2, length: int = 7, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, length), generator=g)
