"""Per-request sampling: greedy, temperature, top-k, top-p, min-p, seeded, logits processors, stops.

    params = SamplingParams(max_tokens=16, temperature=0.7, top_p=0.9, top_k=40, seed=1, stop=["\\n\\n"])
    params.validate(vocab_size=...)                 # ValueError naming the bad field and what is valid
    token = sample_next(logits_row, params, generator)

``temperature < 1e-5`` is greedy (argmax, as ``generate(do_sample=False)``; vLLM's rule: dividing
by a tinier temperature overflows to inf/NaN). Otherwise the logits are
divided by the temperature, filtered to the ``top_k`` largest and then to the smallest set whose
probability reaches ``top_p`` (the most likely token always kept), and one token is drawn with the
request's own ``torch.Generator``: seeded from ``seed`` when given, so the same request reproduces
its tokens whatever else is batched with it. ``min_p`` (vLLM's) drops, after the temperature and
before top-k, the tokens whose probability is below ``min_p`` times the most likely one's.

Logits processors, applied to a request's row before greedy or sampled choice (``process_rows``),
with OpenAI's and vLLM's meanings and in vLLM's order:

  allowed_token_ids  (vLLM) every other token's logit set to -inf
  bad_words_ids      (vLLM's bad_words, tokenised) a word's last token set to -inf where the output
                     so far ends with the word's other tokens (a one-token word: always)
  logit_bias         {token id: bias in [-100, 100]} added to those logits
  min_tokens         until the output has this many tokens, EOS and ``stop_token_ids`` get -inf
  repetition_penalty (vLLM / CTRL) every token of the prompt or the output so far: a positive logit
                     divided by it, a negative one multiplied (1: off)
  frequency_penalty  subtracted once per time the token occurs in the output so far, in [-2, 2]
  presence_penalty   subtracted once if the token occurs in the output so far, in [-2, 2]

The token history they need is kept per request (``LogitsState``: counts over the vocabulary on
the logits' device), brought up to date with only the tokens added since the last step, so the
work per token does not grow with the output's length. Requests that use none of them cost
nothing. ``stop_token_ids``: generating one of these ends the request (reason "stop"), and like
EOS its text is left out of the output text (the token stays in the output ids).

``logprobs = k`` (``token_logprobs``): each generated token's log-probability and the k most likely
tokens with theirs, from the model's raw logits (before processors and temperature: vLLM's default),
computed in fp32 on the device for those rows only; a log-probability of -inf (or NaN, from
non-finite logits) is reported as -9999.0 (JSON has no infinity; vLLM's choice).
``structured``: a ``structured.StructuredSpec`` the output must match; the engine masks the row by
its grammar after the processors (``structured.mask_rows``). ``min_tokens`` with one is refused.
``prompt_logprobs = k``: the same for each prompt token after the first, and with ``prompt_ranks``
the token's rank in the vocabulary (how many tokens have a log-probability at least as large as its
own: vLLM's count; a compare over the vocabulary per position, ~46 ms a 256-token chunk of
SmolLM2's on one CPU core, so only when asked) (the engine runs the LM head on the request's prompt positions; such a request computes its whole
prompt, bypassing the prefix cache).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .structured import StructuredSpec

__all__ = ["SamplingParams", "sample_next", "sample_rows", "make_generator", "GREEDY_BELOW", "is_greedy",
           "LogitsState", "process_rows", "token_logprobs"]

NO_TOKEN = "no token can be chosen next"  # how an error that leaves a row no token begins (HTTP: a 400)
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
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    min_tokens: int = 0
    stop_token_ids: list[int] = field(default_factory=list)
    allowed_token_ids: list[int] | None = None  # only these may be generated (vLLM's); None: any
    # (vLLM's bad_words, tokenised) a sequence's last token is banned where the output ends with the rest
    bad_words_ids: list[list[int]] = field(default_factory=list)
    logprobs: int | None = None  # None: none; k >= 0: each token's log-probability and the top k
    prompt_logprobs: int | None = None  # the same for every prompt token after the first
    prompt_ranks: bool = False  # with prompt_logprobs: also each prompt token's rank (vLLM's prompt_logprobs)
    structured: StructuredSpec | None = None  # the output must match this (structured.py); None: free
    include_stop_str_in_output: bool = False  # (vLLM's) the text ends after the stop string that ended it
    skip_special_tokens: bool = True  # (vLLM's) special tokens' text left out of the output text

    MAX_LOGIT_BIAS = 1024  # entries
    MAX_STOP_TOKEN_IDS = 64
    MAX_LOGPROBS = 20  # OpenAI's and vLLM's limit on top_logprobs
    MAX_ALLOWED = 1 << 16  # allowed_token_ids entries
    MAX_BAD_WORDS = 256  # bad_words_ids sequences (of at most MAX_BAD_WORD_TOKENS each)
    MAX_BAD_WORD_TOKENS = 128

    @property
    def processed(self) -> bool:
        """Does this request's row go through a logits processor (``process_rows``)?"""
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0
                    or self.logit_bias or self.min_tokens or self.allowed_token_ids is not None
                    or self.bad_words_ids)

    def validate(self, vocab_size: int | None = None) -> None:
        """ValueError naming the first bad field and what is valid; token ids are checked against
        ``vocab_size`` when it is given."""
        def bad(name, value, valid):
            shown = repr(value)
            raise ValueError(f"{name}: got {shown if len(shown) <= 60 else shown[:60] + '...'}; valid: {valid}")

        def number(value):
            return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)

        def token_id(value):
            return not isinstance(value, bool) and isinstance(value, int) and value >= 0 \
                and (vocab_size is None or value < vocab_size)

        ids = "token ids in [0, vocab size)" if vocab_size is None else f"token ids in [0, {vocab_size})"

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
        if not number(self.min_p) or not 0 <= self.min_p <= 1:
            bad("min_p", self.min_p, "a number in [0, 1] (0: off)")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not number(value) or not -2 <= value <= 2:
                bad(name, value, "a number in [-2, 2] (0: off)")
        if not number(self.repetition_penalty) or not 0 < self.repetition_penalty <= 100:
            bad("repetition_penalty", self.repetition_penalty, "a number in (0, 100] (1: off)")
        if not isinstance(self.logit_bias, dict) or len(self.logit_bias) > self.MAX_LOGIT_BIAS:
            bad("logit_bias", self.logit_bias, f"a map of at most {self.MAX_LOGIT_BIAS} token ids to biases")
        for k, v in self.logit_bias.items():
            if not token_id(k):
                bad("logit_bias", k, f"keys: {ids}")
            if not number(v) or not -100 <= v <= 100:
                bad("logit_bias", v, "biases: numbers in [-100, 100]")
        if isinstance(self.min_tokens, bool) or not isinstance(self.min_tokens, int) \
                or not 0 <= self.min_tokens <= self.max_tokens:
            bad("min_tokens", self.min_tokens, f"an integer in [0, max_tokens = {self.max_tokens}]")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                      or not 0 <= value <= self.MAX_LOGPROBS):
                bad(name, value, f"null, or an integer in [0, {self.MAX_LOGPROBS}] (top log-probabilities per token)")
        allowed = self.allowed_token_ids
        if allowed is not None and (not isinstance(allowed, list) or not allowed or len(allowed) > self.MAX_ALLOWED
                                    or not all(token_id(t) for t in allowed)):
            bad("allowed_token_ids", allowed, f"null, or a non-empty list of at most {self.MAX_ALLOWED} {ids}")
        if not isinstance(self.stop_token_ids, list) or len(self.stop_token_ids) > self.MAX_STOP_TOKEN_IDS \
                or not all(token_id(t) for t in self.stop_token_ids):
            bad("stop_token_ids", self.stop_token_ids, f"a list of at most {self.MAX_STOP_TOKEN_IDS} {ids}")
        bw = self.bad_words_ids
        if not isinstance(bw, list) or len(bw) > self.MAX_BAD_WORDS or not all(
                isinstance(s, list) and 0 < len(s) <= self.MAX_BAD_WORD_TOKENS and all(token_id(t) for t in s)
                for s in bw):
            bad("bad_words_ids", bw, f"a list of at most {self.MAX_BAD_WORDS} non-empty lists of at most "
                f"{self.MAX_BAD_WORD_TOKENS} {ids}")
        for name in ("include_stop_str_in_output", "skip_special_tokens"):
            if not isinstance(getattr(self, name), bool):
                bad(name, getattr(self, name), "true or false")
        if self.structured is not None:
            if not isinstance(self.structured, StructuredSpec):
                bad("structured", self.structured, "null or a StructuredSpec")
            self.structured.validate()
            if self.min_tokens:
                bad("min_tokens", self.min_tokens, "0 with a structured output (the grammar decides where the "
                    "output may end)")


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
    if params.min_p > 0:
        probs = torch.softmax(x, dim=-1)
        x = x.masked_fill(probs < params.min_p * probs.max(), float("-inf"))
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
    top = logits.amax(-1)
    bad = ~torch.isfinite(top)
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
    # the step's one device-to-host copy; flag 2: every logit -inf (what the processors / grammar left out)
    host = torch.stack([tokens, bad.to(tokens.dtype) + (top == float("-inf")).to(tokens.dtype)]).tolist()
    for j, flag in enumerate(host[1]):
        if flag == 2:
            errors[j] = (NO_TOKEN + ": every logit is -inf (allowed_token_ids, logit_bias, bad_words and a "
                         "structured output's grammar together may exclude every token, or the model gave -inf)")
        elif flag:
            errors[j] = "the model produced non-finite logits (NaN or inf) for this request"
    return host[0], errors


class LogitsState:
    """A request's token history for the logits processors: output token counts (presence and
    frequency penalties) and a mask of the prompt's and output's tokens (repetition penalty), on the
    logits' device, brought up to date with only the tokens added since the last ``update``.
    ``banned``: the ids ``min_tokens`` holds back (EOS unless ``ignore_eos``, and ``stop_token_ids``)."""

    def __init__(self, params: SamplingParams, vocab: int, device, eos_ids=()):
        self.params = params
        self.vocab, self.device = vocab, device
        self.counted = 0  # output tokens already in ``counts`` / ``seen``
        self.counts = torch.zeros(vocab, dtype=torch.float32, device=device) \
            if params.presence_penalty or params.frequency_penalty else None
        self.seen = None  # filled with the prompt on the first update
        self.bias_ids = self.bias = self.banned = self.allowed = None
        if params.allowed_token_ids is not None:
            self.allowed = torch.tensor(sorted(set(params.allowed_token_ids)), dtype=torch.long, device=device)
        if params.logit_bias:
            self.bias_ids = torch.tensor(list(params.logit_bias), dtype=torch.long, device=device)
            self.bias = torch.tensor(list(params.logit_bias.values()), dtype=torch.float32, device=device)
        # bad words: single tokens banned always, longer sequences where the output ends with their head
        self.bad_always = sorted({s[0] for s in params.bad_words_ids if len(s) == 1})
        self.bad_seqs = [tuple(s) for s in params.bad_words_ids if len(s) > 1]
        self.tail: list[int] = []  # the output's last tokens, as many as the longest head
        banned = sorted(set(params.stop_token_ids) | (set() if params.ignore_eos else set(eos_ids)))
        if params.min_tokens and banned:
            self.banned = torch.tensor(banned, dtype=torch.long, device=device)

    def update(self, prompt_ids: list[int], output_ids: list[int]) -> None:
        if self.params.repetition_penalty != 1.0 and self.seen is None:
            self.seen = torch.zeros(self.vocab, dtype=torch.bool, device=self.device)
            if prompt_ids:
                self.seen[torch.tensor(prompt_ids, dtype=torch.long, device=self.device)] = True
        new = output_ids[self.counted:]
        if new:
            idx = torch.tensor(new, dtype=torch.long, device=self.device)
            if self.counts is not None:
                self.counts.index_add_(0, idx, torch.ones(len(new), dtype=torch.float32, device=self.device))
            if self.seen is not None:
                self.seen[idx] = True
        self.counted = len(output_ids)
        if self.bad_seqs:
            self.tail = output_ids[-(max(map(len, self.bad_seqs)) - 1):]

    def bad_now(self) -> list[int]:
        """The tokens bad_words ban at this step (vLLM's rule: a word's last token, where the output
        so far ends with the word's other tokens)."""
        ids = set(self.bad_always)
        tail = self.tail
        for s in self.bad_seqs:
            head = s[:-1]
            if len(tail) >= len(head) and tuple(tail[len(tail) - len(head):]) == head:
                ids.add(s[-1])
        return sorted(ids)


def process_rows(logits: torch.Tensor, rows: list[int], states: list[LogitsState],
                 output_lens: list[int]) -> torch.Tensor:
    """``logits`` (R, V) with the processors of row ``rows[i]`` applied from ``states[i]``, whose
    output has ``output_lens[i]`` tokens so far (a new fp32 tensor; the input is not written)."""
    out = logits.float().clone()
    for j, st, n in zip(rows, states, output_lens):
        p = st.params
        row = out[j]
        if st.allowed is not None:  # every other token masked out first (vLLM's order)
            keep = row.index_select(0, st.allowed)
            row.fill_(float("-inf")).index_copy_(0, st.allowed, keep)
        if st.bad_always or st.bad_seqs:
            ban = st.bad_now()
            if ban:
                row.index_fill_(0, torch.tensor(ban, dtype=torch.long, device=row.device), float("-inf"))
        if st.bias is not None:
            row.index_add_(0, st.bias_ids, st.bias)
        if st.banned is not None and n < p.min_tokens:
            row.index_fill_(0, st.banned, float("-inf"))
        if st.seen is not None:
            row.copy_(torch.where(st.seen, torch.where(row > 0, row / p.repetition_penalty,
                                                       row * p.repetition_penalty), row))
        if st.counts is not None:
            row.sub_(st.counts * p.frequency_penalty + (st.counts > 0).to(row.dtype) * p.presence_penalty)
    return out


LOGPROB_FLOOR = -9999.0


def token_logprobs(raw: torch.Tensor, rows: list[int], ks: list[int], tokens: list[int],
                   ranks: bool = False) -> list[tuple]:
    """For row ``rows[i]`` of ``raw`` (R, V) logits, which gave ``tokens[rows[i]]``: (that token's
    log-probability, [(token id, log-probability) of the ``ks[i]`` most likely tokens]), and with
    ``ranks`` its rank as a third item (the number of tokens whose log-probability is at least its
    own: 1 for the most likely; vLLM's count). One device-to-host copy for all rows."""
    dev = raw.device
    lp = torch.log_softmax(raw.index_select(0, torch.tensor(rows, device=dev)).float(), dim=-1)
    chosen = lp.gather(1, torch.tensor([tokens[j] for j in rows], device=dev)[:, None])[:, 0]
    k = min(max(ks), lp.shape[-1])  # (a vocabulary smaller than k: all of it)
    cols = [chosen[:, None]]
    if k:
        top = lp.topk(k, dim=-1)
        cols += [top.values, top.indices.to(lp.dtype)]
    if ranks:  # (float32 holds these counts exactly up to 2**24 tokens)
        cols.append((lp >= chosen[:, None]).sum(-1, dtype=lp.dtype)[:, None])
    host = torch.cat(cols, dim=1).tolist()

    def finite(v):  # -inf (a banned token) and NaN (non-finite logits, e.g. a prompt row) as the floor
        return v if math.isfinite(v) else LOGPROB_FLOOR

    out = []
    for row, ki in zip(host, ks):
        vals, ids = row[1:1 + k], row[1 + k:1 + 2 * k]
        entry = (finite(row[0]), [(int(ids[i]), finite(vals[i])) for i in range(min(ki, k))])
        # (a NaN log-probability compares false: rank 0 there, reported as the vocabulary's size)
        out.append(entry + (int(row[-1]) or lp.shape[-1],) if ranks else entry)
    return out
