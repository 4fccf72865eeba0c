"""Structured output: a request's tokens constrained to a JSON schema, any JSON object, a regular
expression, one of a list of strings, a grammar (xgrammar's EBNF, or Lark's notation) or a structural tag (OpenAI's
``response_format``, vLLM's ``guided_*``, ``structured_outputs`` and structural tags).

    grammars = Grammars(tokenizer, vocab_size, stop_ids)        # one per engine, built on first use
    matcher = grammars.matcher(StructuredSpec("json", schema))  # ValueError names what cannot compile
    x = mask_rows(x, rows, [matcher, ...], aliased=True)       # disallowed tokens -> -inf
    matcher.accept_token(token); matcher.is_terminated()

The grammar engine is xgrammar (the one vLLM and SGLang default to; an optional dependency:
``pip install "fastadapters[structured]"``). It compiles a spec against the tokenizer's vocabulary
once (kept in a bounded LRU cache, so a schema sent by many requests compiles once) and gives each
request a matcher: before every token the matcher fills a bitmask of the tokens the grammar allows
next, and after it the sampled token advances it. The engine applies the masks of a step's
structured rows together, on the logits' device, after the logits processors and before greedy or
sampled choice; log-probabilities stay the raw model's (vLLM's default). When the grammar is
complete only its stop tokens (the model's EOS) are allowed, and accepting one terminates the
matcher: the request ends with finish reason "stop", the EOS's text left out, as any EOS.

The grammar's host work runs in the engine thread, so one request's grammar could slow every
request: an ambiguous EBNF grammar's matcher (an Earley parser) can cost more per token the longer
the output grows (a 28-character grammar reached seconds per token). The engine gives each
structured request a budget per token (``Engine(max_grammar_ms=20)``, ``serve --max-grammar-ms``): a
request whose matcher takes longer for three tokens in a row (one slow token may be a pause of the
thread) ends alone with finish reason "error" saying so.

Compiling is bounded as well: with ``compile_timeout_s`` set (the engine's ``max_grammar_compile_s``,
10 s by default; ``serve --max-grammar-compile-s``) a spec first compiles in a child process that is
killed at the limit (grammar_worker.py), and the request is refused with a ValueError (a 400) that
says so. So is one whose compiled grammar would exceed ``MAX_GRAMMAR_BYTES`` or whose compile needs
more than ``COMPILE_MEMORY_BYTES``. A spec that passed is compiled again here (a cache miss costs
two compiles); the cache of compiled grammars is bounded in bytes as well as in count.

A preempted request keeps its matcher: its accepted tokens are its output, which it recomputes,
so nothing is rolled back. ``min_tokens`` with a structured output is refused (the grammar, not a
count, decides where the output may end; the two could leave no token allowed).
"""
from __future__ import annotations

import collections
import json
import re
import threading
import time
from dataclasses import dataclass, field

import torch

__all__ = ["StructuredSpec", "Grammars", "StructuredUnavailable", "mask_rows", "KINDS", "XGRAMMAR_RANGE"]

# the releases CI runs (pyproject.toml's `structured` and `test` extras): older ones lack
# TokenizerInfo.from_huggingface(vocab_size=, stop_token_ids=) as used here, newer ones are untested
XGRAMMAR_RANGE = ((0, 2, 8), (0, 3))
KINDS = ("json", "json_object", "regex", "choice", "grammar", "structural_tag")
MAX_SPEC_CHARS = 32 << 10  # a schema / regex / grammar
MAX_CHOICES = 1024
CACHE_SIZE = 64  # compiled grammars kept (least recently used dropped)
# memory: a compiled grammar's size grows with its spec (EBNF of bounded repetitions against SmolLM2's
# vocabulary: 22 MB at 0.9 KB, 52 MB at 1.6 KB), so the cache is bounded in bytes as well as count,
# one grammar larger than MAX_GRAMMAR_BYTES is refused, and the compiler process may grow by at most
# COMPILE_MEMORY_BYTES (beyond that xgrammar's allocation fails and the spec is refused)
CACHE_BYTES = 1 << 30
MAX_GRAMMAR_BYTES = 256 << 20
COMPILE_MEMORY_BYTES = 1 << 30


class StructuredUnavailable(ValueError):
    """Structured output was asked for and xgrammar is not installed (or is a release not tested)."""


@dataclass(frozen=True)
class StructuredSpec:
    """What a request's output must match. ``kind``: "json" (``value``: a JSON schema's text),
    "json_object" (any JSON object; ``value`` ""), "regex", "choice" (``choices``: the strings),
    "grammar" (xgrammar's EBNF, a ``root`` rule). ``any_whitespace``: JSON may carry any whitespace
    between tokens (False: the compact form). ``source``: the request field it came from (messages)."""
    kind: str
    value: str = ""
    choices: tuple[str, ...] = ()
    any_whitespace: bool = True
    source: str = field(default="structured_outputs", compare=False)

    def validate(self) -> None:
        def bad(what):
            raise ValueError(f"{self.source}: {what}")

        if self.kind not in KINDS:
            bad(f"kind {self.kind!r}; valid: {', '.join(KINDS)}")
        if not isinstance(self.value, str) or len(self.value) > MAX_SPEC_CHARS:
            bad(f"a text of at most {MAX_SPEC_CHARS} characters is valid")
        if self.kind in ("json", "regex", "grammar", "structural_tag") and not self.value:
            bad("empty; valid: a non-empty " + {"json": "JSON schema", "regex": "regular expression",
                                                "grammar": "EBNF grammar with a root rule",
                                                "structural_tag": "structural tag (JSON)"}[self.kind])
        if self.kind == "choice":
            if not (isinstance(self.choices, tuple) and 0 < len(self.choices) <= MAX_CHOICES
                    and all(isinstance(c, str) and c for c in self.choices)):
                bad(f"choices: valid: 1 to {MAX_CHOICES} non-empty strings")
            if sum(map(len, self.choices)) > MAX_SPEC_CHARS:
                bad(f"choices: at most {MAX_SPEC_CHARS} characters in all")
        if not isinstance(self.any_whitespace, bool):
            bad("any_whitespace: valid: true or false")


_checked = None  # the xgrammar module, once imported and its version checked


def _xgrammar():
    global _checked
    if _checked is not None:
        return _checked
    try:
        import xgrammar
    except ImportError as e:
        raise StructuredUnavailable(
            "structured output (response_format json, guided_* / structured_outputs) needs the xgrammar package, "
            f"which this server cannot import ({e}); install it: pip install \"fastadapters[structured]\"") from None
    from importlib.metadata import version

    have = version("xgrammar")
    nums = tuple(int(p) for p in have.split("+")[0].split(".")[:3] if p.isdigit())
    lo, hi = XGRAMMAR_RANGE
    if not lo <= nums < hi:
        raise StructuredUnavailable(
            f"structured output: xgrammar {have} is installed; this release of fastadapters is tested with "
            f"{'.'.join(map(str, lo))} <= xgrammar < {'.'.join(map(str, hi))}: install one of those")
    _checked = xgrammar
    return xgrammar


_NOISE = re.compile(r"^\s*\[[0-9:]+\]\s*\S+?\.(cc|h|cpp):\d+:\s*")  # xgrammar's "[hh:mm:ss] file.cc:NN: "


def _reason(e: Exception) -> str:
    """xgrammar's error message without its timestamp and source location, on one line, cut at 300."""
    text = " ".join(_NOISE.sub("", line).strip() for line in str(e).strip().splitlines() if line.strip())
    text = _NOISE.sub("", text) or type(e).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def _too_large(spec: StructuredSpec, size: int) -> str:
    return (f"{spec.source}: its compiled grammar takes {size / 2**20:.1f} MB, more than this server keeps for "
            f"one grammar ({MAX_GRAMMAR_BYTES / 2**20:g} MB); simplify it")


def _is_lark(text: str) -> bool:
    """Whether a grammar is Lark's notation rather than EBNF: no line, comments (# or //) left out,
    defines a rule with "::=" (how vLLM tells the two apart)."""
    return not any("::=" in re.sub(r"(#|//).*$", "", line) for line in text.splitlines())


def _choice_grammar(choices: tuple[str, ...]) -> str:
    """EBNF for exactly one of ``choices`` (JSON string escapes are EBNF string escapes)."""
    return "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices)


class Grammars:
    """Compiled grammars and matchers for one engine's tokenizer and vocabulary (thread-safe: the
    server compiles in a thread of its own, the engine thread makes matchers). ``compile_timeout_s``:
    each spec first compiles in a child process killed after that many seconds (grammar_worker.py),
    then in the calling thread; None: only in the calling thread, without a limit."""

    def __init__(self, tokenizer, vocab_size: int, stop_ids, compile_timeout_s: float | None = None):
        self.tokenizer, self.vocab_size, self.stop_ids = tokenizer, int(vocab_size), sorted(stop_ids)
        self.compile_timeout_s = compile_timeout_s  # None: compile in the calling thread, without a limit
        self._lock = threading.Lock()
        self._info = None
        self._compiler = None
        self._worker = None
        self._cache: collections.OrderedDict = collections.OrderedDict()
        self._refused: collections.OrderedDict = collections.OrderedDict()  # spec -> why it was refused (the
        # limit, or the compiler died on it): refused again at once
        self.compiles = 0  # grammars compiled (cache misses), for tests

    def _get_info(self):
        xgr = _xgrammar()
        with self._lock:
            if self._info is None:
                self._info = xgr.TokenizerInfo.from_huggingface(self.tokenizer, vocab_size=self.vocab_size,
                                                                stop_token_ids=self.stop_ids or None)
            return self._info

    def _get_compiler(self):
        info = self._get_info()
        with self._lock:
            if self._compiler is None:
                # our LRU bounds what is kept; xgrammar's own cache would grow without limit
                self._compiler = _xgrammar().GrammarCompiler(info, max_threads=2, cache_enabled=False)
            return self._compiler

    def _get_worker(self):
        info = self._get_info()
        with self._lock:
            if self._worker is None:
                from .grammar_worker import CompileWorker

                self._worker = CompileWorker(info.serialize_json(), max_threads=2, memory_bytes=COMPILE_MEMORY_BYTES,
                                             max_grammar_bytes=MAX_GRAMMAR_BYTES)
            return self._worker

    def close(self) -> None:
        """Stop the compiler process, if one runs (it also stops when this object is collected)."""
        if self._worker is not None:
            self._worker.close()

    def _compiled(self, spec: StructuredSpec, req: dict):
        """``req`` compiled in this thread; where ``compile_timeout_s`` is set, only after a child
        process compiled it within that time and memory (``_probe``)."""
        from .grammar_worker import compile_request

        if self.compile_timeout_s is not None:
            self._probe(spec, req)
        try:
            compiled = compile_request(self._get_compiler(), req)
        except Exception as e:  # xgrammar raises RuntimeError / its own errors for what it cannot compile
            raise ValueError(f"{spec.source}: cannot be compiled to a grammar: {_reason(e)}") from None
        if compiled.memory_size_bytes > MAX_GRAMMAR_BYTES:
            raise ValueError(_too_large(spec, compiled.memory_size_bytes))
        return compiled

    def _probe(self, spec: StructuredSpec, req: dict) -> None:
        """Compile ``req`` in the child process, killed after ``compile_timeout_s``; ValueError when
        it runs past that, past ``COMPILE_MEMORY_BYTES``, to a grammar over ``MAX_GRAMMAR_BYTES``, or
        when xgrammar refuses it. (The child's grammar is not sent back; see grammar_worker.py.)"""
        from .grammar_worker import CompileCrash, CompileError, CompileTimeout, CompileTooLarge

        too_slow = (f"{spec.source}: compiling it to a grammar took longer than this server allows "
                    f"({self.compile_timeout_s:g} s, --max-grammar-compile-s); simplify it (fewer or shorter bounded "
                    "repetitions, fewer alternatives)")
        with self._lock:
            known = self._refused.get(spec)
        if known is not None:  # the same spec again: refused without compiling
            raise ValueError(known)
        try:
            self._get_worker().compile(req, self.compile_timeout_s)
        except (CompileTimeout, CompileCrash) as e:
            why = too_slow if isinstance(e, CompileTimeout) else f"{spec.source}: cannot be compiled to a grammar: {e}"
            with self._lock:
                self._refused[spec] = why
                while len(self._refused) > CACHE_SIZE:
                    self._refused.popitem(last=False)
            raise ValueError(why) from None
        except CompileTooLarge as e:
            raise ValueError(_too_large(spec, e.args[0])) from None
        except CompileError as e:
            reason = _reason(e)
            if "bad_alloc" in reason:  # past the child's COMPILE_MEMORY_BYTES
                reason = (f"compiling it needs more than the {COMPILE_MEMORY_BYTES / 2**20:g} MB this server "
                          "allows; simplify it")
            raise ValueError(f"{spec.source}: cannot be compiled to a grammar: {reason}") from None

    def cached(self, spec: StructuredSpec):
        """``spec``'s compiled grammar if the cache holds it, else None (O(1): no compile, no wait)."""
        with self._lock:
            hit = self._cache.get(spec)
            if hit is not None:
                self._cache.move_to_end(spec)
            return hit

    def compile(self, spec: StructuredSpec):
        """The compiled grammar of ``spec`` (cached); ValueError naming ``spec.source`` if it cannot compile."""
        spec.validate()
        hit = self.cached(spec)
        if hit is not None:
            return hit
        xgr = _xgrammar()
        if spec.kind == "json":
            try:
                schema = json.loads(spec.value)
            except ValueError as e:
                raise ValueError(f"{spec.source}: cannot be compiled to a grammar: not valid JSON ({e})") from None
            if not isinstance(schema, (dict, bool)):
                raise ValueError(f"{spec.source}: cannot be compiled to a grammar: a JSON schema is an object (or "
                                 f"true / false), got {type(schema).__name__}")
            # strict: no properties beyond the schema's unless it allows them (vLLM's default)
            req = {"method": "json", "value": spec.value, "any_whitespace": spec.any_whitespace, "strict": True}
        elif spec.kind == "json_object":  # any object: any properties
            req = {"method": "json", "value": '{"type": "object"}', "any_whitespace": spec.any_whitespace,
                   "strict": False}
        elif spec.kind == "regex":
            req = {"method": "regex", "value": spec.value}
        elif spec.kind == "choice":
            req = {"method": "grammar", "value": _choice_grammar(spec.choices)}
        elif spec.kind == "structural_tag":  # vLLM's: {"type": "structural_tag", "format": ...} or the older
            try:  # {"structures": [{"begin", "schema", "end"}], "triggers": [...]}
                tag = json.loads(spec.value)
            except (ValueError, RecursionError) as e:
                raise ValueError(f"{spec.source}: cannot be compiled to a grammar: not valid JSON ({e})") from None
            if not isinstance(tag, dict):
                raise ValueError(f"{spec.source}: cannot be compiled to a grammar: a structural tag is an object, got "
                                 f"{type(tag).__name__}")
            req = {"method": "structural_tag", "value": spec.value}
        else:  # EBNF (xgrammar's, a root rule), or Lark where no rule is written with "::=" (vLLM's test)
            req = {"method": "lark" if _is_lark(spec.value) else "grammar", "value": spec.value}
        compiled = self._compiled(spec, req)
        # a grammar that compiles yet allows no first token (root ::= root; or text this vocabulary cannot
        # spell) would fail in sampling: refuse it here, as the client's error
        probe = xgr.GrammarMatcher(compiled)
        bitmask = xgr.allocate_token_bitmask(1, self.vocab_size)
        probe.fill_next_token_bitmask(bitmask, 0)
        if not bool((bitmask != 0).any()):
            raise ValueError(f"{spec.source}: the grammar allows no output: no token of this model's vocabulary "
                             "can start it")
        with self._lock:
            self.compiles += 1
            self._cache[spec] = compiled
            total = sum(c.memory_size_bytes for c in self._cache.values())
            while len(self._cache) > CACHE_SIZE or (total > CACHE_BYTES and len(self._cache) > 1):
                total -= self._cache.popitem(last=False)[1].memory_size_bytes
        return compiled

    def matcher(self, spec: StructuredSpec):
        """A fresh matcher of ``spec``'s grammar (at its start), for one request."""
        return self.matcher_of(self.compile(spec))

    @staticmethod
    def matcher_of(compiled):
        return _xgrammar().GrammarMatcher(compiled)


def mask_rows(x: torch.Tensor, rows: list[int], matchers: list, aliased: bool,
              seconds: list[float] | None = None) -> torch.Tensor:
    """``x`` (R, V) with every token that ``matchers[i]`` does not allow next set to -inf in row
    ``rows[i]``. ``aliased``: ``x`` is a tensor the caller still reads unmasked (then a copy is
    masked). The matchers fill one packed bitmask (R x ceil(V/32) int32) on the host, copied to
    ``x``'s device once; xgrammar's own kernel applies it (its C++ loop on the CPU, its Triton
    kernel on CUDA, as in vLLM), to those rows only. ``seconds``: each matcher's fill time is
    appended (the engine's per-token grammar budget)."""
    xgr = _xgrammar()
    vocab = x.shape[-1]
    bitmask = xgr.allocate_token_bitmask(x.shape[0], vocab)  # all allowed; a matcher clears what it forbids
    need = []
    for r, m in zip(rows, matchers):
        t0 = time.perf_counter()
        if m.fill_next_token_bitmask(bitmask, r):  # False: every token allowed
            need.append(r)
        if seconds is not None:
            seconds.append(time.perf_counter() - t0)
    if not need:
        return x
    if aliased:
        x = x.clone()
    xgr.apply_token_bitmask_inplace(x, bitmask.to(x.device, non_blocking=True), vocab_size=vocab, indices=need)
    return x
