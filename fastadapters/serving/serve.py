"""``fastadapters serve``: load a base model and adapters, then run the OpenAI-compatible server.

    fastadapters serve --base-model DIR [--gguf-file NAME.gguf] [--served-model-name NAME]
                       [--adapter NAME=PATH ...] [--adapter-root DIR ...] [--host 127.0.0.1] [--port 8000] ...

``--base-model`` is a transformers model folder; ``--gguf-file NAME`` loads the GGUF file of that
name inside it (dequantised), the same flags as ``train`` and ``eval`` (a path ending in ``.gguf``
is still taken as folder + file). The model goes to the GPU when there is one. ``--dtype auto`` is
float32 on the CPU and the checkpoint's own dtype on a GPU. Adapters named with ``--adapter`` are
loaded at start-up from anywhere; ``--adapter-root`` turns on runtime loading, confined to those
folders (a relative ``lora_path`` is taken under the root, never the server's working directory).
``main(argv)`` returns the exit code: 2 with one line on stderr for bad flags or inputs.

Hardening, each with a flag and its default in ``--help``: request body / header size limits, a
body read timeout and the keep-alive timeout (uvicorn's), stop-string limits, a size limit for
runtime-loaded adapters, ``--api-key`` (or ``FASTADAPTERS_API_KEY``) for Bearer auth on ``/v1/*``
(the load / unload routes refuse to run on a non-loopback address without one unless
``--allow-unauthenticated-admin``), a ``/health`` watchdog bound. SIGTERM (or Ctrl-C) drains for
up to ``--shutdown-timeout`` seconds, then aborts what is left and exits; a second SIGTERM exits at
once. One access-log line per request and a shutdown line go to stderr.
"""
from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import signal
import sys

from ..cli import CommandParser, UsageError
from .tool_parsers import PARSERS

__all__ = ["main", "build_parser", "load_base", "build_app"]

DTYPES = ("auto", "float32", "bfloat16", "float16")


def _positive(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {v}")
    return v


def _seconds(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds > 0, got {text!r}") from None
    if not v > 0 or v == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a number of seconds > 0, got {v}")
    return v


def build_parser() -> argparse.ArgumentParser:
    from .protocol import Limits  # pydantic only: --help imports no torch

    lim = Limits()
    # the shared parser (its help shows defaults), with plain argparse's prefix abbreviations (as this command has had)
    p = CommandParser(prog="fastadapters serve",
                      description="OpenAI-compatible server for one base model and many adapters. The base model "
                                  "is a transformers folder, or a GGUF file in it with --gguf-file (dequantised).",
                      allow_abbrev=True)
    p.add_argument("--base-model", required=True, metavar="DIR",
                   help="transformers model folder (with --gguf-file: the folder holding the GGUF file)")
    p.add_argument("--gguf-file", metavar="NAME", default=None,
                   help="load the base model from this GGUF file inside --base-model, dequantised (as train and "
                        "eval); --base-model DIR/NAME.gguf is taken the same way")
    p.add_argument("--served-model-name", default=None, metavar="NAME",
                   help="the base model's id in the API (default: --base-model)")
    p.add_argument("--adapter", action="append", default=None, metavar="NAME=PATH",
                   help="an adapter to load at start (repeatable)")
    p.add_argument("--adapter-root", action="append", default=None, metavar="DIR",
                   help="allow runtime loading of adapters from under DIR (repeatable); a relative lora_path is "
                        "taken under the root")
    p.add_argument("--host", default="127.0.0.1", metavar="ADDR", help="address to bind")
    p.add_argument("--port", type=int, default=8000, metavar="N", help="port to bind")
    p.add_argument("--dtype", default="auto", choices=DTYPES, help="model dtype (auto: float32 on the CPU)")
    p.add_argument("--max-num-seqs", type=_positive, default=16, metavar="N", help="requests in the running batch")
    p.add_argument("--max-model-len", type=_positive, default=None, metavar="N",
                   help="context length, prompt + output (default: the model's positions)")
    p.add_argument("--allow-long-max-model-len", action="store_true",
                   help="accept a --max-model-len beyond the model's position embeddings (its output there is "
                        "not what it was trained for)")
    p.add_argument("--max-waiting", type=_positive, default=None, metavar="N",
                   help="queued requests before 503 (default: 4 x max-num-seqs)")
    p.add_argument("--block-size", type=_positive, default=16, metavar="N", help="KV positions per block")
    p.add_argument("--kv-cache-gb", type=float, default=None, metavar="GB",
                   help="memory for KV blocks (default: half the free GPU memory, or 2 GB on the CPU)")
    p.add_argument("--max-loras", type=_positive, default=None, metavar="N",
                   help="adapters resident in device slots at once, least recently used evicted; a request whose "
                        "adapter is not resident waits for a slot (default: every loaded adapter)")
    p.add_argument("--max-cpu-loras", type=_positive, default=None, metavar="N",
                   help="adapters kept in memory, at least --max-loras; the least recently used idle ones beyond "
                        "it are dropped and reloaded from their files when a request needs them (default: all)")
    p.add_argument("--max-grammar-ms", type=float, default=20.0, metavar="MS",
                   help="a structured-output request (response_format json, guided_*, tool_choice) whose grammar takes "
                        "longer than this for one token ends with an error, so it cannot slow the other requests")
    p.add_argument("--max-grammar-compile-s", type=float, default=10.0, metavar="S",
                   help="a structured output whose grammar (a JSON schema, regex, choice list, grammar or structural "
                        "tag) takes longer than this to compile is refused with a 400; compiling runs in a child "
                        "process that is stopped then, so it cannot hold up the server (default: 10)")
    p.add_argument("--enable-auto-tool-choice", action="store_true",
                   help="chat requests with tools may leave tool_choice 'auto' (its default): the reply is text "
                        "and tool calls, parsed by --tool-call-parser, each call held to a request's tool by a "
                        "grammar (needs xgrammar: fastadapters[structured]; pythonic's calls are not held, and a "
                        "malformed one is text); without it 'auto' is a 400")
    p.add_argument("--tool-call-parser", choices=PARSERS, default=None,
                   help="the format of tool calls in a reply, for --enable-auto-tool-choice: hermes "
                        "(<tool_call>{\"name\": ..., \"arguments\": {...}}</tool_call>; Hermes, Qwen), llama3_json "
                        "({\"name\": ..., \"parameters\": {...}}, several separated by ';'; Llama 3.1-3.3, "
                        "Llama 4's JSON template), mistral ([TOOL_CALLS] and a JSON array of {\"name\": ..., "
                        "\"arguments\": {...}}; Mistral 7B v0.3, Nemo, Small) or pythonic ([f(a=1), g(b='x')] as "
                        "the whole reply; Llama 3.2, Llama 4; not held to the tools by a grammar)")
    p.add_argument("--no-prefix-caching", action="store_true",
                   help="do not reuse the KV blocks of a prompt prefix computed for an earlier request of the same "
                        "adapter (default: reuse them)")
    p.add_argument("--threads", type=_positive, default=None, metavar="N",
                   help="torch intra-op threads for the model on the CPU (default: OMP_NUM_THREADS when set, else "
                        "the usable cores less one, at least 1: the spare core runs the HTTP server and the "
                        "tokenizer, as vLLM's CPU backend reserves one for its front end)")
    p.add_argument("--weight-packing", default="auto", choices=("auto", "on", "off"),
                   help="on the CPU, run the linears (and the LM head) from copies of their weights packed for "
                        "oneDNN: 1.3-1.9x faster at 2-32 rows, for the weights' memory once more; auto (default): "
                        "packed when the copies take at most half the available memory, else warned and unpacked")
    p.add_argument("--attention-backend", default="auto", choices=("auto", "sdpa", "flashinfer"),
                   help="the engine's paged attention: auto = FlashInfer on CUDA (fp16/bf16) when flashinfer-python "
                        "is installed, else per-request SDPA; sdpa never imports flashinfer")
    p.add_argument("--backend", default="auto", choices=("auto", "torch", "triton", "cuda", "cpp"),
                   help="multi-adapter kernels")
    p.add_argument("--enforce-eager", action="store_true",
                   help="never run decode steps from CUDA graphs (default on CUDA: decode steps replay graphs "
                        "captured per padded batch size; not yet run on a GPU)")
    p.add_argument("--cuda-graph-sizes", type=_positive, nargs="+", default=None, metavar="N",
                   help="padded batch sizes to capture decode graphs for (default: 1 2 4 8 and multiples of 8 up to "
                        "--max-num-seqs)")
    g = p.add_argument_group("security and limits")
    g.add_argument("--api-key", default=None, metavar="KEY",
                   help="require 'Authorization: Bearer KEY' on /v1/* (default: $FASTADAPTERS_API_KEY, else none)")
    g.add_argument("--allow-unauthenticated-admin", action="store_true",
                   help="allow /v1/load_lora_adapter and /v1/unload_lora_adapter without --api-key on a "
                        "non-loopback --host (refused otherwise)")
    g.add_argument("--max-adapter-bytes", type=_positive, default=None, metavar="BYTES",
                   help="size limit of a runtime-loaded adapter folder (default: a rank-128 LoRA on every linear "
                        "layer of the base model, in float32)")
    g.add_argument("--max-request-bytes", type=_positive, default=lim.max_request_bytes, metavar="BYTES",
                   help="request body size limit (413 beyond)")
    g.add_argument("--max-header-bytes", type=_positive, default=lim.max_header_bytes, metavar="BYTES",
                   help="request headers size limit (431 beyond)")
    g.add_argument("--body-timeout", type=_seconds, default=lim.body_timeout, metavar="S",
                   help="seconds to receive a request's whole body (408 beyond)")
    g.add_argument("--header-timeout", type=_seconds, default=30.0, metavar="S",
                   help="seconds a connection may take to send a request's headers (a client trickling them "
                        "byte by byte is closed; uvicorn itself has no such bound)")
    g.add_argument("--timeout-keep-alive", type=_seconds, default=5.0, metavar="S",
                   help="seconds an idle keep-alive connection stays open")
    g.add_argument("--max-stop-strings", type=_positive, default=lim.max_stop, metavar="N",
                   help="stop strings per request")
    g.add_argument("--max-stop-chars", type=_positive, default=lim.max_stop_chars, metavar="N",
                   help="characters per stop string")
    g.add_argument("--health-stall-seconds", type=_seconds, default=lim.stall_seconds, metavar="S",
                   help="/health answers 503 when the engine completed no step this long while work waited")
    g.add_argument("--shutdown-timeout", type=_seconds, default=5.0, metavar="S",
                   help="on SIGTERM, seconds to let running requests finish before aborting them")
    g.add_argument("--no-access-log", action="store_true", help="no per-request log line")
    return p


def _split_gguf(path: str, gguf_file: str | None) -> tuple[str, str | None]:
    """(folder, GGUF file name or None) from --base-model / --gguf-file (a path ending in .gguf: its
    folder and name)."""
    if gguf_file is None and path.endswith(".gguf"):
        return os.path.dirname(path) or ".", os.path.basename(path)
    return path, gguf_file


def load_base(path: str, dtype: str = "auto", gguf_file: str | None = None):
    """(model, tokenizer) from a folder (and a GGUF file in it) or a .gguf path; float32 on the CPU
    unless told otherwise."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, gguf = _split_gguf(path, gguf_file)
    kw = {"gguf_file": gguf} if gguf else {}
    cuda = torch.cuda.is_available()
    if dtype == "auto":
        torch_dtype = "auto" if cuda else torch.float32
    else:
        torch_dtype = getattr(torch, dtype)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch_dtype, **kw)
    tokenizer = AutoTokenizer.from_pretrained(folder, **kw)
    if cuda:
        model = model.to("cuda")
    return model.eval(), tokenizer


def model_positions(model) -> int | None:
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    n = getattr(cfg, "max_position_embeddings", None)
    return int(n) if n else None


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def cpu_threads(requested: int | None) -> tuple[int, str]:
    """(torch intra-op threads for a CPU model, where the number came from)."""
    if requested is not None:
        return requested, "--threads"
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env.isdigit() and int(env) >= 1:
        return int(env), "OMP_NUM_THREADS"
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return max(1, cores - 1), f"{cores} usable cores less one for the server"


def build_app(args):
    from .api import create_app
    from .protocol import Limits
    from .engine import Engine

    model, tokenizer = load_base(args.base_model, args.dtype, args.gguf_file)
    positions = model_positions(model)
    if args.max_model_len and positions and args.max_model_len > positions and not args.allow_long_max_model_len:
        raise ValueError(f"--max-model-len {args.max_model_len} is beyond the model's {positions} positions "
                         f"(max_position_embeddings); valid: at most {positions}, or add --allow-long-max-model-len")
    engine = Engine(model, tokenizer, max_num_seqs=args.max_num_seqs, max_model_len=args.max_model_len,
                    block_size=args.block_size, max_waiting=args.max_waiting, max_loras=args.max_loras,
                    max_cpu_loras=args.max_cpu_loras, prefix_caching=not args.no_prefix_caching,
                    backend=None if args.backend == "auto" else args.backend, adapter_roots=args.adapter_root,
                    attention_backend=getattr(args, "attention_backend", "auto"),
                    cuda_graphs=False if getattr(args, "enforce_eager", False) else "auto",
                    cuda_graph_sizes=getattr(args, "cuda_graph_sizes", None),
                    max_grammar_ms=getattr(args, "max_grammar_ms", 20.0),
                    max_grammar_compile_s=getattr(args, "max_grammar_compile_s", 10.0),
                    pack_weights={"auto": None, "on": True, "off": False}[getattr(args, "weight_packing", "auto")],
                    kv_cache_bytes=None if args.kv_cache_gb is None else int(args.kv_cache_gb * (1 << 30)))
    for spec in args.adapter:
        name, _, path = spec.partition("=")
        engine.load_adapter(name, path, confined=False)
    limits = Limits(max_request_bytes=args.max_request_bytes, max_header_bytes=args.max_header_bytes,
                    body_timeout=args.body_timeout, max_stop=args.max_stop_strings, max_stop_chars=args.max_stop_chars,
                    stall_seconds=args.health_stall_seconds)
    return create_app(engine, served_name(args), base_path=args.base_model, limits=limits, api_key=args.api_key,
                      admin_needs_key=not (_loopback(args.host) or args.allow_unauthenticated_admin),
                      max_adapter_bytes=args.max_adapter_bytes, shutdown_timeout=args.shutdown_timeout,
                      tool_call_parser=getattr(args, "tool_call_parser", None))


def served_name(args) -> str:
    return args.served_model_name or args.base_model


def _check(args) -> None:
    """Flag checks that need no model: UsageError (exit 2, one line)."""
    from ..train import check_base_model_path

    if args.api_key is None:
        args.api_key = os.environ.get("FASTADAPTERS_API_KEY") or None
    if args.api_key is not None and (not args.api_key.strip() or not args.api_key.isprintable()
                                     or not args.api_key.isascii()):
        raise UsageError("--api-key: an empty, unprintable or non-ASCII key; valid: printable ASCII characters "
                         "(what an HTTP header carries as it is)")
    auto, parser = getattr(args, "enable_auto_tool_choice", False), getattr(args, "tool_call_parser", None)
    if auto and parser is None:
        raise UsageError(f"--enable-auto-tool-choice needs --tool-call-parser; valid: {', '.join(PARSERS)}")
    if parser is not None and not auto:
        raise UsageError("--tool-call-parser: only read with --enable-auto-tool-choice; add it (or drop the parser)")
    if auto and parser != "pythonic":  # (pythonic's calls are not constrained: no grammar to compile)
        from .structured import StructuredUnavailable, _xgrammar
        try:
            _xgrammar()
        except StructuredUnavailable as e:
            raise UsageError(f"--enable-auto-tool-choice: {e}") from None
    if not os.path.exists(args.base_model):
        raise UsageError(f"--base-model: {args.base_model!r} does not exist")
    folder, gguf = _split_gguf(args.base_model, args.gguf_file)
    if gguf is not None and args.gguf_file is not None and args.base_model.endswith(".gguf"):
        raise UsageError("--gguf-file: give the folder as --base-model, or the .gguf path alone, not both")
    if os.path.isdir(folder):
        check_base_model_path(os.path.abspath(folder), gguf)
    elif not os.path.isfile(args.base_model):
        raise UsageError(f"--base-model: {args.base_model!r} is not a model folder")
    names = set()
    for spec in args.adapter:
        name, eq, path = spec.partition("=")
        if not eq or not name or not path:
            raise UsageError(f"--adapter: got {spec!r}; valid: NAME=PATH")
        if name == served_name(args):
            raise UsageError(f"--adapter {name}: the served base model has that name, so the adapter could never "
                             "be reached; give the adapter (or --served-model-name) another name")
        if name in names:
            raise UsageError(f"--adapter {name}: named twice")
        names.add(name)
        if not os.path.isdir(path):
            raise UsageError(f"--adapter {name}: {path!r} is not a directory")
    for root in args.adapter_root:
        if not os.path.isdir(root):
            raise UsageError(f"--adapter-root: {root!r} is not a directory")
    if args.kv_cache_gb is not None and not args.kv_cache_gb > 0:
        raise UsageError(f"--kv-cache-gb: got {args.kv_cache_gb}; valid: a positive number")
    if not 0 <= args.port < 65536:
        raise UsageError(f"--port: got {args.port}; valid: 0..65535")


class _StderrHandler(logging.StreamHandler):
    """Writes to the ``sys.stderr`` of the moment, not the one at set-up."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def _access_log(enabled: bool) -> None:
    log = logging.getLogger("fastadapters.serve.access")
    log.setLevel(logging.INFO if enabled else logging.WARNING)
    if not any(isinstance(h, _StderrHandler) for h in log.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
        log.addHandler(handler)
        log.propagate = False


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser().parse_args(argv)
        args.adapter, args.adapter_root = args.adapter or [], args.adapter_root or []
        _check(args)
    except UsageError as e:
        print(f"fastadapters serve: error: {e}", file=sys.stderr)
        return 2
    except SystemExit as e:  # --help
        return int(e.code or 0)
    import uvicorn

    if not sys.stderr.isatty():  # a log file or a pipe: no progress bars in it (transformers' weight loading)
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    try:
        app = build_app(args)
    except ValueError as e:  # a model the engine cannot serve, an adapter that does not load, a bad length
        print(f"fastadapters serve: error: {e}", file=sys.stderr)
        return 2
    _access_log(not args.no_access_log)
    if not _loopback(args.host) and args.api_key is None:
        print(f"fastadapters serve: warning: listening on {args.host} without --api-key: anyone who reaches the "
              "port can send requests" + ("" if args.allow_unauthenticated_admin else
                                          "; loading and unloading adapters is refused"), file=sys.stderr)
    import torch

    threads = None
    if not torch.cuda.is_available():  # the model stays on the CPU (load_base)
        threads, why = cpu_threads(args.threads)
    where = "" if threads is None else f" ({threads} model thread{'s' * (threads > 1)}: {why})"
    print(f"fastadapters serve: {served_name(args)} on http://{args.host}:{args.port}{where}", file=sys.stderr,
          flush=True)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level="warning", access_log=False,
                            timeout_keep_alive=max(1, round(args.timeout_keep_alive)),
                            timeout_graceful_shutdown=max(1, round(args.shutdown_timeout)),
                            h11_max_incomplete_event_size=args.max_header_bytes,
                            http=header_deadline_protocol(args.header_timeout))
    before = torch.get_num_threads()
    if threads is not None:
        # more model threads than free cores stalls every parallel op on the busiest core (the event
        # loop's, the clients'): all cores but one served SmolLM2-135M 1.4x faster on 2 cores
        torch.set_num_threads(threads)
    try:
        _Server(config, args.shutdown_timeout).run()
    finally:
        torch.set_num_threads(before)
    return 0


def header_deadline_protocol(seconds: float):
    """uvicorn's h11 protocol with a deadline on each request's headers: from the connection's
    start, or from the end of the previous response on a kept-alive connection, to the complete
    request line and headers. A client that has not sent them by then (a slow-header "slowloris"
    trickle holds a connection open forever otherwise: uvicorn's keep-alive timer stops at the
    first byte) is disconnected. The body has its own deadline (``--body-timeout``, ``api._Guard``).
    Reads uvicorn's ``H11Protocol`` hooks (``connection_made``, ``data_received``,
    ``on_response_complete``, ``cycle``), the same in every uvicorn CI runs (0.30 to 0.55)."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeaderDeadlineH11(H11Protocol):
        header_timeout = seconds
        _header_timer = None

        def _arm(self) -> None:
            self._disarm()
            self._header_timer = self.loop.call_later(self.header_timeout, self._header_deadline)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _header_deadline(self) -> None:
            self._header_timer = None
            waiting = self.cycle is None or self.cycle.response_complete
            if waiting and not self.transport.is_closing():
                logging.getLogger("fastadapters.serve").warning(
                    "closed a connection that sent no complete request headers within %g s (--header-timeout)",
                    self.header_timeout)
                self.transport.close()

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes) -> None:
            before = self.cycle
            super().data_received(data)
            if self.cycle is not before:  # a request's headers are complete: its body has its own deadline
                self._disarm()

        def on_response_complete(self) -> None:
            before = self.cycle
            super().on_response_complete()
            if self.cycle is before and not self.transport.is_closing():  # kept alive: the next headers
                self._arm()

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

    return HeaderDeadlineH11


def _server_class():
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn's server, plus: the first SIGTERM drains (for --shutdown-timeout), a second exits at once."""

        def __init__(self, config, shutdown_timeout: float):
            super().__init__(config)
            self.shutdown_timeout = shutdown_timeout

        def handle_exit(self, sig, frame):
            if self.should_exit and sig == signal.SIGTERM:
                os.write(2, b"fastadapters serve: second SIGTERM: exiting now\n")
                os._exit(128 + signal.SIGTERM)
            if not self.should_exit:
                os.write(2, f"fastadapters serve: shutting down: running requests get up to "
                            f"{self.shutdown_timeout:g} s (SIGTERM again to exit now)\n".encode())
            super().handle_exit(sig, frame)

    return Server


def _Server(config, shutdown_timeout: float):
    return _server_class()(config, shutdown_timeout)
