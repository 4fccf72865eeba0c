"""Requests and the iteration-level scheduler: who runs in the next step, with how many tokens.

A request's tokens are its prompt followed by what it generated. ``num_computed`` of them have
keys/values in the request's blocks (after the adapter's prefix, ``prefix_len`` positions, for a
prefix-tuning request), so token j sits at position ``prefix_len + j``. Each step feeds every
running request its next tokens: one for a decoding request (its last sampled token), a chunk of
at most ``chunk_size`` for one still in prefill, within a per-step ``token_budget`` (decode rows
are served first, so a long prompt never stalls the others). When a step needs a block the pool
does not have, the most recently admitted request is preempted: its blocks are freed and it goes
back to the front of the queue, to recompute its tokens when there is room again.

Limits: ``max_num_seqs`` running requests; ``max_waiting`` queued ones (``submit`` raises
``QueueFull`` beyond that, at once). Finished and cancelled requests free their blocks here.
"""
from __future__ import annotations

import array
import collections
import enum
import hashlib
import itertools
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from .kv_blocks import BlockPool
from .sampling import SamplingParams

__all__ = ["Request", "Status", "Scheduler", "QueueFull", "ScheduledBatch"]


class QueueFull(RuntimeError):
    """The waiting queue is at its limit: the caller answers 503 / 429 at once."""


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


_ids = itertools.count()


@dataclass(eq=False)
class Request:
    prompt_ids: list[int]
    params: SamplingParams
    adapter: str | None = None  # the public name (None: the base model)
    route_name: str | None = None  # the name routed through the linear adapters (None: base)
    prefix_kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None  # per layer (H, P, D) each
    on_output: Callable[[Any], None] | None = None
    request_id: str = field(default_factory=lambda: f"req-{next(_ids)}")
    status: Status = Status.WAITING
    output_ids: list[int] = field(default_factory=list)
    blocks: list[int] = field(default_factory=list)
    # the block table as a tensor, filled incrementally as blocks are added (entries past
    # len(blocks) are stale), and whether blocks are one run first..first+len-1 of the pool
    block_table: torch.Tensor | None = None
    contiguous: bool = True
    cache_scope: str | None = None  # what its keys/values depend on besides tokens: the adapter load id
    num_computed: int = 0  # tokens (prompt + output) whose KV is in the blocks
    generator: torch.Generator | None = None
    finish_reason: str | None = None
    cancelled: bool = False
    text: str = ""  # the text emitted so far
    preemptions: int = 0
    metadata: dict = field(default_factory=dict)

    @property
    def prefix_len(self) -> int:
        return 0 if not self.prefix_kv else int(self.prefix_kv[0][0].shape[-2])

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    def tokens(self, start: int, n: int) -> list[int]:
        """``all_ids[start:start + n]`` without building ``all_ids`` (O(n), not O(context))."""
        p = len(self.prompt_ids)
        if start >= p:
            return self.output_ids[start - p:start - p + n]
        if start + n <= p:
            return self.prompt_ids[start:start + n]
        return self.prompt_ids[start:] + self.output_ids[:start + n - p]

    @property
    def num_tokens(self) -> int:
        """``len(all_ids)`` without building the list (read every step)."""
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def kv_len(self) -> int:
        return self.prefix_len + self.num_computed


@dataclass
class ScheduledBatch:
    requests: list[Request]
    num_new: list[int]  # tokens each request feeds this step
    # per request (its first row in the step's logits, its rows), set by the engine's forward when a
    # request takes the LM head on more than its last token (prompt log-probabilities); None: one row each
    head_rows: list[tuple[int, int]] | None = None


class Scheduler:
    RESERVE_TOKENS = 512  # generated positions reserved with the prompt's run at admission

    def __init__(self, pool: BlockPool, max_num_seqs: int, max_waiting: int, chunk_size: int = 256,
                 token_budget: int = 512, max_adapters: int | None = None, prefix_caching: bool = True):
        self.pool = pool
        self.prefix_caching = prefix_caching
        self.max_adapters = max_adapters
        self.max_num_seqs, self.max_waiting = max_num_seqs, max_waiting
        self.chunk_size, self.token_budget = chunk_size, token_budget
        self.waiting: collections.deque[Request] = collections.deque()
        self.running: list[Request] = []

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # -- blocks ----------------------------------------------------------------------------------
    def _grow(self, req: Request, positions: int) -> bool:
        need = self.pool.blocks_for(positions) - len(req.blocks)
        if need <= 0:
            return True
        if need > self.pool.free_blocks:
            return False
        last = req.blocks[-1] if req.blocks else None
        self._add_blocks(req, self.pool.allocate(need, after=last))
        return True

    @staticmethod
    def _add_blocks(req: Request, new: list[int]) -> None:
        """Append ``new`` to ``req``'s blocks, its block table and its contiguity flag (O(len(new)))."""
        have = len(req.blocks)
        last = req.blocks[-1] if have else None
        if not have:
            req.contiguous = True
        req.contiguous = req.contiguous and all(b == new[0] + i for i, b in enumerate(new)) \
            and (last is None or new[0] == last + 1)
        req.blocks.extend(new)
        table = req.block_table
        need = len(new)
        if table is None or table.numel() < have + need:  # grown by doubling: O(1) amortised per block
            bigger = torch.empty(max(2 * (have + need), 8), dtype=torch.long)
            if table is not None and have:
                bigger[:have] = table[:have]
            req.block_table = table = bigger
        table[have:have + need] = torch.tensor(new, dtype=torch.long)

    def release(self, req: Request) -> None:
        """Free ``req``'s blocks and drop it from the queues (finished, cancelled or failed)."""
        if req.blocks:
            self.pool.free(req.blocks)
        req.metadata.pop("hashed", None)
        req.metadata.pop("chain", None)
        if req in self.running:
            self.running.remove(req)
        try:
            self.waiting.remove(req)
        except ValueError:
            pass

    def _start(self, req: Request) -> bool:
        """Give a waiting request its first blocks (and its prefix's keys/values).

        Prefix cache: the request's leading full blocks whose content key (``_block_key``: the chain
        of adapter load id and tokens) names a cached block are shared, not recomputed (at least one
        token is always left to compute, for the logits). A prefix-tuning adapter's prefix positions
        are part of that content, so its prefix keys/values are stored once and shared.

        When the pool has room (the run is at most half the free blocks), the blocks for the prefix,
        the prompt and up to ``RESERVE_TOKENS`` of its ``max_tokens`` are taken at once as one
        contiguous run (later blocks extend it when the next block is free), so attention reads them in place every step;
        otherwise (a busy or fragmented pool, or shared leading blocks) blocks are added as the
        request grows, and attention gathers its own blocks."""
        bs, plen = self.pool.block_size, req.prefix_len
        hit = 0
        # (a request that asked for prompt log-probabilities computes its whole prompt: they come from it)
        if self.prefix_caching and not req.blocks and req.params.prompt_logprobs is None:
            parent, matched = None, []
            for i in range((plen + req.num_tokens - 1) // bs):
                key = self._block_key(req, i, parent)
                b = self.pool.lookup(key)
                if b is None:
                    break
                matched.append(b)
                parent = key
            if matched:
                for b in matched:
                    self.pool.share(b)
                self._add_blocks(req, matched)
                req.metadata["hashed"], req.metadata["chain"] = len(matched), parent
                hit = len(matched) * bs
        computed = max(0, hit - plen)
        ahead = min(req.params.max_tokens - len(req.output_ids), self.RESERVE_TOKENS)
        want = self.pool.blocks_for(plen + req.num_tokens + ahead)
        if not req.blocks and want <= self.pool.free_blocks // 2:
            run = self.pool.allocate_run(want)
            if run is not None:
                self._add_blocks(req, run)
        if not self._grow(req, plen + min(req.num_tokens, computed + self.chunk_size)):
            if req.blocks:
                self.pool.free(req.blocks)
            req.metadata.pop("hashed", None)
            req.metadata.pop("chain", None)
            return False
        for layer, (k, v) in enumerate(req.prefix_kv or ()):
            if hit < plen:
                self.pool.write(layer, req.blocks, hit, k[:, hit:], v[:, hit:])
        req.num_computed = computed
        req.metadata["cached_tokens"] = computed
        req.status = Status.RUNNING
        return True

    def _block_key(self, req: Request, i: int, parent) -> bytes:
        """Content key of block ``i`` of ``req``: a SHA-256 chain over its adapter load id, its tokens
        (prefix positions carry none: they are the adapter's) and the previous block's key. Not
        Python's ``hash``: int tuples hash without a per-process seed and 64 bits can be collided on
        purpose, and a hit is trusted without comparing tokens, so a crafted prompt could plant its
        keys/values under another tenant's prefix (vLLM moved to SHA-256 for the same reason)."""
        bs, plen = self.pool.block_size, req.prefix_len
        lo, hi = max(0, i * bs - plen), (i + 1) * bs - plen
        toks = req.tokens(lo, hi - lo) if hi > 0 else []
        h = hashlib.sha256(parent or b"")
        h.update(f"|{req.cache_scope}|{i}|".encode())
        h.update(array.array("q", toks).tobytes())
        return h.digest()

    def commit_blocks(self, req: Request) -> None:
        """Name ``req``'s newly full, computed blocks in the prefix cache (O(block_size) per block)."""
        if not self.prefix_caching:
            return
        full = req.kv_len // self.pool.block_size
        i, parent = req.metadata.get("hashed", 0), req.metadata.get("chain")
        while i < full:
            key = self._block_key(req, i, parent)
            self.pool.register(req.blocks[i], key)
            parent, i = key, i + 1
        req.metadata["hashed"], req.metadata["chain"] = i, parent

    def _preempt(self, victim: Request) -> None:
        self.pool.free(victim.blocks)
        victim.metadata.pop("hashed", None)
        victim.metadata.pop("chain", None)
        victim.num_computed = 0
        victim.status = Status.WAITING
        victim.preemptions += 1
        self.running.remove(victim)
        self.waiting.appendleft(victim)

    # -- one step --------------------------------------------------------------------------------
    def _admit(self) -> None:
        if self.max_adapters is None:
            while self.waiting and len(self.running) < self.max_num_seqs:
                if not self._start(self.waiting[0]):
                    break
                self.running.append(self.waiting.popleft())
            return
        # at most max_adapters distinct routed adapters run at once (the store's device slots): a
        # request whose adapter is not running waits while all slots are taken, and later requests
        # on running adapters (or the base model) are admitted past it -- but only until
        # ``max_num_seqs`` of them have overtaken it. From then on nothing is admitted past it (the
        # queue is FIFO from there): the running requests finish, a slot frees, and it runs. So a
        # steady stream on the resident adapters cannot starve a request on another one.
        active = {r.route_name for r in self.running if r.route_name is not None}
        skipped: list[Request] = []
        i = 0
        while i < len(self.waiting) and len(self.running) < self.max_num_seqs:
            req = self.waiting[i]
            name = req.route_name
            if name is not None and name not in active and len(active) >= self.max_adapters:
                if req.metadata.get("overtaken", 0) >= self.max_num_seqs:
                    break  # starving: it is next, whatever waits behind it
                skipped.append(req)
                i += 1
                continue
            if not self._start(req):
                break
            del self.waiting[i]
            self.running.append(req)
            if name is not None:
                active.add(name)
            for waiting in skipped:  # each admission past a waiting request counts against it
                waiting.metadata["overtaken"] = waiting.metadata.get("overtaken", 0) + 1

    def schedule(self) -> ScheduledBatch:
        self._admit()
        budget = self.token_budget
        plan: dict[int, int] = {}
        decoding = [r for r in self.running if r.num_computed >= r.num_tokens - 1 and r.output_ids]
        dec_ids = {id(r) for r in decoding}
        prefilling = [r for r in self.running if id(r) not in dec_ids]
        for req in decoding + prefilling:
            if budget <= 0:
                break
            if req.status is not Status.RUNNING:  # preempted above to make room for an older request
                continue
            todo = req.num_tokens - req.num_computed
            n = min(todo, self.chunk_size, budget)
            while not self._grow(req, req.kv_len + n):
                victim = self.running[-1]
                self._preempt(victim)
                plan.pop(id(victim), None)
                if victim is req:
                    n = 0
                    break
            if n and req.status is Status.RUNNING:
                plan[id(req)] = n
                budget -= n
        reqs = [r for r in self.running if id(r) in plan]
        return ScheduledBatch(reqs, [plan[id(r)] for r in reqs])
