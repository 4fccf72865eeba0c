"""The generation engine: continuous batching of requests for many adapters over one base model.

    engine = Engine(model, tokenizer, max_num_seqs=16, max_model_len=2048)
    engine.load_adapter("math", "adapters/math")            # LoRA, series, parallel or prefix
    req = engine.submit(prompt_ids, SamplingParams(max_tokens=16, temperature=0), adapter="math",
                        on_output=callback)                 # callback(RequestOutput) per step
    engine.start()                                          # steps in a background thread
    ...; engine.abort(req.request_id); engine.stop()
    # or, without a thread: engine.run_until_done() / engine.generate([...])

Each ``step`` admits waiting requests, asks the scheduler (``scheduler.py``) which tokens run,
and runs one packed forward (``hf_compat.paged_forward``) of every scheduled request's new tokens
in which every token is routed to its request's adapter (``fa.route(..., lengths=...)``, one
router for the engine's life, repacked in place: LoRA of any rank, series and parallel adapters
per token; a prefix-tuning request's prefix keys/values lead its blocks). The new keys/values go
straight into the block pool (``kv_blocks.py``) and attention reads each request's own blocks
(``paged_attention.py``): a request's context is never copied next to another's, nor masked
against it. Then one batched sampling call (``sampling.sample_rows``) gives a token to every
request whose prompt is fully computed, and the text is detokenised incrementally
(``detokenizer.py``). Prefill chunks and decode tokens of different requests share the forward. On
CUDA a step of decode tokens only replays a CUDA graph captured for its padded batch size
(``cuda_graphs.py``; ``cuda_graphs=False`` keeps every step eager).
Because each token attends only to its own request's keys/values with its own positions, a
request's greedy output does not depend on what else is batched (up to float rounding: near-ties
of the top two logits), and one request's non-finite numbers cannot reach another's: a request
whose logits are NaN/inf, or whose draw fails, ends alone with finish reason "error".

Why not transformers' continuous batching (``generation.continuous_batching``, read on 5.24): a
request there is ``add_request(input_ids, max_new_tokens, ...)`` with no field for an adapter,
and the packed forward is built and run inside its manager thread (``model(**batch_data)`` over
private per-step tensors), so per-token routing would hook private internals that changed shape
across releases; its paged cache can share prompt blocks but has no way to start a request with
given keys/values (a prefix adapter), and positions start at the prompt. Measured on the CPU
(random Llama hidden 256, 4 layers, 32 requests of 8-64 prompt tokens, 16 new tokens, one
thread): ``generate_batch`` 11.7 tokens/s, this engine 122 tokens/s, both with the same greedy
tokens for 32 of 32 requests. So the engine is a small scheduler of its own over a paged cache.

Thread model: ``submit`` / ``abort`` / ``load_adapter`` / ``unload_adapter`` may be called from
any thread; model and pool changes happen only in the engine thread, between steps. The engine
knows nothing of HTTP.

Outputs overlap the next step. Without a thread (``step``, ``run_until_done``, ``generate``) a
step's outputs are made inline at its end: detokenisation, stop strings, then ``on_output``
callbacks, in the caller's thread. With ``start()`` a second thread, "fastadapters-output", does
that work for step k while the engine thread runs step k+1 (the forward's kernels release the
GIL), so the Python work of outputs is off the critical path:

- the engine thread appends each sampled token to ``req.output_ids`` and hands the output thread
  one batch per step of events: (request, token, completion tokens so far, finish reason) and the
  final outputs it made itself (abort, error). The output thread keeps its own copy of each
  request's ids for the detokeniser (``metadata["out_ids"]``) and never reads ``output_ids``
  while the engine may append to it; it alone writes ``req.text`` then.
- finishes that need no text (EOS, ``max_tokens`` / context length, errors, aborts) are decided
  in the engine thread, which frees the blocks at once, as inline; the final output is then made
  by the output thread from that token's event (so the text held back is flushed in order).
- a stop string is found only by the output thread. It emits the final output (reason "stop",
  text cut before the stop, the token that completed it, ``completion_tokens`` counting the tokens
  up to and including that one: what the inline path reports) and records the finish in
  ``_out_finish``; the engine finishes the request at its next intake like an abort but with that
  reason, emitting nothing, and cuts ``output_ids`` back to those tokens. The tokens it generated
  for it meanwhile are dropped, never emitted (they stay counted in ``stats["generation_tokens"]``:
  they were computed). Before each step the engine waits until the output thread is at most one
  step behind, so at most one token per request is generated past a stop (and outputs, streams
  and memory never run more than one step behind the engine). It does not wait while a command
  is queued: a callback may be waiting in ``call`` (``load_adapter``) for the engine thread.
- per request, outputs go out in order and the final one (``finished=True``) is the last, exactly
  once: after it, the output thread drops the request's events. When the output side ends a
  request that the engine had already finished for another reason (a stop string found in the
  token that also reached ``max_tokens``, or before a later abort), ``stats["finished_<reason>"]``
  and ``req.finish_reason`` are corrected to the reason emitted.
- a callback that raises cancels only its own request (a final "abort" output, then the engine
  finishes it); detokenisation that fails ends its request with "error".
- ``stop()`` ends the engine thread (every live request gets its final output, as before), then
  the output thread after it has emitted everything queued. ``health()`` reports a dead output
  thread; if it died, the engine thread makes outputs inline again.

Callbacks run in the output thread (inline: in the thread that calls ``step``) and must not
block: the engine waits for outputs one step behind.
"""
from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import os
import threading
import time
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn as nn

from .adapters import (AdapterEntry, AdapterError, AdapterRegistry, PathNotAllowed, UnknownAdapter, confine,
                       nonfinite_adapter_tensor, private_copy)
from .detokenizer import DetokState, detokenize
from ..ops import dispatch
from ..ops.multi import OP as MULTI_OP
from .cpu_gemm import LinearHooks, install as onednn_install, weight_packing
from .cuda_graphs import DecodeGraphs, capture_sizes, graphs_unavailable, warn_once as graphs_warn_once
from .flashinfer_attention import FlashInferAttention, select_backend
from .hf_compat import check_model, geometry, paged_forward
from .kv_blocks import BlockPool
from .lm_head import lm_head
from .paged_attention import DECODE_BATCH_MAX_LEN, Segment, StepTables, chunk_mask, decode_batch
from .sampling import LogitsState, SamplingParams, make_generator, process_rows, sample_rows, token_logprobs
from .scheduler import QueueFull, Request, Scheduler, Status
from .structured import Grammars, StructuredSpec, mask_rows

__all__ = ["Engine", "RequestOutput", "QueueFull", "AdapterError", "UnknownAdapter", "PathNotAllowed", "PromptError",
           "EngineBusy"]


GRAMMAR_SLOW_TOKENS = 3  # consecutive tokens over max_grammar_ms that end a structured request


class EngineBusy(RuntimeError):
    """A command (adapter load / unload) the engine thread did not reach in time; withdrawn: HTTP 503."""


class PromptError(ValueError):
    """A prompt the engine cannot take (empty, too long, bad token ids): HTTP 400."""


@dataclass
class RequestOutput:
    request_id: str
    token_ids: list[int]  # tokens generated in this step
    text: str  # text that became final in this step
    finished: bool
    finish_reason: str | None  # "stop" | "length" | "abort" | "error"
    prompt_tokens: int
    completion_tokens: int
    error: str | None = None
    # with SamplingParams.logprobs: per token of token_ids, (id, its log-probability, [(id, log-prob) top k])
    logprobs: list | None = None
    # with SamplingParams.prompt_logprobs, on a request's first output: per prompt token (None first),
    # (id, its log-probability, [(id, log-prob) top k], its rank in the vocabulary, 1 = the most likely,
    # with SamplingParams.prompt_ranks, else None)
    prompt_logprobs: list | None = None


class Engine:
    def __init__(self, model: nn.Module, tokenizer=None, *, max_num_seqs: int = 16, max_model_len: int | None = None,
                 block_size: int = 16, num_blocks: int | None = None, max_waiting: int | None = None,
                 chunk_size: int = 256, token_budget: int = 512, backend: str | None = None,
                 adapter_roots: list[str] | None = None, kv_cache_bytes: int | None = None,
                 max_loras: int | None = None, prefix_caching: bool = True, max_cpu_loras: int | None = None,
                 decode_batch_max_len: int = DECODE_BATCH_MAX_LEN, attention_backend: str = "auto",
                 cuda_graphs: bool | str = "auto", cuda_graph_sizes: list[int] | None = None,
                 max_grammar_ms: float = 20.0, max_grammar_compile_s: float | None = 10.0,
                 pack_weights: bool | None = None, _graph_capture=None):
        check_model(model)
        if pack_weights not in (None, True, False):
            raise ValueError(f"pack_weights: got {pack_weights!r}; valid: None (on the CPU, pack the linears' weights "
                             "for oneDNN when the copies take at most half the available memory), True (pack them), "
                             "False (run the row-major weights)")
        if max_grammar_compile_s is not None and (isinstance(max_grammar_compile_s, bool) or not isinstance(
                max_grammar_compile_s, (int, float)) or not 0 < max_grammar_compile_s <= 3600):
            raise ValueError(f"max_grammar_compile_s: got {max_grammar_compile_s!r}; valid: a number of seconds in "
                             "(0, 3600] (a structured output whose grammar takes longer to compile is refused), or "
                             "None (compiled in the calling thread, without a limit)")
        self.max_grammar_compile_s = None if max_grammar_compile_s is None else float(max_grammar_compile_s)
        if isinstance(max_grammar_ms, bool) or not isinstance(max_grammar_ms, (int, float)) \
                or not 0 < max_grammar_ms <= 60_000:
            raise ValueError(f"max_grammar_ms: got {max_grammar_ms!r}; valid: a number of milliseconds in (0, 60000] "
                             "(a structured request whose grammar takes longer for one token ends with an error)")
        self.max_grammar_ms = float(max_grammar_ms)
        if cuda_graphs not in (True, False, "auto"):
            raise ValueError(f"cuda_graphs: got {cuda_graphs!r}; valid: 'auto' (decode steps from CUDA graphs where "
                             "they can run), True (required: an error where they cannot), False (always eager)")
        if isinstance(decode_batch_max_len, bool) or not isinstance(decode_batch_max_len, int) \
                or decode_batch_max_len < 0:
            raise ValueError(f"decode_batch_max_len: got {decode_batch_max_len!r}; valid: an integer >= 0 (0: every "
                             "request's attention runs on its own)")
        self.decode_batch_max_len = decode_batch_max_len
        if max_loras is not None and (isinstance(max_loras, bool) or not isinstance(max_loras, int) or max_loras < 1):
            raise ValueError(f"max_loras: got {max_loras!r}; valid: None (every loaded adapter resident) or an "
                             "integer >= 1 (device slots, least recently used evicted)")
        if max_cpu_loras is not None and (isinstance(max_cpu_loras, bool) or not isinstance(max_cpu_loras, int)
                                          or max_cpu_loras < 1 or max_cpu_loras < (max_loras or 1)):
            raise ValueError(f"max_cpu_loras: got {max_cpu_loras!r}; valid: None (every loaded adapter kept in "
                             f"memory) or an integer >= max_loras ({max_loras or 1}) (adapters kept in memory; the "
                             "least recently used idle ones are dropped and reloaded from their files on demand)")
        self.max_loras = max_loras
        self.max_cpu_loras = max_cpu_loras
        self._in_memory: collections.OrderedDict[str, AdapterEntry] = collections.OrderedDict()  # LRU first
        self._reloads = 0  # reloads after max_cpu_loras drops (each one a new prefix-cache scope)
        for label, v in (("max_num_seqs", max_num_seqs), ("block_size", block_size), ("chunk_size", chunk_size),
                         ("token_budget", token_budget)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{label}: got {v!r}; valid: an integer >= 1")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.backend = backend
        text = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        limit = getattr(text, "max_position_embeddings", None) or 2048
        self.max_model_len = int(max_model_len or limit)
        if self.max_model_len < 2:
            raise ValueError(f"max_model_len: got {max_model_len!r}; valid: an integer >= 2")
        self.vocab_size = int(model.get_output_embeddings().weight.shape[0])
        layers, kv_heads, head_dim = geometry(model)
        emb = model.get_input_embeddings().weight
        self.device, self.dtype = emb.device, emb.dtype
        # the multi-adapter op's backend, resolved now: on the CPU that builds the C++ kernel (first
        # use on a machine, about a minute) at start-up rather than inside the first request's step,
        # and a bad --backend fails here
        self.adapter_backend = dispatch.resolve(MULTI_OP, backend, self.device)
        # "auto": FlashInfer's paged kernels on CUDA when installed (never run on a GPU yet), else SDPA
        self.attention_backend = select_backend(attention_backend, self.device, self.dtype)
        self._flashinfer = FlashInferAttention(self.device) if self.attention_backend == "flashinfer" else None
        # decode steps replayed from CUDA graphs (cuda_graphs.py; never run on a GPU yet)
        self.cuda_graph_sizes = graph_sizes = capture_sizes(max_num_seqs, cuda_graph_sizes)
        why_not = None if _graph_capture is not None else graphs_unavailable(self.device, model, self.adapter_backend)
        if cuda_graphs is True and why_not is not None:
            raise ValueError(f"cuda_graphs=True: {why_not}. Valid here: cuda_graphs='auto' or False")
        if cuda_graphs == "auto" and why_not is not None and self.device.type == "cuda":
            graphs_warn_once(why_not, f"fastadapters serving: decode steps run eagerly, without CUDA graphs: {why_not}")
        use_graphs = cuda_graphs is not False and why_not is None
        per_seq = -(-self.max_model_len // block_size)
        if num_blocks is None:  # every sequence at full length, within the KV memory budget
            block_bytes = 2 * layers * kv_heads * block_size * head_dim * emb.element_size()
            num_blocks = max(per_seq, min(max_num_seqs * per_seq, self._kv_budget(kv_cache_bytes) // block_bytes))
        if num_blocks < per_seq:
            raise ValueError(f"num_blocks: got {num_blocks}; valid: at least {per_seq} (one request of "
                             f"max_model_len {self.max_model_len} in blocks of {block_size})")
        self.pool = BlockPool(layers, kv_heads, head_dim, block_size, num_blocks, self.dtype, self.device,
                              reserved=1 if use_graphs else 0)
        # on the CPU: the linears' weights packed for oneDNN where the memory left once the block pool
        # has its own allows (cpu_gemm.py), the LM head (lm_head.py) and the other linears through
        # oneDNN's GEMM inside the engine's forward
        self.pack_weights = weight_packing(model, pack_weights) if self.device.type == "cpu" else False
        self._lm_head = lm_head(model, self.device, pack=self.pack_weights)
        self.onednn_linears = onednn_install(model, pack=self.pack_weights) if self.device.type == "cpu" and (
            self.dtype == torch.float32 or (self.pack_weights and self.dtype == torch.bfloat16)) else LinearHooks([])
        self._graphs = DecodeGraphs(self, graph_sizes, _graph_capture) if use_graphs else None
        self._graphs_required = cuda_graphs is True
        self.scheduler = Scheduler(self.pool, max_num_seqs, max_waiting or 4 * max_num_seqs, chunk_size, token_budget,
                                   max_adapters=max_loras, prefix_caching=bool(prefix_caching))
        self.registry = AdapterRegistry()
        self.adapter_roots = list(adapter_roots or [])
        self.eos_ids = self._eos_ids()
        self._lock = threading.RLock()
        self._wake = threading.Condition(self._lock)
        self._inbox: collections.deque[Request] = collections.deque()
        self._aborts: set[str] = set()
        self._commands: collections.deque = collections.deque()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.requests: dict[str, Request] = {}  # live (not finished) requests by id
        self.stats = collections.Counter()  # prompt_tokens, generation_tokens, finished_<reason>, steps
        self.last_error: str | None = None
        self._router = None  # the router of the last routed step (route reuses it for the same names and lengths)
        self._heartbeat = time.monotonic()  # the engine thread's last completed step or idle wait (health)
        # the output thread (start(): outputs of step k made while step k+1 runs; see the module docstring)
        self._out_thread: threading.Thread | None = None
        self._out_cv = threading.Condition(threading.Lock())
        self._out_batches: collections.deque[list] = collections.deque()  # one batch of events per step
        self._out_pending: list = []  # events the engine thread made since its last hand-over
        self._out_posted = self._out_done = 0  # batches handed over / processed
        self._out_closing = False
        self._out_gen = 0  # which start() the output thread belongs to
        self._out_finish: dict[str, tuple[str, int]] = {}  # rid -> (reason, completion tokens), output side
        self.last_output_error: str | None = None
        self.last_tables: StepTables | None = None  # the last step's block tables and attention counts
        self._grammars: Grammars | None = None  # structured output (structured.py), made on first use

    def _kv_budget(self, requested: int | None) -> int:
        """Bytes for the block pool: as asked, else half the free GPU memory, else 2 GiB on the CPU."""
        if requested is not None:
            return int(requested)
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            return int(free * 0.5)
        return 2 << 30

    # -- public, any thread ----------------------------------------------------------------------
    def submit(self, prompt_ids: list[int], params: SamplingParams, adapter: str | None = None,
               on_output: Callable[[RequestOutput], Any] | None = None, request_id: str | None = None,
               grammar=None) -> Request:
        """Queue a request; ValueError subclasses name what was wrong, QueueFull when the queue is full.
        ``grammar``: ``params.structured`` compiled already (``compile_structured``), so no compile runs here."""
        params.validate(vocab_size=self.vocab_size)
        if params.stop and self.tokenizer is None:
            raise PromptError("stop strings need a tokenizer; this engine has none")
        # a structured output's matcher (its grammar compiled once per spec: the server compiles it in its
        # tokenizer thread and passes it here); ValueError names the field that cannot compile
        matcher = None
        if params.structured is not None:
            matcher = self.compile_structured(params.structured, matcher=True) if grammar is None \
                else Grammars.matcher_of(grammar)
        if not isinstance(prompt_ids, list) or not prompt_ids:
            raise PromptError("the prompt is empty; valid: at least one token")
        bad = [t for t in prompt_ids if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < self.vocab_size]
        if bad:
            raise PromptError(f"prompt token id {bad[0]!r} is out of range; valid: 0..{self.vocab_size - 1}")
        reread = None
        seen = None if adapter is None else self.registry.entries.get(adapter)
        if seen is not None and seen.metadata.get("evicted"):
            # dropped from memory (max_cpu_loras): its files are read here, in the caller's thread,
            # and the engine thread reloads it from what was read when it admits the request
            try:
                with self._read_files(seen.path, *seen.metadata.get("source", (False, None))) as (_, read):
                    reread = (seen, read)
            except AdapterError as e:
                reread = (seen, e)
        with self._lock:
            entry = None if adapter is None else self.registry.get(adapter)
            prefix = 0 if entry is None or entry.prefix_kv is None else int(entry.prefix_kv[0][0].shape[-2])
            if prefix + len(prompt_ids) >= self.max_model_len:
                extra = f" + {prefix} prefix positions" if prefix else ""
                raise PromptError(f"the prompt has {len(prompt_ids)} tokens{extra}, which leaves no room to generate "
                                  f"in the context of {self.max_model_len} (max_model_len); shorten it")
            if prefix + len(prompt_ids) + params.max_tokens > self.max_model_len:  # vLLM's rule: a 400, not a cut
                extra = f" + {prefix} prefix positions" if prefix else ""
                raise PromptError(f"max_tokens: the prompt has {len(prompt_ids)} tokens{extra} and max_tokens is "
                                  f"{params.max_tokens}, more than the context of {self.max_model_len} "
                                  f"(max_model_len); valid: max_tokens <= "
                                  f"{self.max_model_len - prefix - len(prompt_ids)}")
            queued = len(self._inbox) + len(self.scheduler.waiting)
            if queued >= self.scheduler.max_waiting:
                raise QueueFull(f"the server is at capacity ({queued} requests waiting, "
                                f"{len(self.scheduler.running)} running); retry later")
            req = Request(list(prompt_ids), params, adapter=adapter, on_output=on_output)
            if request_id is not None:
                req.request_id = request_id
            if entry is not None:
                entry.refs += 1
                req.metadata["entry"] = entry
                if reread is not None and reread[0] is entry:
                    req.metadata["reread"] = reread[1]
                req.route_name = None if entry.prefix_kv is not None else entry.internal
                req.cache_scope = entry.metadata.get("cache_scope", entry.internal)  # (set again at intake)
                req.prefix_kv = entry.prefix_kv
            req.generator = make_generator(params, self.device)
            if matcher is not None:
                req.metadata["matcher"] = matcher
            self.requests[req.request_id] = req
            self._inbox.append(req)
            self._wake.notify_all()
        return req

    def compile_structured(self, spec: StructuredSpec, matcher: bool = False):
        """``spec``'s compiled grammar (cached per spec), or with ``matcher`` a fresh matcher of it; any
        thread. ValueError (``StructuredUnavailable`` without xgrammar) names the field that cannot compile."""
        if self.tokenizer is None:
            raise PromptError(f"{spec.source}: a structured output needs a tokenizer; this engine has none")
        if not self.eos_ids:  # a finished grammar allows only its stop tokens: the model's EOS
            raise PromptError(f"{spec.source}: a structured output ends on the model's end-of-sequence token, and "
                              "neither this model's generation config nor its tokenizer names one")
        with self._lock:
            if self._grammars is None:
                self._grammars = Grammars(self.tokenizer, self.vocab_size, self.eos_ids,
                                          compile_timeout_s=self.max_grammar_compile_s)
            grammars = self._grammars
        return grammars.matcher(spec) if matcher else grammars.compile(spec)

    def cached_structured(self, spec: StructuredSpec):
        """``spec``'s compiled grammar when already compiled (cached), else None; never compiles."""
        grammars = self._grammars
        return None if grammars is None else grammars.cached(spec)

    def abort(self, request_id: str) -> None:
        """Cancel a request (a client went away): it stops at the next step and frees its blocks."""
        with self._lock:
            self._aborts.add(request_id)
            self._wake.notify_all()

    def load_adapter(self, name: str, path: str, confined: bool = True, timeout: float | None = 600,
                     max_bytes: int | None = None) -> AdapterEntry:
        """Load the adapter in ``path`` as ``name`` (any type / format ``fa.load_adapter`` reads).
        ``confined``: the path must lie under an adapter root (runtime loads; its files, within
        ``max_bytes`` in all, are copied through checked descriptors into a private folder and loaded
        from there, and messages quote ``path`` as given); False for start-up."""
        if not isinstance(name, str) or not name.strip():
            raise AdapterError(f"lora_name: got {name!r}; valid: a non-empty string")
        if not isinstance(path, (str, os.PathLike)):
            raise AdapterError(f"lora_path: got {type(path).__name__}; valid: a folder path")
        path = os.fspath(path)
        with self._read_files(path, confined, max_bytes) as (folder, read):  # in this thread: running
            return self.call(lambda: self._load(name, folder, read, shown=path,  # requests do not wait for the disk
                                                source=(confined, max_bytes)), timeout)

    @contextlib.contextmanager
    def _read_files(self, path: str, confined: bool, max_bytes: int | None):
        """Read an adapter folder in the calling thread; yields (the folder read, what ``read_adapter``
        returned). A confined (runtime) load reads a private copy made through checked descriptors
        (``adapters.private_copy``), removed afterwards. Messages quote ``path`` as given."""
        import shutil

        from ..io import read_adapter

        folder = copy = None
        try:
            if confined:
                folder = copy = private_copy(confine(path, self.adapter_roots, max_bytes), self.adapter_roots,
                                             max_bytes, path)
            else:
                folder = path
            try:
                read = read_adapter(folder)
            except FileNotFoundError as e:
                raise AdapterError(f"no adapter at {path!r}: {str(e).replace(folder, path)}") from None
            except (ValueError, KeyError, OSError, RuntimeError) as e:
                raise AdapterError(f"could not load an adapter from {path!r}: {str(e).replace(folder, path)}") from None
            yield folder, read
        finally:
            if copy is not None:
                shutil.rmtree(copy, ignore_errors=True)

    def unload_adapter(self, name: str, timeout: float | None = 600) -> None:
        return self.call(lambda: self._unload(name), timeout)

    def adapters(self) -> list[AdapterEntry]:
        with self._lock:
            return list(self.registry.entries.values())

    def call(self, fn: Callable[[], Any], timeout: float | None = 600):
        """Run ``fn`` in the engine thread between steps (directly when no thread runs)."""
        if self._thread is None or threading.current_thread() is self._thread:
            with self._lock:
                return fn()
        fut: concurrent.futures.Future = concurrent.futures.Future()
        with self._lock:
            self._commands.append((fn, fut))
            self._wake.notify_all()
        with self._out_cv:
            self._out_cv.notify_all()  # an engine thread waiting for outputs takes commands first
        try:
            return fut.result(timeout)
        except concurrent.futures.TimeoutError:
            if fut.cancel():  # not started: withdrawn, nothing changed
                raise EngineBusy(f"the engine did not reach this command within {timeout:g} s (it is busy); "
                                 "nothing was changed; retry later") from None
            return fut.result()  # already running: its outcome is the answer

    # -- the thread ------------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is not None:
            return
        self._stopping = False
        with self._out_cv:  # a new channel: an output thread left by a stop() that timed out takes no more
            self._out_gen += 1
            self._out_closing = False
            self._out_batches.clear()
            self._out_posted = self._out_done = 0
        self._out_thread = threading.Thread(target=self._output_loop, args=(self._out_gen,),
                                            name="fastadapters-output", daemon=True)
        self._out_thread.start()
        self._thread = threading.Thread(target=self._loop, name="fastadapters-engine", daemon=True)
        self._thread.start()

    def healthy(self) -> bool:
        """False once a started engine thread or its output thread has died."""
        thread, out = self._thread, self._out_thread
        return (thread is None or thread.is_alive()) and (out is None or out.is_alive())

    def health(self, stall_seconds: float) -> str | None:
        """None when healthy; else why not: the started engine thread died, or it completed no step
        within ``stall_seconds`` while requests or commands were waiting for it."""
        thread = self._thread
        if thread is not None and not thread.is_alive():
            return "the engine thread stopped" + (f" (last error: {self.last_error})" if self.last_error else "")
        if thread is None:
            return None
        out = self._out_thread
        if out is not None and not out.is_alive():
            return "the output thread stopped" + (f" (last error: {self.last_output_error})"
                                                  if self.last_output_error else "")
        with self._lock:
            pending = bool(self._commands or self._inbox or self.scheduler.has_work())
        idle = time.monotonic() - self._heartbeat
        if pending and idle > stall_seconds:
            return (f"the engine completed no step in {idle:.0f} s while work was waiting (bound {stall_seconds:g} s)"
                    + (f"; last error: {self.last_error}" if self.last_error else ""))
        return None

    def stop(self, timeout: float = 30) -> None:
        if self._grammars is not None:  # its compiler process, if it started one
            self._grammars.close()
        thread = self._thread
        if thread is None:
            return
        with self._lock:
            self._stopping = True
            self._wake.notify_all()
        with self._out_cv:
            self._out_cv.notify_all()  # an engine thread waiting for outputs looks at _stopping
        deadline = time.monotonic() + timeout  # for both threads
        thread.join(timeout)
        out = self._out_thread
        if out is not None:  # after the engine thread: it emits everything queued (the finals of the stop)
            with self._out_cv:
                self._out_closing = True
                self._out_cv.notify_all()
            out.join(max(1.0, deadline - time.monotonic()))
            if not out.is_alive():
                self._drain_outputs()  # only if it died early: what it left, here, in order
            self._out_thread = None
        self._thread = None

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not self._stopping and not (self._commands or self._inbox or self._aborts or self._out_finish
                                                  or self.scheduler.has_work()):
                    self._heartbeat = time.monotonic()  # idle is healthy
                    self._wake.wait(0.5)
                if self._stopping:
                    break
            try:
                if self.step():
                    self._heartbeat = time.monotonic()  # a completed step (health's watchdog)
                else:  # work waits but nothing could run: no progress to report, and no busy spin
                    with self._lock:
                        self._wake.wait(0.01)
            except Exception as e:  # never let the loop die: the failed step's requests got an error
                self.last_error = f"{type(e).__name__}: {e}"
                warnings.warn(f"fastadapters serving: engine step failed: {self.last_error}", RuntimeWarning)
                time.sleep(0.01)
        with self._lock:  # stopped: nothing more runs; release everything
            for req in list(self.requests.values()):
                self._finish(req, "abort")
            for fn, fut in self._commands:
                fut.set_exception(RuntimeError("the engine stopped"))
            self._commands.clear()
        self._post()

    # -- the output thread ---------------------------------------------------------------------------
    def _output_loop(self, gen: int) -> None:
        try:
            while True:
                with self._out_cv:
                    while not self._out_batches and not self._out_closing and gen == self._out_gen:
                        self._out_cv.wait(0.5)
                    if not self._out_batches or gen != self._out_gen:
                        return  # closing, and everything handed over was emitted (or a later start())
                    batch = self._out_batches.popleft()
                self._process_events(batch)
                with self._out_cv:
                    if gen == self._out_gen:
                        self._out_done += 1
                    self._out_cv.notify_all()
        except BaseException as e:  # e.g. a callback raised SystemExit: health() reports it
            self.last_output_error = f"{type(e).__name__}: {e}"
            raise

    def _post(self) -> None:
        """Engine thread: hand the events made since the last call to the output thread (one batch);
        with no live output thread, make the outputs here, after any batches it left."""
        events, self._out_pending = self._out_pending, []
        out = self._out_thread
        if out is None or not out.is_alive():
            self._drain_outputs()
            self._process_events(events)
            return
        if events:
            with self._out_cv:
                self._out_batches.append(events)
                self._out_posted += 1
                self._out_cv.notify_all()

    def _drain_outputs(self) -> None:
        with self._out_cv:
            left = list(self._out_batches)
            self._out_batches.clear()
            self._out_done = self._out_posted
        for batch in left:
            self._process_events(batch)

    def _await_outputs(self) -> None:
        """Engine thread, before a step: wait until the output thread is at most one step behind.
        Not while a command waits: a callback may be the caller waiting for it (``call`` from the
        output thread), so the step runs and its intake takes the command."""
        out = self._out_thread
        with self._out_cv:
            while (self._out_done < self._out_posted - 1 and not self._stopping and not self._commands
                   and out is not None and out.is_alive()):
                self._out_cv.wait(0.5)

    def _process_events(self, events: list) -> None:
        for event in events:
            try:
                self._process_event(*event)
            except Exception as e:  # a fault of the output side itself: this event is lost, not the thread
                self.last_output_error = f"{type(e).__name__}: {e}"
                warnings.warn(f"fastadapters serving: making an output failed: {self.last_output_error}",
                              RuntimeWarning)

    def _process_event(self, req: Request, token: int | None, n: int, reason: str | None,
                       final: RequestOutput | None) -> None:
        """Output side: one token of ``req`` (``n`` tokens generated with it; ``reason``: the
        engine finished it with this token), or a final output the engine made (abort, error)."""
        md = req.metadata
        if md.get("final_sent"):
            return  # its final output went out: whatever the engine made after it is dropped
        if final is not None:
            md["final_sent"] = True
            self._deliver(req, final)
            return
        ids = md.get("out_ids")
        if ids is None:
            ids = md["out_ids"] = []
        ids.append(token)
        text = ""
        if self.tokenizer is not None:
            try:
                text, reason = self._new_text(req, reason, ids)
            except Exception as e:  # e.g. its detokenisation failed: it ends alone
                self._out_final(req, RequestOutput(req.request_id, [], "", True, "error", len(req.prompt_ids), n,
                                                   f"{type(e).__name__}: {e}"), request_error=True)
                return
        out = RequestOutput(req.request_id, [token], text, reason is not None, reason, len(req.prompt_ids), n,
                            logprobs=self._token_logprobs(req, n - 1, n), prompt_logprobs=self._prompt_entries(req, n))
        if reason is None:
            self._deliver(req, out)
        else:
            self._out_final(req, out)

    def _out_final(self, req: Request, out: RequestOutput, request_error: bool = False) -> None:
        """Output side: emit ``req``'s final output, and make the engine's record agree with it."""
        md = req.metadata
        with self._lock:
            md["final_sent"] = True
            if request_error and not md.get("counted_error"):
                self.stats["request_errors"] += 1
                md["counted_error"] = True
            if req.status is Status.FINISHED:  # the engine finished it already, with this token or later
                if req.finish_reason != out.finish_reason:
                    self.stats[f"finished_{req.finish_reason}"] -= 1
                    self.stats[f"finished_{out.finish_reason}"] += 1
                    if req.finish_reason == "error" and md.pop("counted_error", False):
                        self.stats["request_errors"] -= 1
                    req.finish_reason = out.finish_reason
                del req.output_ids[out.completion_tokens:]  # the engine no longer appends
            else:  # the engine finishes it at its next intake, with this reason, emitting nothing
                self._out_finish[req.request_id] = (out.finish_reason, out.completion_tokens)
                self._wake.notify_all()
        self._deliver(req, out)

    def _deliver(self, req: Request, out: RequestOutput) -> None:
        """Output side: call the request's callback; one that raises cancels its own request."""
        if req.on_output is None:
            return
        try:
            req.on_output(out)
        except Exception as e:
            warnings.warn(f"output callback of {req.request_id} failed ({type(e).__name__}: {e}); cancelling it",
                          RuntimeWarning)
            req.cancelled = True
            if not out.finished:
                self._out_final(req, RequestOutput(req.request_id, [], "", True, "abort", len(req.prompt_ids),
                                                   out.completion_tokens))

    # -- synchronous use (tests, offline) ----------------------------------------------------------
    def run_until_done(self, max_steps: int = 1_000_000) -> None:
        for _ in range(max_steps):
            if not self.step() and not self.scheduler.has_work() and not self._inbox:
                return
        raise RuntimeError(f"requests still running after {max_steps} steps")

    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams],
                 adapters: list[str | None] | None = None) -> list[Request]:
        """Submit all, step until done (no thread), return the finished requests in order."""
        params = params if isinstance(params, list) else [params] * len(prompts)
        adapters = adapters or [None] * len(prompts)
        reqs = [self.submit(list(p), sp, adapter=a) for p, sp, a in zip(prompts, params, adapters)]
        self.run_until_done()
        return reqs

    # -- adapters (engine thread) ------------------------------------------------------------------
    def _load(self, name: str, path: str, read=None, shown: str | None = None,
              source: tuple[bool, int | None] = (False, None)) -> AdapterEntry:
        import fastadapters as fa
        from ..config import PrefixConfig
        from ..patching import _prefix_encoders

        if name in self.registry.entries:
            raise AdapterError(f"an adapter named {name!r} is already loaded; unload it first to replace it")
        internal = self.registry.new_internal_name()
        shown = path if shown is None else shown  # what messages and /v1/models quote (a private copy is not)
        try:
            fa.load_adapter(self.model, path, name=internal, read=read)
        except FileNotFoundError as e:
            raise AdapterError(f"no adapter at {shown!r}: {str(e).replace(path, shown)}") from None
        except (ValueError, KeyError, OSError, RuntimeError) as e:
            raise AdapterError(f"could not load an adapter from {shown!r}: {str(e).replace(path, shown)}") from None
        fa.set_adapter(self.model, None)  # requests choose adapters; none is active between them
        bad = nonfinite_adapter_tensor(self.model, internal)
        if bad is not None:  # NaN/inf weights would poison every row they touch: refuse, change nothing
            self._delete_internal(internal)
            raise AdapterError(f"the adapter {name!r} has non-finite (NaN or inf) weights in {bad}; refusing to load it")
        if self.max_loras is not None:
            from .store import configure, get_store

            if get_store(self.model).max_slots != self.max_loras:  # once: max_loras device slots, LRU
                configure(self.model, max_slots=self.max_loras)
                self._router = None  # it held the previous store
        cfg = fa.get_config(self.model, internal)
        entry = AdapterEntry(name, shown, internal, cfg.adapter_type, created=int(time.time()))
        entry.metadata["source"] = source  # how a reload after max_cpu_loras dropped it reads the files again
        if isinstance(cfg, PrefixConfig):
            with torch.no_grad():
                kv = _prefix_encoders(self.model)[internal](1, self.dtype)
            entry.prefix_kv = [(k[0].detach().clone(), v[0].detach().clone()) for k, v in kv]
            if cfg.num_virtual_tokens >= self.max_model_len - 1:
                self._delete_internal(internal)
                raise AdapterError(f"the prefix of {name!r} has {cfg.num_virtual_tokens} positions, more than the "
                                   f"context of {self.max_model_len} allows")
        self.registry.entries[name] = entry
        if not isinstance(cfg, PrefixConfig):  # max_cpu_loras counts routed adapters (a prefix is KV)
            self._in_memory[internal] = entry
            self._enforce_cpu_limit()
        return entry

    # -- max_cpu_loras: adapters kept in memory (engine thread) --------------------------------------
    def _enforce_cpu_limit(self) -> None:
        """Drop the least recently used idle adapters (no live request) beyond ``max_cpu_loras`` from
        memory; they stay registered and are reloaded from their files when a request needs them.
        Adapters with live requests are never dropped, so while more than ``max_cpu_loras`` are in
        use, that many stay in memory until their requests finish."""
        if self.max_cpu_loras is None:
            return
        over = len(self._in_memory) - self.max_cpu_loras
        dropped = 0
        for internal, entry in list(self._in_memory.items()):
            if over <= 0:
                break
            if entry is None or entry.refs > 0:
                continue
            del self._in_memory[internal]
            self._delete_internal(internal)
            entry.metadata["evicted"] = True
            self.stats["adapters_dropped_from_memory"] += 1
            over -= 1
            dropped += 1
        if dropped and self._in_memory:
            from .store import get_store

            # the store lets go of their stacked copies now (not at the next step), and a reload under
            # the same internal name is then a new adapter to it, copied from the reloaded weights
            get_store(self.model).sync(weights=False)

    def _reload(self, entry: AdapterEntry, read=None) -> None:
        """Load a dropped adapter again from its file, under its internal name."""
        import fastadapters as fa

        try:
            fa.load_adapter(self.model, entry.path, name=entry.internal, read=read)
        except (ValueError, KeyError, OSError, RuntimeError) as e:
            raise AdapterError(f"the adapter {entry.name!r} was dropped from memory (max_cpu_loras="
                               f"{self.max_cpu_loras}) and could not be reloaded from {entry.path!r}: {e}") from None
        fa.set_adapter(self.model, None)
        bad = nonfinite_adapter_tensor(self.model, entry.internal)
        if bad is not None:
            self._delete_internal(entry.internal)
            raise AdapterError(f"the adapter {entry.name!r} reloaded from {entry.path!r} has non-finite weights in "
                               f"{bad}; refusing it")
        entry.metadata.pop("evicted", None)
        # a new prefix-cache scope: the files may have changed since the blocks cached under the
        # internal name were computed (no request of it was live when it was dropped, and every
        # request of it from now on passes the intake after this reload, which gives it this scope)
        self._reloads += 1
        entry.metadata["cache_scope"] = f"{entry.internal}#reload{self._reloads}"
        self._in_memory[entry.internal] = entry
        self.stats["adapters_reloaded"] += 1
        self._enforce_cpu_limit()

    def _unload(self, name: str) -> None:
        entry = self.registry.get(name)
        del self.registry.entries[name]
        entry.unloaded = True
        self._in_memory.pop(entry.internal, None)
        if entry.refs == 0:  # else the last running request on it deletes it (_drop_ref)
            self._delete_internal(entry.internal)

    def _delete_internal(self, internal: str) -> None:
        import fastadapters as fa

        if internal in fa.adapter_names(self.model):
            fa.delete_adapter(self.model, internal)
            if fa.adapter_names(self.model):
                fa.set_adapter(self.model, None)

    def _drop_ref(self, req: Request) -> None:
        entry = req.metadata.pop("entry", None)
        if entry is None:
            return
        entry.refs -= 1
        if entry.unloaded and entry.refs == 0:
            self._in_memory.pop(entry.internal, None)
            self._delete_internal(entry.internal)
        elif entry.refs == 0 and self.max_cpu_loras is not None:
            self._enforce_cpu_limit()

    # -- one step ----------------------------------------------------------------------------------
    def _intake(self) -> None:
        with self._lock:
            commands, self._commands = self._commands, collections.deque()
            for fn, fut in commands:
                if not fut.set_running_or_notify_cancel():
                    continue  # its caller timed out and withdrew it: it must not happen later
                try:
                    fut.set_result(fn())
                except BaseException as e:  # handed to the caller's thread
                    fut.set_exception(e)
            while self._inbox:
                req = self._inbox.popleft()
                if req.request_id in self._aborts:
                    continue  # finished below
                entry = req.metadata.get("entry")
                reread = req.metadata.pop("reread", None)
                if entry is not None and entry.internal in self._in_memory:
                    self._in_memory.move_to_end(entry.internal)  # max_cpu_loras' LRU order
                elif entry is not None and entry.metadata.get("evicted"):
                    try:
                        if isinstance(reread, AdapterError):
                            raise reread
                        self._reload(entry, reread)  # reread: the files submit read (None: read here)
                    except AdapterError as e:  # its file went away or changed: this request ends alone
                        self.stats["request_errors"] += 1
                        self._finish(req, "error", error=str(e))
                        continue
                if entry is not None:  # after a reload: the keys/values of the weights it runs on now
                    req.cache_scope = entry.metadata.get("cache_scope", entry.internal)
                self.scheduler.waiting.append(req)
            for rid in list(self._out_finish):  # ended by the output thread: a stop string, a failed callback
                req = self.requests.get(rid)
                if req is None:
                    self._out_finish.pop(rid, None)
                else:
                    self._finish(req, "stop")  # the reason the output thread recorded replaces this
            aborts, self._aborts = self._aborts, set()
            for rid in aborts:
                req = self.requests.get(rid)
                if req is not None:
                    req.cancelled = True
                    self._finish(req, "abort")

    def step(self) -> bool:
        """Run one iteration; False if there was nothing to run."""
        if self._out_thread is None:
            return self._step()
        self._await_outputs()  # the output thread is at most one step behind when this one starts
        try:
            return self._step()
        finally:
            self._post()  # this step's outputs: made by the output thread while the next step runs

    def _step(self) -> bool:
        self._intake()
        batch = self.scheduler.schedule()
        if not batch.requests:
            return False
        try:
            logits = self._forward(batch)
            self._take_tokens(batch, logits)
        except Exception as e:  # the step itself failed: none of its requests may be left half-advanced
            msg = f"{type(e).__name__}: {e}"
            self.last_error = msg
            for req in batch.requests:
                self._finish(req, "error", error=msg)
            raise
        return True

    def _take_tokens(self, batch, logits: torch.Tensor) -> None:
        """Advance the batch's requests past this step's tokens and sample where a prompt is done."""
        with self._lock:
            self.stats["steps"] += 1
            rows, done = [], []
            head_rows = batch.head_rows  # per request (first logits row, rows); None: one row each
            for i, (req, n) in enumerate(zip(batch.requests, batch.num_new)):
                if req.status is not Status.RUNNING:
                    continue
                if head_rows is not None:  # prompt log-probabilities of this chunk (when it asked: a 1-token chunk too)
                    self._prompt_logprobs(req, logits, *head_rows[i])
                cached = req.metadata.pop("cached_tokens", 0)
                if cached and req.preemptions == 0:
                    self.stats["prefix_cache_hit_tokens"] += cached
                    self.stats["prompt_tokens"] += cached
                if req.num_computed < len(req.prompt_ids):
                    self.stats["prompt_tokens"] += min(n, len(req.prompt_ids) - req.num_computed) \
                        if req.preemptions == 0 else 0
                req.num_computed += n
                self.scheduler.commit_blocks(req)
                if req.num_computed < req.num_tokens:
                    continue  # a prefill chunk: more to come
                rows.append(i if head_rows is None else head_rows[i][0] + head_rows[i][1] - 1)
                done.append(req)
            if not rows:
                return
            x = logits if len(rows) == logits.shape[0] else logits.index_select(
                0, torch.tensor(rows, device=logits.device))
            processed = [j for j, r in enumerate(done) if r.params.processed]
            if processed:  # logits processors (penalties, logit_bias, min_tokens): only these rows pay
                states = []
                for j in processed:
                    req = done[j]
                    st = req.metadata.get("logits_state")
                    if st is None:
                        st = req.metadata["logits_state"] = LogitsState(req.params, x.shape[-1], x.device, self.eos_ids)
                    st.update(req.prompt_ids, req.output_ids)
                    states.append(st)
                raw, x = x, process_rows(x, processed, states, [len(done[j].output_ids) for j in processed])
            else:
                raw = x
            structured = [j for j, r in enumerate(done) if "matcher" in r.metadata]
            grammar_s: dict[int, float] = {}  # per structured row: its matcher's time for this token
            if structured:  # the grammar's allowed next tokens, after the processors (vLLM's order)
                took: list[float] = []
                x = mask_rows(x, structured, [done[j].metadata["matcher"] for j in structured], aliased=x is raw,
                              seconds=took)
                grammar_s = dict(zip(structured, took))
            tokens, errors = sample_rows(x, [r.params for r in done], [r.generator for r in done])
            asked = [j for j, r in enumerate(done) if r.params.logprobs is not None and errors[j] is None]
            lps = dict(zip(asked, token_logprobs(raw, asked, [done[j].params.logprobs for j in asked], tokens))) \
                if asked else {}
            for j, (req, token, error) in enumerate(zip(done, tokens, errors)):
                if error is not None:  # this request's numbers went wrong: it ends alone
                    self.stats["request_errors"] += 1
                    req.metadata["counted_error"] = True
                    self._finish(req, "error", error=error)
                    continue
                matcher = req.metadata.get("matcher")
                if matcher is not None:
                    t0 = time.perf_counter()
                    accepted = matcher.accept_token(token)
                    ms = 1e3 * (grammar_s.get(j, 0.0) + time.perf_counter() - t0)
                    why = None
                    if not accepted:  # a token its mask forbade
                        why = f"token {token} is not allowed by the request's grammar ({req.params.structured.source})"
                    elif ms <= self.max_grammar_ms:
                        req.metadata["grammar_slow"] = 0
                    else:  # one request's grammar must not slow every other request (three tokens in a row: a
                        # grammar that grows costly, not a pause of the thread)
                        slow = req.metadata["grammar_slow"] = req.metadata.get("grammar_slow", 0) + 1
                        if slow >= GRAMMAR_SLOW_TOKENS:
                            why = (f"the request's grammar ({req.params.structured.source}) took {ms:.0f} ms for a "
                                   f"token, more than this server allows ({self.max_grammar_ms:g} ms, "
                                   f"--max-grammar-ms) for {slow} tokens in a row; an ambiguous grammar costs more "
                                   "per token as the output grows: make it unambiguous")
                    if why is not None:
                        self.stats["request_errors"] += 1
                        req.metadata["counted_error"] = True
                        self._finish(req, "error", error=why)
                        continue
                req.output_ids.append(token)
                if j in lps:  # aligned with output_ids (read by the output thread by position)
                    req.metadata.setdefault("logprobs", []).append((token, *lps[j]))
                self.stats["generation_tokens"] += 1
                try:
                    self._after_token(req, token)
                except Exception as e:  # e.g. its detokenisation failed: it ends alone, the step goes on
                    self.stats["request_errors"] += 1
                    self._finish(req, "error", error=f"{type(e).__name__}: {e}")

    def head(self):
        """The LM head callable, re-derived when the model's output layer changed (e.g. an adapter
        wrapped it)."""
        head = self._lm_head
        if getattr(head, "layer", head) is not self.model.get_output_embeddings():
            head = self._lm_head = lm_head(self.model, self.device, pack=self.pack_weights)
        return head

    def _forward(self, batch) -> torch.Tensor:
        reqs, news = batch.requests, batch.num_new
        graphs = self._graphs
        # requests that asked for prompt log-probabilities take the LM head on every prompt position
        # of their chunk (the others on their last position only)
        scoring = [r.params.prompt_logprobs is not None and r.num_computed < len(r.prompt_ids) for r in reqs]
        if graphs is not None and len(reqs) <= graphs.max_size and all(n == 1 for n in news) and not any(scoring):
            try:
                logits = graphs.run(reqs, [r.route_name for r in reqs])
            except Exception as e:
                if self._graphs_required:
                    raise
                # a capture that failed here would fail again (and one that failed half way may have left
                # CUDA state behind): eager from now on, said once for this engine
                self._graphs = None
                warnings.warn(f"fastadapters serving: a decode step from a CUDA graph failed ({type(e).__name__}: "
                              f"{e}); this engine runs every step eagerly from now on (pass cuda_graphs=False / "
                              "serve --enforce-eager to skip the attempt)", RuntimeWarning, stacklevel=2)
            else:
                if logits is not None:  # (None: a step too long for a graph, run eagerly below)
                    self.last_tables = None
                    self.stats["graph_steps"] += 1
                    return logits
        dev = self.device
        bs = self.pool.block_size
        ids, pos, slots, segments, last = [], [], [], [], []
        t = 0
        fi = self._flashinfer  # FlashInfer reads block tables and masks from its own page tables
        for req, n in zip(reqs, news):
            ids.extend(req.tokens(req.num_computed, n))
            start = req.kv_len
            pos.extend(range(start, start + n))
            blocks = req.blocks
            slots.extend([blocks[p // bs] * bs + p % bs for p in range(start, start + n)])
            if req.contiguous:
                seg = Segment(t, n, start + n, None, blocks[0])
            else:
                table = req.block_table[:len(blocks)]
                seg = Segment(t, n, start + n, table if fi is not None or table.device == dev else table.to(dev), -1)
            if n > 1 and fi is None:
                if start == 0:
                    seg.causal = True
                else:
                    seg.mask = chunk_mask(start, n, dev)
            segments.append(seg)
            t += n
            last.append(t - 1)
        if any(scoring):
            from ..layers import AdapterLinear

            # an adapted LM head is routed one name per row or per token: it takes every token
            every = isinstance(self.model.get_output_embeddings(), AdapterLinear)
            head_rows, head_idx, t = [], [], 0
            for req, n, sc in zip(reqs, news, scoring):
                lo = t if (sc or every) else t + n - 1
                head_rows.append((len(head_idx), t + n - lo))
                head_idx.extend(range(lo, t + n))
                t += n
            batch.head_rows, last = head_rows, head_idx
        # the step's index data in one host tensor; on CUDA pinned and copied without a sync
        host = torch.tensor(ids + pos + last + slots, dtype=torch.long)
        if dev.type == "cuda":
            host = host.pin_memory()
        flat = host.to(dev, non_blocking=True)
        t_all = len(ids)
        input_ids = flat[:t_all].view(1, -1)
        position_ids = flat[t_all:2 * t_all].view(1, -1)
        last_index = flat[2 * t_all:2 * t_all + len(last)]
        tables = StepTables(flat[2 * t_all + len(last):], segments)
        if fi is not None:
            tables.extra["flashinfer"] = fi.step(segments, [r.block_table for r in reqs], bs)
        elif self.decode_batch_max_len and len(reqs) > 1:
            tables.decode = decode_batch(segments, [r.block_table for r in reqs], bs, dev, self.decode_batch_max_len)
        args = (self.model, input_ids, position_ids, self.pool, tables, last_index, self.head())
        from ..patching import _state

        state = _state(self.model)
        names = [r.route_name for r in reqs]
        # a batch of base-model and prefix requests skips routing (and its per-step set-up) when no
        # adapter is active: its linears are the bare base layers, so base rows pay nothing for adapters
        if state is not None and (state.active is not None or any(n is not None for n in names)):
            from .routing import route

            # consecutive decode steps of one set: route reuses the last router (it checks names and lengths)
            with route(self.model, names, backend=self.backend, lengths=list(news), reuse=self._router) as router, \
                    self.onednn_linears.active():
                logits = paged_forward(*args)
            self._router = router
        else:
            with self.onednn_linears.active():
                logits = paged_forward(*args)
        self.last_tables = tables
        self.stats["attention_score_elements"] += tables.score_elements
        self.stats["kv_bytes_gathered"] += tables.gathered_bytes
        return logits

    # -- outputs -----------------------------------------------------------------------------------
    def _after_token(self, req: Request, token: int) -> None:
        reason = None
        matcher = req.metadata.get("matcher")
        if (not req.params.ignore_eos and token in self.eos_ids) or token in req.params.stop_token_ids \
                or (matcher is not None and matcher.is_terminated()):  # (a grammar ends on its stop token: EOS)
            reason = "stop"  # its text is left out (``_new_text``)
        elif len(req.output_ids) >= req.params.max_tokens or req.prefix_len + req.num_tokens >= self.max_model_len:
            reason = "length"
        if self._out_thread is not None:  # the output thread makes the text and the output (_process_event)
            n = len(req.output_ids)
            if reason is not None:
                self._finish(req, reason, emit=False)  # its blocks go now; its final output comes from this token
            self._out_pending.append((req, token, n, reason, None))
            return
        text = ""
        if self.tokenizer is not None:
            text, reason = self._new_text(req, reason)
        if reason is not None:
            self._finish(req, reason, last=[token], text=text)
        else:
            n = len(req.output_ids)
            self._emit(req, RequestOutput(req.request_id, [token], text, False, None, len(req.prompt_ids), n,
                                          logprobs=self._token_logprobs(req, n - 1, n),
                                          prompt_logprobs=self._prompt_entries(req, n)))

    def _new_text(self, req: Request, reason: str | None, ids: list[int] | None = None) -> tuple[str, str | None]:
        """The text this token makes final, and the finish reason (a stop string sets "stop").

        Work per token is bounded by the newest tokens' text and the stop strings' lengths, not the
        output's length: the detokeniser decodes a short window (``detokenizer.py``), and stop
        strings are searched in the text not yet emitted plus the last ``max(len(stop))`` emitted
        characters (a stop may begin there). Same text and reasons as decoding the whole output
        each time. ``ids``: the output's ids (default ``req.output_ids``; the output thread's copy)."""
        state = req.metadata.get("detok")
        if state is None:  # the output is read after the prompt's last tokens (detokenizer.py)
            state = req.metadata["detok"] = DetokState.after(req.prompt_ids)
            req.metadata["held"], req.metadata["skip"] = "", 0
        ids = req.output_ids if ids is None else ids
        # stop strings count from min_tokens on (vLLM's rule; EOS and stop tokens are held back until then too)
        stops = req.params.stop if len(ids) >= req.params.min_tokens else []
        if reason == "stop" and not req.params.include_stop_str_in_output:
            ids = ids[:-1]  # an EOS or a stop token ended it (a stop string is found below): not its text
        committed, pending = detokenize(self.tokenizer, ids, state, req.params.skip_special_tokens)
        # held: decoded text not yet emitted; skip: its first characters that were emitted anyway
        # (a space before a split character, emitted while the character was still pending)
        held = req.metadata["held"] + committed
        skip = req.metadata["skip"]
        unemitted = (held + pending)[skip:]  # the whole output's decoding minus what was emitted
        ctx = req.text[-max(len(s) for s in stops):] if stops and req.text else ""
        window = ctx + unemitted
        # a hit must end in the new text (one wholly in ctx was found before, or came before min_tokens)
        hits = [(i, len(s)) for s in stops for i in (window.find(s, max(0, len(ctx) - len(s) + 1)),) if i >= 0]
        if hits:  # the earliest; the text ends before it (after it with include_stop_str_in_output)
            at, n = min(hits)
            end = at + n if req.params.include_stop_str_in_output else at
            unemitted, reason = unemitted[:max(0, end - len(ctx))], "stop"
        if reason is not None:
            out = unemitted
        else:
            stable = self._stable_prefix(ctx + unemitted, stops)
            out = unemitted[:max(0, len(stable) - len(ctx))]
        used = skip + len(out)
        if used <= len(held):
            req.metadata["held"], req.metadata["skip"] = held[used:], 0
        else:
            req.metadata["held"], req.metadata["skip"] = "", used - len(held)
        req.text += out
        return out, reason

    @staticmethod
    def _stable_prefix(text: str, stops: list[str]) -> str:
        """``text`` less what may still change: a partial UTF-8 character, the start of a stop string."""
        text = text.rstrip("\ufffd")
        hold = 0
        for s in stops:
            for k in range(min(len(s) - 1, len(text)), 0, -1):
                if text.endswith(s[:k]):
                    hold = max(hold, k)
                    break
        return text[:len(text) - hold]

    def _emit(self, req: Request, out: RequestOutput) -> None:
        if req.on_output is None:
            return
        try:
            req.on_output(out)
        except Exception as e:  # a broken consumer cancels its own request, never the engine
            warnings.warn(f"output callback of {req.request_id} failed ({type(e).__name__}: {e}); cancelling it",
                          RuntimeWarning)
            req.cancelled = True
            if req.status is not Status.FINISHED:
                self._finish(req, "abort")

    def _finish(self, req: Request, reason: str, last: list[int] | None = None, text: str = "",
                error: str | None = None, emit: bool = True) -> None:
        """Engine thread: free ``req`` and count its finish; its final output is emitted here (inline)
        or handed to the output thread (``emit=False``: the output thread makes it from a token)."""
        with self._lock:
            if req.status is Status.FINISHED:
                return
            decided = self._out_finish.pop(req.request_id, None)
            if decided is not None:  # the output thread ended it and emitted its final output already
                reason, n = decided
                del req.output_ids[n:]  # tokens generated past its final output: dropped
                emit = False
            self.scheduler.release(req)
            req.status = Status.FINISHED
            req.finish_reason = reason
            self.requests.pop(req.request_id, None)
            self._drop_ref(req)
            self.stats[f"finished_{reason}"] += 1
        if not emit:
            return
        n = len(req.output_ids)
        out = RequestOutput(req.request_id, last or [], text, True, reason, len(req.prompt_ids), n, error,
                            logprobs=self._token_logprobs(req, n - len(last or []), n),
                            prompt_logprobs=self._prompt_entries(req, n) if last else None)
        if self._out_thread is not None:
            self._out_pending.append((req, None, 0, reason, out))
        else:
            self._emit(req, out)

    def _prompt_logprobs(self, req: Request, logits: torch.Tensor, first: int, rows: int) -> None:
        """Record the log-probabilities of the prompt tokens this step's chunk of ``req`` predicts
        (row r, at token position p, predicts token p + 1; the prompt's first token has none)."""
        if req.params.prompt_logprobs is None:
            return
        plen, start = len(req.prompt_ids), req.num_computed
        count = min(rows, plen - 1 - start)  # the row at the prompt's last position predicts an output
        if count <= 0:
            return
        targets = req.prompt_ids[start + 1:start + 1 + count]
        ranks = req.params.prompt_ranks
        got = token_logprobs(logits[first:first + count], list(range(count)), [req.params.prompt_logprobs] * count,
                             targets, ranks=ranks)
        table = req.metadata.setdefault("prompt_logprobs", [None] * plen)
        for j, (tok, entry) in enumerate(zip(targets, got)):
            table[start + 1 + j] = (tok, *entry) if ranks else (tok, *entry, None)

    @staticmethod
    def _prompt_entries(req: Request, n: int) -> list | None:
        """The prompt's log-probability entries, on the output of a request's first token (``n``: the
        tokens generated with this output)."""
        if req.params.prompt_logprobs is None or n != 1:
            return None
        # a copy: a request preempted later recomputes its prompt into the table while the output is read
        return list(req.metadata.get("prompt_logprobs") or [None] * len(req.prompt_ids))

    @staticmethod
    def _token_logprobs(req: Request, start: int, end: int) -> list | None:
        """The log-probability entries of output tokens [start, end) (None: the request asked for none)."""
        if req.params.logprobs is None:
            return None
        return req.metadata.get("logprobs", [])[start:end]

    # -- introspection (metrics, leak checks) --------------------------------------------------------
    def snapshot(self) -> dict:
        with self._lock:
            return {"running": len(self.scheduler.running),
                    "waiting": len(self.scheduler.waiting) + len(self._inbox),
                    "running_adapters": sorted({r.adapter for r in self.scheduler.running if r.adapter}),
                    "waiting_adapters": sorted({r.adapter for r in list(self.scheduler.waiting) + list(self._inbox)
                                                if r.adapter}),
                    "used_blocks": self.pool.used_blocks, "free_blocks": self.pool.free_blocks,
                    "live_requests": len(self.requests), "stats": dict(self.stats)}

    def _eos_ids(self) -> set[int]:
        ids: set[int] = set()
        for src in (getattr(self.model, "generation_config", None), self.tokenizer):
            e = getattr(src, "eos_token_id", None) if src is not None else None
            if isinstance(e, int):
                ids.add(e)
            elif isinstance(e, (list, tuple)):
                ids.update(int(x) for x in e)
        return ids
