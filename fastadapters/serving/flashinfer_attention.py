"""FlashInfer's paged attention for the serving engine on CUDA (optional; issue 19, item 1).

**This path has never run on a GPU.** It was written on a machine without one, against FlashInfer's
source (read, not executed), and tested on the CPU only against a fake ``flashinfer`` module that
implements the documented semantics of the two calls used (``tests/serving/test_flashinfer_path.py``).
Its correctness and speed on CUDA are owed to the next GPU session (``bench/gpu_session.sh`` runs the
engine's greedy-equality check flashinfer vs sdpa when ``flashinfer`` imports there).

Install (not a declared extra: CI has no GPU to test it): ``pip install flashinfer-python`` into the
same environment as a CUDA build of torch. Supported: ``flashinfer`` 0.6.x and 0.7.x. Written against
0.6.18 (``flashinfer/prefill.py`` of flashinfer-ai/flashinfer at commit fb28d72, its ``version.txt``
0.6.18) and checked against the 0.6.0 and 0.7.2.post1 wheels on PyPI (the same ``__init__``, ``plan``
and ``run`` parameters used here; 0.7 adds ``plan(uniform_q_len=...)``, unused). Older releases were
not read, so they are refused rather than assumed (the ``plan``/``run`` names date from 0.2, but
``head_dim_qk`` and the backends changed since); so is a build reporting ``0.0.0+unknown`` (a
source checkout without its build metadata).

What is used, per engine step (``StepTables.extra["flashinfer"]``, a ``FlashInferStep``):

- one ``flashinfer.BatchPrefillWithPagedKVCacheWrapper(workspace, kv_layout="NHD")`` for the engine's
  life, over a persistent 128 MiB workspace (FlashInfer's recommended size). NHD is the pool's
  per-layer layout: ``keys[layer]`` / ``values[layer]`` are ``(num_blocks, block_size, kv_heads,
  head_dim)``, passed as the ``(k_cache, v_cache)`` tuple ``run`` takes, nothing copied;
- the page tables are built once per step from the segments (``page_tables``): ``qo_indptr``
  (cumulative new tokens), ``paged_kv_indptr`` (cumulative blocks), ``paged_kv_indices`` (every
  request's blocks, from the block table the scheduler keeps incrementally per request, one ``cat``)
  and ``paged_kv_last_page_len`` (positions in each request's last block, 1..block_size), int32, one
  pinned host buffer on CUDA. They stay on the host on purpose: ``plan`` reads ``qo_indptr`` and
  ``paged_kv_indptr`` on the host (``.to("cpu")`` in 0.6.18's ``plan``; its scheduling runs there) and
  copies all four to the device itself (``non_blocking=True``), so device tensors would only add a
  device-to-host sync per step;
- ``plan(qo_indptr, paged_kv_indptr, paged_kv_indices, paged_kv_last_page_len, num_qo_heads,
  num_kv_heads, head_dim, page_size, causal=True, sm_scale=, q_data_type=, kv_data_type=)`` once per
  step, at the first layer's attention call (that call is where transformers hands over the heads and
  the ``scaling`` the model uses; later layers must pass the same, else a RuntimeError);
- ``run(q, (k_cache, v_cache))`` once per layer: ``q`` is the step's ``(T, heads, head_dim)`` rows,
  the output ``(T, heads, head_dim)`` is returned as ``(1, T, heads, head_dim)``, the layout
  ``paged_attention`` returns.

Why the prefill wrapper for every row, decode rows included: with ``causal=True`` FlashInfer aligns
the causal mask to the bottom right when a request's query is shorter than its context (query ``j``
of ``qo_len`` sees positions ``<= kv_len - qo_len + j``: ``idx_in_original_seq = q_idx + kv_len -
qo_len`` in ``include/flashinfer/attention/prefill.cuh``), which is exactly a prefill chunk after a
past (prefix-tuning positions lead the blocks and are part of that past) and, for ``qo_len == 1``, a
decode row seeing its whole context. One wrapper, one plan and one launch per layer cover a mixed
step; a decode-only step could use ``BatchDecodeWithPagedKVCacheWrapper``, whose tensor-core variant
runs these same prefill kernels -- whether its CUDA-core decode kernel is faster at this model's GQA
group size is a GPU measurement nobody has made yet, so it is not used.

Selection (``select_backend``, ``Engine(attention_backend="auto"|"sdpa"|"flashinfer")``):
``"auto"`` picks FlashInfer when the model is on CUDA in fp16 or bf16 (FlashInfer's attention kernels
take no fp32 query: its ``jit/utils.py`` dtype map has none) and ``flashinfer`` imports; on CUDA
without it, or with an fp32 model, it warns once (RuntimeWarning, saying why and how to install) and
uses the SDPA path of ``paged_attention.py``. A ``flashinfer`` outside the supported versions fails
loudly with its version named (RuntimeError), whichever of "auto"/"flashinfer" was asked.
``"flashinfer"`` where it cannot run (CPU, fp32, not installed) is a ValueError naming what is valid;
``"sdpa"`` never touches ``flashinfer``.
"""
from __future__ import annotations

import re
import warnings

import torch

__all__ = ["BACKENDS", "SUPPORTED_VERSIONS", "WRITTEN_AGAINST", "select_backend", "page_tables",
           "FlashInferAttention", "FlashInferStep"]

BACKENDS = ("auto", "sdpa", "flashinfer")
SUPPORTED_VERSIONS = ((0, 6), (0, 8))  # [0.6, 0.8): the versions whose source was read
WRITTEN_AGAINST = "0.6.18 (flashinfer-ai/flashinfer fb28d72), checked against 0.6.0 and 0.7.2.post1"
WORKSPACE_BYTES = 128 << 20  # FlashInfer's recommended float workspace
INSTALL = "pip install flashinfer-python"

# Tests only: let the FlashInfer path run on the CPU (any dtype) against a fake ``flashinfer`` module.
_ALLOW_CPU = False
_warned: set[str] = set()


def _is_cuda(device) -> bool:
    return torch.device(device).type == "cuda"


def _version_tuple(version: str) -> tuple[int, int]:
    m = re.match(r"(\d+)\.(\d+)", version)
    return (int(m.group(1)), int(m.group(2))) if m else (-1, -1)


def _import_flashinfer():
    """The ``flashinfer`` module, or None when it is not installed (or does not import). A version
    outside ``SUPPORTED_VERSIONS`` is a RuntimeError naming it."""
    try:
        import flashinfer
    except ImportError:
        return None
    version = str(getattr(flashinfer, "__version__", "unknown"))
    lo, hi = SUPPORTED_VERSIONS
    if not lo <= _version_tuple(version) < hi:
        raise RuntimeError(
            f"fastadapters serving: flashinfer {version} is installed; the engine's FlashInfer path supports "
            f"flashinfer >= {lo[0]}.{lo[1]}, < {hi[0]}.{hi[1]} (written against {WRITTEN_AGAINST}: "
            "BatchPrefillWithPagedKVCacheWrapper(workspace, 'NHD'), plan(...) once per step, run(q, (k, v)) per "
            "layer, bottom-right causal alignment). Install a supported one "
            "(pip install 'flashinfer-python>=0.6,<0.8') or pass attention_backend='sdpa'.")
    if not hasattr(flashinfer, "BatchPrefillWithPagedKVCacheWrapper"):
        raise RuntimeError(f"fastadapters serving: flashinfer {version} has no BatchPrefillWithPagedKVCacheWrapper")
    return flashinfer


def _warn_once(key: str, message: str) -> None:
    if key in _warned:
        return
    _warned.add(key)
    warnings.warn(message, RuntimeWarning, stacklevel=3)


def select_backend(requested: str, device, dtype: torch.dtype) -> str:
    """The attention path for a model on ``device`` in ``dtype``: "sdpa" or "flashinfer" (module docstring)."""
    if not isinstance(requested, str) or requested not in BACKENDS:
        raise ValueError(f"attention_backend: got {requested!r}; valid: 'auto' (FlashInfer on CUDA when installed, "
                         "else SDPA), 'sdpa' (the per-request SDPA path), 'flashinfer' (CUDA, fp16/bf16, "
                         f"needs {INSTALL})")
    if requested == "sdpa":
        return "sdpa"
    if not _ALLOW_CPU:
        if not _is_cuda(device):
            if requested == "flashinfer":
                raise ValueError(f"attention_backend='flashinfer' needs the model on CUDA; it is on {device}. Valid "
                                 "here: 'auto' or 'sdpa'")
            return "sdpa"
        if dtype not in (torch.float16, torch.bfloat16):
            why = (f"FlashInfer's attention kernels take fp16 or bf16; this model is {dtype} (serve it in "
                   "bfloat16/float16 to use them)")
            if requested == "flashinfer":
                raise ValueError(f"attention_backend='flashinfer': {why}. Valid here: 'auto' or 'sdpa'")
            _warn_once("dtype", f"fastadapters serving: {why}; attention uses the per-request SDPA path.")
            return "sdpa"
    if _import_flashinfer() is None:
        if requested == "flashinfer":
            raise ValueError(f"attention_backend='flashinfer' but flashinfer is not installed ({INSTALL}); valid "
                             "here: 'auto' or 'sdpa'")
        _warn_once("missing", "fastadapters serving: the model is on CUDA but flashinfer is not installed, so the "
                              "engine's attention uses the per-request SDPA path (slower on a GPU). Install it with "
                              f"`{INSTALL}` (flashinfer >= 0.6, < 0.8), or pass attention_backend='sdpa' to choose "
                              "SDPA explicitly.")
        return "sdpa"
    return "flashinfer"


def page_tables(segments, tables, block_size: int, pin: bool = False):
    """FlashInfer's page tables for one step: ``(qo_indptr, paged_kv_indptr, paged_kv_indices,
    paged_kv_last_page_len)``, int32 host tensors (views of one buffer, pinned when ``pin``).
    ``segments``: the step's ``Segment``s in row order (``n`` new tokens, ``kv_len`` positions after
    the step); ``tables[i]``: segment i's block table (its blocks first; entries past
    ``ceil(kv_len / block_size)`` are ignored)."""
    b = len(segments)
    lens = torch.tensor([(s.n, s.kv_len) for s in segments], dtype=torch.int64).view(b, 2)
    n, kv_len = lens[:, 0], lens[:, 1]
    pages = (kv_len + block_size - 1) // block_size
    indices = torch.cat([t[:p] for t, p in zip(tables, pages.tolist())]) if b else torch.zeros(0, dtype=torch.long)
    total = int(indices.numel())
    buf = torch.empty(3 * b + 2 + total, dtype=torch.int32, pin_memory=pin)
    qo_indptr, kv_indptr = buf[:b + 1], buf[b + 1:2 * b + 2]
    last, kv_indices = buf[2 * b + 2:3 * b + 2], buf[3 * b + 2:]
    qo_indptr[0] = 0
    qo_indptr[1:] = n.cumsum(0)
    kv_indptr[0] = 0
    kv_indptr[1:] = pages.cumsum(0)
    last.copy_(kv_len - (pages - 1) * block_size)
    kv_indices.copy_(indices)
    return qo_indptr, kv_indptr, kv_indices, last


class FlashInferStep:
    """One step's FlashInfer state: its page tables (built at construction), planned at the first
    layer's attention call, run once per layer."""

    def __init__(self, owner: "FlashInferAttention", segments, tables, block_size: int):
        self.owner = owner
        self.tables = page_tables(segments, tables, block_size, pin=_is_cuda(owner.device))
        self.block_size = block_size
        self.score_elements = sum(s.n * s.kv_len for s in segments)  # per head, per layer
        self.planned: tuple | None = None  # (heads, scaling) the plan was made for
        self.plans = self.runs = 0

    def plan(self, pool, heads: int, scaling) -> None:
        """Plan this step's tables for ``heads`` query heads and softmax scale ``scaling`` (None: the
        kernel's 1/sqrt(head_dim)). ``run`` plans at the first layer's call; a CUDA-graph step plans
        here, before the replay (``plan`` cannot be captured: it schedules on the host)."""
        key = (int(heads), None if scaling is None else float(scaling))
        # q is handed over in the pool's dtype (the model's: the pool is allocated in it)
        self.owner.wrapper.plan(*self.tables, key[0], pool.kv_heads, pool.head_dim, self.block_size, causal=True,
                                sm_scale=key[1], q_data_type=pool.dtype, kv_data_type=pool.dtype)
        self.planned = key
        self.plans += 1

    def run(self, query: torch.Tensor, pool, layer: int, scaling) -> torch.Tensor:
        """``query`` (1, H, T, D) -> (1, T, H, D) over ``pool``'s layer ``layer``."""
        heads = query.shape[1]
        wrapper = self.owner.wrapper
        key = (heads, None if scaling is None else float(scaling))
        if query.shape[3] != pool.head_dim:
            raise RuntimeError(f"fastadapters serving: layer {layer}'s query head_dim {query.shape[3]} differs from "
                               f"the KV pool's {pool.head_dim}")
        if self.planned is None:
            self.plan(pool, heads, scaling)
        elif key != self.planned:
            raise RuntimeError(f"fastadapters serving: layer {layer} attends with (heads, scaling) {key}, the step's "
                               f"FlashInfer plan was made for {self.planned}; one plan per step needs them equal")
        q = query[0].transpose(0, 1)  # (T, H, D): the rotary output is already laid out so; else one copy
        if not q.is_contiguous():
            q = q.contiguous()
        if q.dtype != pool.dtype:
            q = q.to(pool.dtype)
        out = wrapper.run(q, (pool.keys[layer], pool.values[layer]))
        self.runs += 1
        return out.unsqueeze(0).to(query.dtype)


class FlashInferAttention:
    """The engine's FlashInfer state for its life: the module, a persistent workspace and one prefill
    wrapper (NHD). ``step(segments, tables, block_size)`` makes a step's ``FlashInferStep``.

    ``graph_rows=P`` makes a wrapper for CUDA-graph replay (``cuda_graphs.py``): FlashInfer's
    ``use_cuda_graph=True`` mode, whose page tables live in buffers allocated here for the wrapper's
    life (``qo_indptr`` / ``paged_kv_indptr`` of P + 1, last-page lengths of P, ``max_pages`` page
    indices): ``plan`` copies a step's tables into them, and a captured ``run`` reads them on every
    replay. Its batch is always P requests (FlashInfer fixes it in this mode). ``workspace``: share
    another instance's float workspace (the wrappers run one at a time, as vLLM's do)."""

    def __init__(self, device, graph_rows: int | None = None, max_pages: int = 0,
                 workspace: torch.Tensor | None = None):
        fi = _import_flashinfer()
        if fi is None:
            raise ValueError(f"flashinfer is not installed ({INSTALL})")
        self.device = torch.device(device)
        self.version = str(getattr(fi, "__version__", "unknown"))
        self.workspace = workspace if workspace is not None else torch.empty(WORKSPACE_BYTES, dtype=torch.uint8,
                                                                             device=self.device)
        self.graph_rows, self.max_pages = graph_rows, max_pages
        if graph_rows is None:
            self.wrapper = fi.BatchPrefillWithPagedKVCacheWrapper(self.workspace, kv_layout="NHD")
            return
        p = int(graph_rows)
        # four allocations, as vLLM makes them (not views of one buffer at arbitrary offsets)
        self.buffers = tuple(torch.zeros(n, dtype=torch.int32, device=self.device)
                             for n in (p + 1, p + 1, int(max_pages), p))
        self.wrapper = fi.BatchPrefillWithPagedKVCacheWrapper(
            self.workspace, kv_layout="NHD", use_cuda_graph=True, qo_indptr_buf=self.buffers[0],
            paged_kv_indptr_buf=self.buffers[1], paged_kv_indices_buf=self.buffers[2],
            paged_kv_last_page_len_buf=self.buffers[3])

    def step(self, segments, tables, block_size: int) -> FlashInferStep:
        return FlashInferStep(self, segments, tables, block_size)
