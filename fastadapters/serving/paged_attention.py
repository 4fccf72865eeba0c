"""Per-request attention over the block pool, in place.

    tables = StepTables(new_slots, [Segment(start, n, kv_len, blocks_tensor, first_block), ...])
    out = paged_attention(query, pool, layer, tables, scaling)      # (1, T, H, D)

One engine step is one packed row of T new tokens (every scheduled request's, back to back). The
new keys/values are already in the pool (``hf_compat.PagedCache.update`` wrote them at
``new_slots``), so request i's context is exactly its blocks: positions ``0 .. kv_len - 1``. For
each request its query rows attend to its own blocks only, with
``scaled_dot_product_attention`` and grouped-query attention natively (keys and values keep their
``kv_heads`` heads, nothing is repeated: a prefill chunk passes ``enable_gqa=True``; a decode row's
query heads are viewed as (kv_heads, group) query rows of one plain SDPA, which is faster,
``_decode_sdpa``):

- the keys/values are read **in place** when the request's blocks are one contiguous run of the
  pool (a view of ``pool.keys[layer][first:first + nb]``; the allocator extends a request's run
  when the next block is free, see ``kv_blocks.BlockPool.allocate``), else gathered from its own
  block table (``index_select`` of its blocks: bytes proportional to its own context, never to
  other requests');
- a decode row (one token) needs no mask; a prefill chunk starting at position p gets a causal
  mask aligned to the bottom right (token j sees positions ``<= p + j``), built once per step and
  shared by every layer; a first chunk (p = 0) uses ``is_causal``.

Short-context decode rows are batched instead (``DecodeBatch``, built once per step by
``decode_batch``): every request decoding one token with at most ``DECODE_BATCH_MAX_LEN`` (128)
positions is gathered from its own blocks, padded to the longest of them, and all of them run as one
SDPA with a key mask. The padding is bounded by the constant, never by a long request's context (a
longer request keeps its own in-place SDPA). Why: at short contexts the per-request loop costs more
in Python and dispatch than in attention. On one layer of SmolLM2-135M geometry, fp32, one thread,
the batch took 0.35 / 0.64 / 1.28 ms against 0.75 / 0.96 / 1.92 ms for the loop at B = 16 with
context 64 / 128 and B = 32 with 128; at 192 and beyond the gather and the padded SDPA cost more than
the loop (``Engine(decode_batch_max_len=0)`` turns batching off).

Why the batch gathers its rows every step rather than keeping them (tried and measured, not kept):
dense per-layer rows kept from step to step, each decode step copying in only the new tokens,
removed the gather (``index_select``, about 12 ms of a ~240 ms step at B = 32, SmolLM2-135M fp32,
one thread), but SDPA then read rows that sit in memory instead of a buffer the gather had just
written and cost about 6 ms more (op-level profile, self time normalised to the step's matmuls,
two runs of each): about 1.5% net, for up to ``max_num_seqs`` x 128 more positions of KV memory.

Score elements computed are ``sum_i heads * n_i * kv_len_i`` on the per-request path -- exactly those needed (the old
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
whole-step ratio is what ``bench/engine_vs_hf.py`` reports).

On CUDA with ``flashinfer`` installed (fp16/bf16 models) the step's tables carry a planned FlashInfer
wrapper (``StepTables.extra["flashinfer"]``, see ``flashinfer_attention.py``) and ``paged_attention``
hands each layer to it instead of this loop: one paged kernel launch per layer for every request of
the step, the page tables built and planned once per step. That path has never run on a GPU (none
was available when it was written; it is tested on the CPU against a fake ``flashinfer``); the
engine falls back to this loop, with a warning, on CUDA without ``flashinfer``.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

__all__ = ["Segment", "StepTables", "DecodeBatch", "decode_batch", "paged_attention", "chunk_mask",
           "DECODE_BATCH_MAX_LEN"]


@dataclass
class Segment:
    start: int  # first row of this request's tokens in the packed step
    n: int  # its new tokens this step
    kv_len: int  # positions in its blocks after this step (its context, new tokens included)
    blocks: torch.Tensor | None  # its block table (long, >= blocks needed), None when contiguous
    first: int  # its first block when its blocks are one contiguous run, else -1
    mask: torch.Tensor | None = None  # (n, kv_len) bool for a chunk after a past; None for decode
    causal: bool = False  # a first chunk: is_causal


    batched: bool = False  # a decode row served by the step's DecodeBatch, not the per-request loop


@dataclass
class DecodeBatch:
    """The step's short-context decode rows, attended in one padded SDPA (built once per step)."""
    rows: torch.Tensor  # (b,) their rows in the packed step
    slots: torch.Tensor  # (b * width,) flat pool slots: row i's positions 0..width-1 (its own blocks)
    mask: torch.Tensor | None  # (b, 1, 1, width) bool, True where a position is the row's own; None: all full
    width: int  # the longest context among them (<= DECODE_BATCH_MAX_LEN)


@dataclass
class StepTables:
    new_slots: torch.Tensor  # (T,) flat slot of every new token
    segments: list[Segment]
    score_elements: int = 0  # counted by paged_attention, over all layers
    gathered_bytes: int = 0  # keys + values copied out of the pool, over all layers
    decode: DecodeBatch | None = None
    extra: dict = field(default_factory=dict)


DECODE_BATCH_MAX_LEN = 128  # decode rows with at most this many positions share one padded SDPA


def decode_batch(segments: list[Segment], tables: list[torch.Tensor], block_size: int, device,
                 max_len: int = DECODE_BATCH_MAX_LEN) -> DecodeBatch | None:
    """Group the decode rows (one new token) whose context is at most ``max_len`` positions into one
    padded batch; marks them ``batched``. ``tables[i]``: segment i's block table (its blocks first;
    entries past them are ignored). None when fewer than two rows qualify."""
    picked = [(s, t) for s, t in zip(segments, tables) if s.n == 1 and s.kv_len <= max_len]
    if len(picked) < 2:
        return None
    lens = [s.kv_len for s, _ in picked]
    width = max(lens)
    slots, mask = padded_slots(lens, [t for _, t in picked], block_size, width)
    for s, _ in picked:
        s.batched = True
    rows = torch.tensor([s.start for s, _ in picked])
    return DecodeBatch(rows.to(device), slots.to(device), None if min(lens) == width else mask.to(device), width)


def padded_slots(lens: list[int], tables: list[torch.Tensor], block_size: int,
                 width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Host tensors for rows of ``lens[i]`` positions attended as one padded batch of ``width``
    (>= every length): ``slots`` (rows * width,) the flat pool slot of row i's position j (its own
    blocks, from ``tables[i]``) and ``mask`` (rows, 1, 1, width) bool, True where j < lens[i].

    A padding position (j >= lens[i]) reads the row's own position 0, masked out: never another
    request's blocks nor the unwritten tail of its own last block (a reused block may hold a
    poisoned request's NaN there), because a masked NaN value still reaches the output as 0 * NaN."""
    nb = -(-width // block_size)
    table = torch.empty(len(lens), nb, dtype=torch.long)
    for i, (n, t) in enumerate(zip(lens, tables)):
        own = -(-n // block_size)
        table[i, :own] = t[:own]
        table[i, own:] = t[0]
    slots = (table[:, :, None] * block_size + torch.arange(block_size)).view(len(lens), -1)[:, :width]
    mask = torch.arange(width)[None, :] < torch.tensor(lens)[:, None]
    slots = torch.where(mask, slots, slots[:, :1])
    return slots.reshape(-1), mask[:, None, None, :]


def chunk_mask(past: int, n: int, device) -> torch.Tensor:
    """(n, past + n) bool: token j of a chunk starting at position ``past`` sees positions <= past + j."""
    cols = torch.arange(past + n, device=device)
    rows = torch.arange(past, past + n, device=device)
    return cols[None, :] <= rows[:, None]


def _decode_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask, scaling) -> torch.Tensor:
    """One new token per row: ``q`` (b, H, D) against ``k``/``v`` (b, kvh, w, D), ``mask`` None or
    (b, 1, 1, w) -> (b, H, D). The H query heads are viewed as (kvh, H // kvh): each KV head's group
    of query heads attends as that many query rows of one plain SDPA, which is the grouped-query
    attention transformers' Llama computes (query head h reads KV head h // (H // kvh)) without
    ``enable_gqa``. On the CPU that SDPA took 0.88 ms instead of 0.97 ms with ``enable_gqa`` (one
    layer, B = 32 rows of 96 positions gathered from the pool, SmolLM2-135M geometry, fp32, one
    thread, same run)."""
    b, heads, d = q.shape
    kvh = k.shape[1]
    o = F.scaled_dot_product_attention(q.view(b, kvh, heads // kvh, d), k, v, attn_mask=mask, scale=scaling)
    return o.reshape(b, heads, d)


def paged_attention(query: torch.Tensor, pool, layer: int, tables: StepTables, scaling) -> torch.Tensor:
    """``query`` (1, H, T, D) of the packed step -> attention output (1, T, H, D)."""
    fi = tables.extra.get("flashinfer")
    if fi is not None:  # CUDA: FlashInfer's paged kernel over the pool, planned once per step
        out = fi.run(query, pool, layer, scaling)
        tables.score_elements += query.shape[1] * fi.score_elements
        return out
    keys, values = pool.keys[layer], pool.values[layer]
    flat_k, flat_v = pool.flat_keys[layer], pool.flat_values[layer]
    _, bs, kvh, d = keys.shape
    heads = query.shape[1]
    out = query.new_empty(1, query.shape[2], heads, query.shape[3])
    scores = gathered = 0
    batch = tables.decode
    if batch is not None:  # short-context decode rows: one gather of their own positions, one SDPA
        b, w = batch.rows.numel(), batch.width
        k = flat_k.index_select(0, batch.slots).view(b, w, kvh, d).transpose(1, 2)
        v = flat_v.index_select(0, batch.slots).view(b, w, kvh, d).transpose(1, 2)
        q = query[0].index_select(1, batch.rows).transpose(0, 1).contiguous()  # (b, H, D)
        o = _decode_sdpa(q, k, v, batch.mask, scaling)
        out[0].index_copy_(0, batch.rows, o)
        gathered += 2 * b * w * kvh * d * k.element_size()
        scores += heads * b * w
    for seg in tables.segments:
        if seg.batched:
            continue
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
        if seg.n == 1:  # a decode row: its query heads grouped per KV head, as in the batch above
            out[0, seg.start] = _decode_sdpa(q[0, :, 0][None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                                             None, scaling)[0]
        else:
            o = F.scaled_dot_product_attention(q, k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                                               attn_mask=seg.mask, is_causal=seg.causal, scale=scaling,
                                               enable_gqa=True)
            out[0, seg.start:seg.start + seg.n] = o[0].transpose(0, 1)
        scores += heads * seg.n * length
    tables.score_elements += scores
    tables.gathered_bytes += gathered
    return out
