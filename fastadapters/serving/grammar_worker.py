"""Grammar compilation with a time limit: xgrammar compiles in a child process that is killed when
it runs past the limit (structured.py's ``Grammars(compile_timeout_s=...)``, the engine's
``max_grammar_compile_s``, ``serve --max-grammar-compile-s``).

Why a process: compiling can take without bound (EBNF grammars of bounded repetitions against
SmolLM2's vocabulary: 1.9 KB took 5.5 s, 3.3 KB 20 s, growing faster than the grammar's length),
and a compile in progress cannot be interrupted. In a thread it would keep two cores busy after its
request had been answered; a process is stopped. The child receives the tokenizer's
``TokenizerInfo`` once (xgrammar's JSON), then compile requests; it answers with the compiled
grammar's size, and the server then compiles the spec itself, which takes about as long (same
spec, same compiler). The child does not send the grammar back: xgrammar's JSON of a compiled
grammar is large and slow (a 22.7 MB grammar, compiled in 2.6 s against SmolLM2's vocabulary, was
184 MB of JSON, 7.9 s to write and 3.9 s to read), so compiling twice is the faster way.

Frames on the pipes: an 8-byte little-endian length, then that many bytes of UTF-8 JSON.

    worker = CompileWorker(info_json)
    size = worker.compile({"method": "regex", "value": "[a-c]+"}, timeout=10.0)   # the compiled bytes
    # methods: json (value, any_whitespace, strict), regex, grammar (EBNF), lark, structural_tag
    # CompileTimeout after ``timeout`` seconds (the child is killed; the next call starts another);
    # CompileError(reason) for what xgrammar refuses; CompileTooLarge(bytes) past max_grammar_bytes;
    # CompileCrash when the child dies compiling
"""
from __future__ import annotations

import json
import os
import select
import struct
import subprocess
import sys
import threading
import time
import weakref

__all__ = ["CompileWorker", "CompileTimeout", "CompileError", "CompileTooLarge", "CompileCrash", "compile_request",
           "STARTUP_TIMEOUT_S", "PROTOCOL", "IDLE_S"]

STARTUP_TIMEOUT_S = 120.0  # the child imports xgrammar (and torch) and reads the vocabulary: seconds
# a child with no compile for this long exits (about 400 MB resident: it imports xgrammar, which
# imports torch); the next cache miss starts another (~1.4 s, not counted in the compile limit)
IDLE_S = 120.0
# the frames' meaning; a child started from files of another release (fastadapters upgraded in place
# under a running server) refuses to start rather than answer in a form the server misreads
PROTOCOL = 2


class CompileTimeout(Exception):
    """The compile ran past its time limit; the child was killed."""


class CompileError(Exception):
    """xgrammar could not compile the request (the message is its reason)."""


class CompileTooLarge(Exception):
    """The compiled grammar is larger than the child was told to allow (``args[0]``: its bytes)."""


class CompileCrash(Exception):
    """The child exited while compiling the request (a crash, or killed from outside: out of memory)."""


def _write(stream, obj) -> None:
    data = json.dumps(obj).encode()
    stream.write(struct.pack("<Q", len(data)) + data)
    stream.flush()


def _read_exact(stream, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        chunk = stream.read(n - len(out))
        if not chunk:
            raise EOFError("the grammar compiler process closed its output")
        out += chunk
    return bytes(out)


def _read(stream):
    (n,) = struct.unpack("<Q", _read_exact(stream, 8))
    return json.loads(_read_exact(stream, n))


class CompileWorker:
    """One child process compiling one request at a time (callers are serialised by a lock)."""

    def __init__(self, info_json: str, max_threads: int = 2, memory_bytes: int | None = None,
                 max_grammar_bytes: int | None = None, idle_s: float | None = IDLE_S):
        self.info_json = info_json
        self.max_threads = int(max_threads)
        self.memory_bytes = memory_bytes  # how much the child may grow past its start (None: no limit)
        self.max_grammar_bytes = max_grammar_bytes  # a larger compiled grammar is refused in the child
        self.idle_s = idle_s  # the child is stopped after this long without a compile (None: kept)
        self._last = 0.0  # when the last compile ended
        self._timer: threading.Timer | None = None
        self.reaped = 0  # children stopped for idleness (tests read it)
        self._proc: subprocess.Popen | None = None
        self._lock = threading.Lock()
        self.started = 0  # children started (tests read it)
        self.killed = 0  # children killed at their time limit
        self._finalizer = None

    def _start(self) -> subprocess.Popen:
        # the child imports this same fastadapters, wherever the parent found it (an install or a checkout)
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p))
        proc = subprocess.Popen([sys.executable, "-m", "fastadapters.serving.grammar_worker"], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, bufsize=0, env=env)
        self.started += 1
        if self._finalizer is not None:
            self._finalizer.detach()
        self._finalizer = weakref.finalize(self, _kill, proc)  # the child goes with this object
        try:
            _write(proc.stdin, {"protocol": PROTOCOL, "info": self.info_json, "max_threads": self.max_threads,
                                "memory_bytes": self.memory_bytes, "max_grammar_bytes": self.max_grammar_bytes})
            reply = self._wait(proc, STARTUP_TIMEOUT_S)
        except CompileTimeout:
            _kill(proc)
            raise RuntimeError(f"the grammar compiler process did not start within {STARTUP_TIMEOUT_S:g} s") from None
        except (OSError, EOFError) as e:
            _kill(proc)
            raise RuntimeError(f"the grammar compiler process failed to start ({e}; exit code {proc.poll()})") from None
        if reply.get("ready") is not True:
            _kill(proc)
            raise RuntimeError(f"the grammar compiler process failed to start: {reply.get('error', reply)}")
        return proc

    @staticmethod
    def _wait(proc: subprocess.Popen, timeout: float):
        """The child's next frame, or CompileTimeout when none starts within ``timeout`` seconds."""
        ready, _, _ = select.select([proc.stdout], [], [], max(timeout, 0.0))
        if not ready:
            raise CompileTimeout()
        return _read(proc.stdout)

    def compile(self, request: dict, timeout: float) -> int:
        """The compiled grammar's size in bytes for ``request`` (``compile_request``'s form), compiled
        in the child. ``timeout`` counts from when this request reaches the child (not the wait for
        the lock)."""
        with self._lock:
            if self._proc is None or self._proc.poll() is not None:
                self._proc = self._start()
            proc = self._proc
            t0 = time.monotonic()
            try:
                _write(proc.stdin, request)
                reply = self._wait(proc, timeout - (time.monotonic() - t0))
            except CompileTimeout:
                self.killed += 1
                _kill(proc)
                self._proc = None
                raise
            except (OSError, EOFError):
                _kill(proc)
                self._proc = None
                raise CompileCrash(f"the grammar compiler process exited while compiling it (exit code "
                                   f"{proc.returncode})") from None
            self._last = time.monotonic()
            self._arm()
        if "error" in reply:
            raise CompileError(reply["error"])
        if "too_large" in reply:
            raise CompileTooLarge(int(reply["too_large"]))
        return int(reply["bytes"])

    def _arm(self) -> None:
        """(Under the lock.) Stop the child once it has been idle for ``idle_s``."""
        if self.idle_s is None:
            return
        if self._timer is not None:
            self._timer.cancel()
        ref = weakref.ref(self)  # the timer does not keep this object (and its child) alive
        self._timer = threading.Timer(self.idle_s, _reap, (ref,))
        self._timer.daemon = True
        self._timer.start()

    def _reap_if_idle(self) -> None:
        if not self._lock.acquire(blocking=False):  # a compile runs: it re-arms the timer when it ends
            return
        try:
            if self._proc is not None and time.monotonic() - self._last >= self.idle_s:
                _kill(self._proc)
                self._proc = None
                self.reaped += 1
        finally:
            self._lock.release()

    def close(self) -> None:
        with self._lock:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            if self._proc is not None:
                _kill(self._proc)
                self._proc = None


def _reap(ref) -> None:
    worker = ref()
    if worker is not None:
        worker._reap_if_idle()


def _kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass
    for stream in (proc.stdin, proc.stdout):
        try:
            if stream is not None:
                stream.close()
        except OSError:
            pass


def compile_request(compiler, req: dict):
    """``req`` compiled by an xgrammar ``GrammarCompiler`` (here in the child, or in the server's own
    thread where no time limit is set)."""
    method = req["method"]
    if method == "json":
        return compiler.compile_json_schema(req["value"], any_whitespace=bool(req.get("any_whitespace", True)),
                                            strict_mode=bool(req.get("strict", True)))
    if method == "regex":
        return compiler.compile_regex(req["value"])
    if method == "grammar":
        return compiler.compile_grammar(req["value"])
    if method == "lark":
        return compiler.compile_lark(req["value"])
    if method == "structural_tag":  # as vLLM hands it to xgrammar: the older form as tags and triggers
        tag = json.loads(req["value"])
        if "structures" in tag:
            import xgrammar as xgr

            try:
                items = [xgr.StructuralTagItem(begin=s["begin"], schema=json.dumps(s["schema"]), end=s["end"])
                         for s in tag["structures"]]
                triggers = list(tag["triggers"])
            except (KeyError, TypeError) as e:
                raise ValueError(f"structures: each needs begin, schema and end, and triggers a list ({e!r})") \
                    from None
            return compiler.compile_structural_tag(items, triggers)
        return compiler.compile_structural_tag(req["value"])
    raise ValueError(f"unknown method {method!r}; valid: json, regex, grammar, lark, structural_tag")


def _data_bytes() -> int:
    """This process's data segment (VmData: heap and private writable mappings), what RLIMIT_DATA bounds."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmData:"):
                return int(line.split()[1]) * 1024
    return 0


def _main() -> None:
    """The child: read the TokenizerInfo, then compile requests until the parent closes the pipe."""
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    sys.stdout = sys.stderr  # nothing but frames on the pipe
    try:
        hello = _read(stdin)
        if hello.get("protocol") != PROTOCOL:
            raise RuntimeError(f"this grammar compiler speaks protocol {PROTOCOL}, the server {hello.get('protocol')}: "
                               "fastadapters changed on disk under the running server; restart it")
        import xgrammar as xgr

        info = xgr.TokenizerInfo.deserialize_json(hello["info"])
        # the parent keeps its own bounded cache of compiled grammars
        compiler = xgr.GrammarCompiler(info, max_threads=int(hello.get("max_threads", 2)), cache_enabled=False)
        limit = hello.get("memory_bytes")
        if limit is not None:  # heap and private mappings may grow by ``limit`` from here (xgrammar: bad_alloc)
            import resource

            resource.setrlimit(resource.RLIMIT_DATA, (_data_bytes() + int(limit), resource.RLIM_INFINITY))
        max_grammar = hello.get("max_grammar_bytes")
    except Exception as e:  # noqa: BLE001 - reported to the parent, which refuses structured output
        _write(stdout, {"ready": False, "error": f"{type(e).__name__}: {e}"})
        return
    _write(stdout, {"ready": True})
    while True:
        try:
            req = _read(stdin)
        except EOFError:  # the parent closed the pipe (or exited)
            return
        try:
            size = compile_request(compiler, req).memory_size_bytes  # (the grammar is dropped here)
            _write(stdout, {"too_large": size} if max_grammar is not None and size > max_grammar else {"bytes": size})
        except Exception as e:  # noqa: BLE001 - xgrammar's own errors: the client's spec
            _write(stdout, {"error": str(e)})


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    _main()
