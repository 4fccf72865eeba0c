"""Per-request attention over the block pool, in place.

    tables = StepTables(new_slots, [Segment(start, n, kv_len, blocks_tensor, first_block), ...])
    out = paged_attention(query, pool, layer, tables, scaling)      # (1, T, H, D)

One engine step is one packed row of T new tokens (every scheduled request's, back to back). The
new keys/values are already in the pool (``hf_compat.PagedCache.update`` wrote them at
``new_slots``), so request i's context is exactly its blocks: positions ``0 .. kv_len - 1``. For
each request its query rows attend to its own blocks only, with
``scaled_dot_product_attention(..., enable_gqa=True)`` (grouped-query attention natively: keys and
values keep their ``kv_heads`` heads, nothing is repeated):

- the keys/values are read **in place** when the request's blocks are one contiguous run of the
  pool (a view of ``pool.keys[layer][first:first + nb]``; the allocator extends a request's run
  when the next block is free, see ``kv_blocks.BlockPool.allocate``), else gathered from its own
  block table (``index_select`` of its blocks: bytes proportional to its own context, never to
  other requests');
- a decode row (one token) needs no mask; a prefill chunk starting at position p gets a causal
  mask aligned to the bottom right (token j sees positions ``<= p + j``), built once per step and
  shared by every layer; a first chunk (p = 0) uses ``is_causal``.

Score elements computed are ``sum_i heads * n_i * kv_len_i`` -- exactly those needed (the old
packed path computed ``heads * T * (sum of all contexts + T)`` and masked most of them away).
``StepTables.score_elements`` / ``gathered_bytes`` count them for the tests.

Why SDPA per request and not ``flex_attention`` on the CPU (``bench/paged_attention_cpu.py``: one
layer of SmolLM2-135M geometry -- 9 query heads, 3 KV heads, head_dim 64 -- fp32, one thread, a
shared and noisy 2-core machine): at B = 8, context 128, per-request SDPA took 0.65 ms for a decode
step and 15 ms for 64-token prefill chunks; ``flex_attention`` over the pool with a per-request
block mask, compiled, took 1.3 ms and 41 ms, after 70 s and 19 s of compilation for those two
shapes alone (the engine's shapes change every step), and eager ``flex_attention`` 285 ms and
1.4 s (it materialises every score). One dense batched SDPA over a contiguous cache (HF's
``generate``, no paging) is the floor: 0.25 ms decode there; per-request SDPA stays within about
2-3x of it per layer at B = 8-32, context 128-512, which is small beside the step's linears (the
whole-step ratio is what ``bench/engine_vs_hf.py`` reports). On CUDA FlashInfer's paged kernels
would replace this loop; that path is not written (no GPU was available to run it).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

__all__ = ["Segment", "StepTables", "paged_attention", "chunk_mask"]


@dataclass
class Segment:
    start: int  # first row of this request's tokens in the packed step
    n: int  # its new tokens this step
    kv_len: int  # positions in its blocks after this step (its context, new tokens included)
    blocks: torch.Tensor | None  # its block table (long, >= blocks needed), None when contiguous
    first: int  # its first block when its blocks are one contiguous run, else -1
    mask: torch.Tensor | None = None  # (n, kv_len) bool for a chunk after a past; None for decode
    causal: bool = False  # a first chunk: is_causal


@dataclass
class StepTables:
    new_slots: torch.Tensor  # (T,) flat slot of every new token
    segments: list[Segment]
    score_elements: int = 0  # counted by paged_attention, over all layers
    gathered_bytes: int = 0  # keys + values copied out of the pool, over all layers
    extra: dict = field(default_factory=dict)


def chunk_mask(past: int, n: int, device) -> torch.Tensor:
    """(n, past + n) bool: token j of a chunk starting at position ``past`` sees positions <= past + j."""
    cols = torch.arange(past + n, device=device)
    rows = torch.arange(past, past + n, device=device)
    return cols[None, :] <= rows[:, None]


def paged_attention(query: torch.Tensor, pool, layer: int, tables: StepTables, scaling) -> torch.Tensor:
    """``query`` (1, H, T, D) of the packed step -> attention output (1, T, H, D)."""
    keys, values = pool.keys[layer], pool.values[layer]
    flat_k, flat_v = pool.flat_keys[layer], pool.flat_values[layer]
    _, bs, kvh, d = keys.shape
    heads = query.shape[1]
    out = query.new_empty(1, query.shape[2], heads, query.shape[3])
    scores = gathered = 0
    for seg in tables.segments:
        length = seg.kv_len
        if seg.first >= 0:  # one run of blocks: a view of the pool, nothing copied
            at = seg.first * bs
            k = flat_k[at:at + length]
            v = flat_v[at:at + length]
        else:
            idx = seg.blocks[:-(-length // bs)]
            k = keys.index_select(0, idx)
            v = values.index_select(0, idx)
            gathered += 2 * k.numel() * k.element_size()
            k = k.view(-1, kvh, d)[:length]
            v = v.view(-1, kvh, d)[:length]
        q = query[:, :, seg.start:seg.start + seg.n]
        o = F.scaled_dot_product_attention(q, k.transpose(0, 1)[None], v.transpose(0, 1)[None], attn_mask=seg.mask,
                                           is_causal=seg.causal, scale=scaling, enable_gqa=True)
        out[0, seg.start:seg.start + seg.n] = o[0].transpose(0, 1)
        scores += heads * seg.n * length
    tables.score_elements += scores
    tables.gathered_bytes += gathered
    return out
