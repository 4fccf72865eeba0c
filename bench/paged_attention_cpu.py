"""CPU attention choices for the engine's paged attention, one layer of SmolLM2-135M geometry.

    python bench/paged_attention_cpu.py [--threads 1] [--reps 10] [--flex] [--batches 8 16 32] [--contexts 128 512]

9 query heads, 3 KV heads, head_dim 64, fp32, blocks of 16 positions. For B requests of context L:
decode (one query each) and a prefill chunk (64 queries each, after L - 64 past positions):

- ``per-request view``: SDPA(enable_gqa) per request over a view of its one run of blocks (what
  the engine does when a request's blocks are contiguous);
- ``per-request gather``: the same after ``index_select`` of its (scattered) blocks;
- ``dense batched``: one SDPA over a contiguous (B, Hkv, L, D) cache, as HF's generate has
  (a lower bound: no paging, every request the same length);
- ``flex`` (``--flex``): ``flex_attention`` over the whole pool with a block mask of each query's own
  request, compiled once per shape (compile time reported apart); eager flex is reported for the
  smallest case only (it materialises every score).

Medians of ``--reps`` interleaved repeats, milliseconds per layer. It measures; it asserts nothing.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

H, HKV, D, BS = 9, 3, 64, 16


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--flex", action="store_true")
    ap.add_argument("--batches", type=int, nargs="+", default=[8, 16, 32])
    ap.add_argument("--contexts", type=int, nargs="+", default=[128, 512])
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    for b in args.batches:
        for ctx in args.contexts:
            for nq in (1, 64):
                row = run(b, ctx, nq, args.reps, args.flex)
                print(json.dumps(row), flush=True)


def run(b, ctx, nq, reps, flex):
    nb = ctx // BS
    g = torch.Generator().manual_seed(0)
    pool_k = torch.randn(b * nb + 7, BS, HKV, D, generator=g)
    pool_v = torch.randn_like(pool_k)
    flat_k, flat_v = pool_k.view(-1, HKV, D), pool_v.view(-1, HKV, D)
    runs = [i * nb for i in range(b)]
    scattered = [torch.randperm(b * nb + 7, generator=g)[:nb] for _ in range(b)]
    q = torch.randn(1, H, b * nq, D, generator=g)
    mask = None if nq == 1 else (torch.arange(ctx)[None] <= torch.arange(ctx - nq, ctx)[:, None])

    def per_request(gather):
        out = q.new_empty(1, b * nq, H, D)
        for i in range(b):
            if gather:
                k = pool_k.index_select(0, scattered[i]).view(-1, HKV, D)
                v = pool_v.index_select(0, scattered[i]).view(-1, HKV, D)
            else:
                k, v = flat_k[runs[i] * BS:runs[i] * BS + ctx], flat_v[runs[i] * BS:runs[i] * BS + ctx]
            o = F.scaled_dot_product_attention(q[:, :, i * nq:(i + 1) * nq], k.transpose(0, 1)[None],
                                               v.transpose(0, 1)[None], attn_mask=mask, enable_gqa=True)
            out[0, i * nq:(i + 1) * nq] = o[0].transpose(0, 1)
        return out

    dense_k = torch.randn(b, HKV, ctx, D, generator=g)
    dense_v = torch.randn_like(dense_k)
    qb = q.view(1, H, b, nq, D).permute(2, 1, 0, 3, 4).reshape(b, H, nq, D)

    def dense():
        return F.scaled_dot_product_attention(qb, dense_k, dense_v, attn_mask=mask, enable_gqa=True)

    cases = {"per_request_view": lambda: per_request(False), "per_request_gather": lambda: per_request(True),
             "dense_batched": dense}
    extra = {}
    if flex:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        owner = torch.arange(b).repeat_interleave(nq)
        qpos = torch.arange(ctx - nq, ctx).repeat(b)

        def own(bi, hi, qi, ki):  # key ki (flat slot) belongs to query qi's request, at or before it
            return (ki // (nb * BS) == owner[qi]) & (ki % (nb * BS) <= qpos[qi])

        kv_len = b * nb * BS
        block_mask = create_block_mask(own, None, None, b * nq, kv_len, device="cpu", BLOCK_SIZE=128)
        fk = flat_k[:kv_len].transpose(0, 1)[None]
        fv = flat_v[:kv_len].transpose(0, 1)[None]
        compiled = torch.compile(flex_attention, dynamic=False)
        t0 = time.perf_counter()
        compiled(q, fk, fv, block_mask=block_mask, enable_gqa=True)
        extra["flex_compile_s"] = time.perf_counter() - t0
        cases["flex_compiled"] = lambda: compiled(q, fk, fv, block_mask=block_mask, enable_gqa=True)
        if b == 8 and ctx == 128:
            t0 = time.perf_counter()
            flex_attention(q, fk, fv, block_mask=block_mask, enable_gqa=True)
            extra["flex_eager_ms"] = 1e3 * (time.perf_counter() - t0)
    times = {k: [] for k in cases}
    for fn in cases.values():
        fn()
    for _ in range(reps):
        for name, fn in cases.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(1e3 * (time.perf_counter() - t0))
    row = dict(batch=b, context=ctx, queries_per_request=nq)
    row.update({f"{k}_ms": round(statistics.median(v), 3) for k, v in times.items()})
    row.update(extra)
    return row


if __name__ == "__main__":
    main()
