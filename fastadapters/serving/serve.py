"""``fastadapters serve``: load a base model and adapters, then run the OpenAI-compatible server.

    fastadapters serve --base-model PATH [--served-model-name NAME] [--adapter NAME=PATH ...]
                       [--adapter-root DIR ...] [--host 127.0.0.1] [--port 8000]
                       [--dtype auto|float32|bfloat16|float16] [--max-num-seqs N] [--max-model-len N]
                       [--backend auto|torch|triton|cuda]

``--base-model`` is a transformers model folder (or a ``.gguf`` file, loaded dequantised). The
model goes to the GPU when there is one. ``--dtype auto`` is float32 on the CPU and the
checkpoint's own dtype on a GPU. Adapters named with ``--adapter`` are loaded at start-up from
anywhere; ``--adapter-root`` turns on runtime loading, confined to those folders. ``main(argv)``
returns the exit code: 2 with one line on stderr for bad flags or inputs.
"""
from __future__ import annotations

import argparse
import os
import sys

from ..cli import CommandParser, UsageError

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


def build_parser() -> argparse.ArgumentParser:
    # the shared parser, with plain argparse's prefix abbreviations and help (as this command has had)
    p = CommandParser(prog="fastadapters serve",
                      description="OpenAI-compatible server for one base model and many adapters",
                      allow_abbrev=True, formatter_class=argparse.HelpFormatter)
    p.add_argument("--base-model", required=True, help="transformers model folder or .gguf file")
    p.add_argument("--served-model-name", default=None, help="the base model's id in the API (default: --base-model)")
    p.add_argument("--adapter", action="append", default=[], metavar="NAME=PATH", help="an adapter to load at start")
    p.add_argument("--adapter-root", action="append", default=[], metavar="DIR",
                   help="allow runtime loading of adapters from under DIR (repeatable)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--dtype", default="auto", choices=DTYPES)
    p.add_argument("--max-num-seqs", type=_positive, default=16, help="requests in the running batch")
    p.add_argument("--max-model-len", type=_positive, default=None, help="context length (prompt + output)")
    p.add_argument("--max-waiting", type=_positive, default=None, help="queued requests before 503 (4 x max-num-seqs)")
    p.add_argument("--block-size", type=_positive, default=16, help="KV positions per block")
    p.add_argument("--kv-cache-gb", type=float, default=None,
                   help="memory for KV blocks (default: half the free GPU memory, or 2 GB on the CPU)")
    p.add_argument("--backend", default="auto", choices=("auto", "torch", "triton", "cuda"))
    return p


def load_base(path: str, dtype: str = "auto"):
    """(model, tokenizer) from a folder or a .gguf file; float32 on the CPU unless told otherwise."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kw = {}
    if path.endswith(".gguf"):
        folder, kw["gguf_file"] = os.path.dirname(path) or ".", os.path.basename(path)
    else:
        folder = path
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


def build_app(args):
    from .api import create_app
    from .engine import Engine

    model, tokenizer = load_base(args.base_model, args.dtype)
    engine = Engine(model, tokenizer, max_num_seqs=args.max_num_seqs, max_model_len=args.max_model_len,
                    block_size=args.block_size, max_waiting=args.max_waiting,
                    backend=None if args.backend == "auto" else args.backend, adapter_roots=args.adapter_root,
                    kv_cache_bytes=None if args.kv_cache_gb is None else int(args.kv_cache_gb * (1 << 30)))
    for spec in args.adapter:
        name, _, path = spec.partition("=")
        engine.load_adapter(name, path, confined=False)
    return create_app(engine, args.served_model_name or args.base_model, base_path=args.base_model)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser().parse_args(argv)
        for spec in args.adapter:
            name, eq, path = spec.partition("=")
            if not eq or not name or not path:
                raise UsageError(f"--adapter: got {spec!r}; valid: NAME=PATH")
            if not os.path.isdir(path):
                raise UsageError(f"--adapter {name}: {path!r} is not a directory")
        for root in args.adapter_root:
            if not os.path.isdir(root):
                raise UsageError(f"--adapter-root: {root!r} is not a directory")
        if not os.path.exists(args.base_model):
            raise UsageError(f"--base-model: {args.base_model!r} does not exist")
        if args.kv_cache_gb is not None and not args.kv_cache_gb > 0:
            raise UsageError(f"--kv-cache-gb: got {args.kv_cache_gb}; valid: a positive number")
        if not 0 <= args.port < 65536:
            raise UsageError(f"--port: got {args.port}; valid: 0..65535")
    except UsageError as e:
        print(f"fastadapters serve: error: {e}", file=sys.stderr)
        return 2
    except SystemExit as e:  # --help
        return int(e.code or 0)
    import uvicorn

    try:
        app = build_app(args)
    except ValueError as e:  # a model the engine cannot serve, an adapter that does not load
        print(f"fastadapters serve: error: {e}", file=sys.stderr)
        return 2
    print(f"fastadapters serve: {args.served_model_name or args.base_model} on http://{args.host}:{args.port}",
          file=sys.stderr, flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0
