"""Per-request sampling: greedy, temperature, top-k, top-p, seeded, and stop conditions.

    params = SamplingParams(max_tokens=16, temperature=0.7, top_p=0.9, top_k=40, seed=1, stop=["\\n\\n"])
    params.validate(vocab_size=...)                 # ValueError naming the bad field and what is valid
    token = sample_next(logits_row, params, generator)

``temperature < 1e-5`` is greedy (argmax, as ``generate(do_sample=False)``; vLLM's rule: dividing
by a tinier temperature overflows to inf/NaN). Otherwise the logits are
divided by the temperature, filtered to the ``top_k`` largest and then to the smallest set whose
probability reaches ``top_p`` (the most likely token always kept), and one token is drawn with the
request's own ``torch.Generator``: seeded from ``seed`` when given, so the same request reproduces
its tokens whatever else is batched with it.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

__all__ = ["SamplingParams", "sample_next", "sample_rows", "make_generator", "GREEDY_BELOW", "is_greedy"]

GREEDY_BELOW = 1e-5  # temperatures below this are greedy (vLLM's _SAMPLING_EPS)


def is_greedy(params: "SamplingParams") -> bool:
    return params.temperature < GREEDY_BELOW


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: no top-k filter
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False

    def validate(self) -> None:
        def bad(name, value, valid):
            raise ValueError(f"{name}: got {value!r}; valid: {valid}")

        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            bad("max_tokens", self.max_tokens, "an integer >= 1")
        if isinstance(self.temperature, bool) or not isinstance(self.temperature, (int, float)) \
                or not 0 <= self.temperature <= 100:
            bad("temperature", self.temperature, "a number in [0, 100] (0: greedy)")
        if isinstance(self.top_p, bool) or not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            bad("top_p", self.top_p, "a number in (0, 1]")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < -1:
            bad("top_k", self.top_k, "an integer >= 1, or 0 / -1 for no limit")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            bad("seed", self.seed, "an integer or null")
        if not isinstance(self.stop, list) or not all(isinstance(s, str) and s for s in self.stop):
            bad("stop", self.stop, "a list of non-empty strings")


def make_generator(params: SamplingParams, device: torch.device | str = "cpu") -> torch.Generator | None:
    """The request's generator (on ``device``, where its logits are): seeded from ``params.seed``,
    else from torch's global RNG; None if greedy."""
    if is_greedy(params):
        return None
    g = torch.Generator(device=device)
    if params.seed is not None:
        g.manual_seed(params.seed & 0xFFFF_FFFF_FFFF_FFFF)
    else:
        g.manual_seed(int(torch.randint(0, 2**62, (1,)).item()))
    return g


def sample_next(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """One token id from a (vocab,) row of logits (see the module docstring)."""
    if is_greedy(params):
        return int(torch.argmax(logits).item())
    return int(_draw(logits.detach().float(), params, generator).item())


def _draw(x: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> torch.Tensor:
    """One token id (a 1-element tensor on ``x``'s device) from a (vocab,) float row."""
    x = x / float(params.temperature)
    if params.top_k and params.top_k > 0 and params.top_k < x.numel():
        kth = torch.topk(x, params.top_k).values[-1]
        x = x.masked_fill(x < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_x, order = torch.sort(x, descending=True)
        probs = torch.softmax(sorted_x, dim=-1)
        before = torch.cumsum(probs, dim=-1) - probs  # mass of the tokens ranked above each one
        drop = before >= params.top_p
        drop[0] = False
        x = x.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    probs = torch.softmax(x, dim=-1)
    return torch.multinomial(probs, 1, generator=generator)


def sample_rows(logits: torch.Tensor, params: list[SamplingParams],
                generators: list[torch.Generator | None]) -> tuple[list[int], list[str | None]]:
    """Tokens for every row of ``logits`` (R, V), and per row None or an error message (see the
    module docstring). One device-to-host copy for the whole step."""
    # a row with NaN or +inf, or with no finite logit at all (every token -inf), has no token to give
    # one pass: a row's max is NaN if any logit is NaN, +inf if any is +inf, -inf if all are -inf
    bad = ~torch.isfinite(logits.amax(-1))
    tokens = logits.argmax(-1)
    errors: list[str | None] = [None] * len(params)
    sampled = [j for j, p in enumerate(params) if not is_greedy(p)]
    if sampled:
        # a bad row never reaches the draw (on CUDA, multinomial over NaN probabilities is a device-side
        # assert that poisons every later step of every request); it is reported below instead
        rows = torch.where(bad[:, None], torch.zeros((), dtype=torch.float32, device=logits.device), logits.float())
        for j in sampled:
            try:
                tokens[j] = _draw(rows[j], params[j], generators[j])[0]
            except Exception as e:  # one request's failure (e.g. NaN probabilities) is its own
                errors[j] = f"sampling failed: {type(e).__name__}: {e}"
    host = torch.stack([tokens, bad.to(tokens.dtype)]).tolist()  # the step's one device-to-host copy
    for j, flag in enumerate(host[1]):
        if flag:
            errors[j] = "the model produced non-finite logits (NaN or inf) for this request"
    return host[0], errors
