"""The benchmark harness: every table in ``fastadapters.bench`` and every script in ``bench/`` takes
its numbers the same way through it -- warm-up, then the median of repeats
(``triton.testing.do_bench`` on CUDA, a wall clock on the CPU) -- records the environment beside
them, and appends records to a JSON list. It sits at the bottom of the package: it imports no other
benchmark module. A benchmark measures; it never asserts speed.
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import time
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    import torch


def time_fn(fn: Callable[[], object], device: torch.device, warmup: int = 2, repeats: int = 5,
            cuda_graph: bool = False) -> float:
    """Median seconds per call of ``fn`` on ``device``: on CUDA ``triton.testing.do_bench`` (about
    10·warmup ms of warm-up, 20·repeats ms of timed calls; ``cuda_graph``: ``do_bench_cudagraph``,
    the calls replayed from a captured graph, so no Python or launch overhead -- how serving engines
    run decode); on the CPU the wall clock of ``repeats`` calls after ``warmup``."""
    if device.type == "cuda":
        import triton.testing

        if cuda_graph:
            return triton.testing.do_bench_cudagraph(fn, rep=20, return_mode="median") / 1e3
        return triton.testing.do_bench(fn, warmup=10 * warmup, rep=20 * repeats, return_mode="median") / 1e3
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def saved_activation_bytes(fn: Callable[[], torch.Tensor]) -> int:
    """Bytes autograd saves for backward while ``fn`` runs (distinct storages counted once)."""
    import torch

    seen: dict[int, int] = {}

    def pack(t):
        try:
            st = t.untyped_storage()
            seen[st.data_ptr()] = st.nbytes()
        except Exception:
            pass
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return sum(seen.values())


def peak_memory(fn: Callable[[], object], device: torch.device) -> int | None:
    if device.type != "cuda":
        return None
    import torch

    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated()


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: torch.device) -> dict:
    import torch

    def version(mod):
        try:
            return __import__(mod).__version__
        except Exception:
            return None

    commit = os.environ.get("FASTADAPTERS_GIT_COMMIT")  # a device run gets a copy of the tree, no .git
    try:
        commit = commit or subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=os.path.dirname(os.path.abspath(__file__)), timeout=5).stdout.strip() or None
    except Exception:
        commit = None
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name()
    return {"device": name, "device_type": device.type, "threads": torch.get_num_threads(),
            "torch": torch.__version__, "triton": version("triton"), "transformers": version("transformers"),
            "peft": version("peft"), "git_commit": commit, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def append_results(path: str, record: dict) -> None:
    """Append ``record`` to the JSON list at ``path`` (atomic replace)."""
    data = []
    if os.path.exists(path):
        with open(path) as f:
            data = json.load(f)
    data.append(record)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------
# noise and verdicts: every table's headline goes through these, so "what good looks like" and
# "is this a result or noise" are decided in one place
# ---------------------------------------------------------------------------------------------

def ratio_stats(ratios: list[float]) -> dict:
    """A ratio measured once per repeat (both timings taken in the same round, so a change of load
    falls on both): the median, the range over repeats, and whether it is noise -- ``noisy`` when
    half the range is larger than the effect (the median's distance from 1). One repeat cannot
    tell: ``noisy`` is then None."""
    ratios = sorted(r for r in ratios if r == r)  # NaN-free
    if not ratios:
        return {"median": None, "low": None, "high": None, "noisy": None}
    med = statistics.median(ratios)
    lo, hi = ratios[0], ratios[-1]
    noisy = None if len(ratios) < 2 else (hi - lo) / 2 > abs(med - 1)
    return {"median": med, "low": lo, "high": hi, "noisy": noisy}


def format_ratio(stats: dict | None, digits: int = 2) -> str:
    """A table cell: the median ratio, or -- when its spread is larger than its effect -- the word
    ``noise`` with the range, so a swing of the machine is never printed as a result."""
    if not stats or stats.get("median") is None:
        return "-"
    if stats.get("noisy"):
        return f"noise ({stats['low']:.{digits}f}-{stats['high']:.{digits}f})"
    return f"{stats['median']:.{digits}f}"


def verdict(value: float | None, good: str, threshold: float, noisy: bool | None = None,
            margin: float = 0.05) -> str:
    """``good``: "below" or "above" ``threshold`` is what we want. Returns one of: good, bad,
    even (within ``margin`` of the threshold), noise (the spread is larger than the effect), n/a."""
    if value is None:
        return "n/a"
    if noisy:
        return "noise"
    if abs(value - threshold) <= margin * threshold:
        return "even"
    better = value < threshold if good == "below" else value > threshold
    return "good" if better else "bad"


def summary_line(table: str, headline: str, value: float | None, unit: str, good: str, threshold: float,
                 what_good_is: str, noisy: bool | None = None, note: str = "") -> dict:
    """One summary entry (a dict, also written to the JSON record) for ``render_summary``."""
    return {"table": table, "headline": headline, "value": value, "unit": unit, "good": good,
            "threshold": threshold, "what_good_is": what_good_is, "noisy": noisy,
            "verdict": verdict(value, good, threshold, noisy), "note": note}


def render_summary(entries: list[dict]) -> str:
    """The lines printed before the tables: per table its headline number, what good looks like,
    and the verdict."""
    words = {"good": "GOOD", "bad": "BAD", "even": "EVEN", "noise": "NOISE: spread > effect, not a result",
             "n/a": "n/a"}
    width = max([len(e["table"]) for e in entries] + [5])
    lines = ["Summary (each table's headline ratio from this run; details in the tables below):"]
    for e in entries:
        value = "-" if e["value"] is None else f"{e['value']:.2f}{e['unit']}"
        line = (f"  {e['table']:<{width}}  {e['headline']} = {value}  (good: {e['what_good_is']})  "
                f"-> {words[e['verdict']]}")
        lines.append(line + (f"; {e['note']}" if e.get("note") else ""))
    return "\n".join(lines)
